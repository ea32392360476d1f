"""The message tensor product of a RACE layer as plain torch: channel-wise products.

e3nn's ``TensorProduct`` with "uvu" paths (every channel of the node features times the
spherical harmonics, weighted per edge) is generic code; here each path is one or two
elementwise products over a component-major layout ([2l+1, channels] per block), with the
Clebsch–Gordan coefficients and e3nn's normalisation read off the e3nn module once (by
evaluating it on unit inputs), so the numbers are the module's. ``RaceLayer`` (one member)
and ``StackedRace`` (M members at once, a leading member axis) use it.
"""

from __future__ import annotations

from typing import List

import torch


def component_major(irreps) -> torch.Tensor:
    """perm with x_cm = x[..., perm]: each block [mul, 2l+1] (e3nn's order) as [2l+1, mul]."""
    order: List[int] = []
    for (mul, ir), block in zip(irreps, irreps.slices()):
        for k in range(ir.dim):
            order.extend(block.start + u * ir.dim + k for u in range(mul))
    return torch.tensor(order, dtype=torch.int64)


class MessagePaths(torch.nn.Module):
    """The channel-wise paths of one layer's message tensor product.

    Path p takes block a of the node features (rotation order l1), block b of the spherical
    harmonics (l2) and writes block o (l3): msg_o[k, u] = w_p[u] Σ_ij C_p[i, j, k] x_a[i, u] Y_b[j],
    with C_p the Clebsch–Gordan block times e3nn's normalisation, read off the module.
    Blocks are held component-major ([2l+1, channels]): every broadcast then runs along
    the contiguous channel axis, and so do the reductions of the backward pass."""

    def __init__(self, product: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        in1 = product.irreps_in1
        in2 = product.irreps_in2
        out = product.irreps_out
        s1, s2, so = in1.slices(), in2.slices(), out.slices()
        self.channels = int(in1[0].mul)
        self.weight_numel = int(product.weight_numel)
        self.block_start: List[int] = [s.start for s in s1]
        self.block_dim: List[int] = [ir.dim for _, ir in in1]
        self.path_block: List[int] = []
        self.y_start: List[int] = []
        self.y_dim: List[int] = []
        self.out_dim: List[int] = []
        self.w_index: List[int] = []  # the path's chunk of `channels` radial weights
        self.kind: List[int] = []  # 0: scalar input, 1: Y0 (C ∝ identity), 2: scalar output, 3: general
        out_start: List[int] = []
        blocks: List[torch.Tensor] = []
        offset = 0
        for ins in product.instructions:
            if ins.connection_mode != "uvu" or not ins.has_weight or in2[ins.i_in2].mul != 1:
                raise ValueError("the message paths need weighted channel-wise (uvu) tensor-product paths")
            mul, ir1 = in1[ins.i_in1]
            if mul != self.channels or out[ins.i_out].mul != mul:
                raise ValueError("the message paths need one channel count for every irrep")
            d1, d2, d3 = ir1.dim, in2[ins.i_in2].ir.dim, out[ins.i_out].ir.dim
            # probe channel 0 with unit vectors x1 = e_i, Y = e_j and the path's first weight
            x1 = torch.zeros(d1 * d2, in1.dim, dtype=dtype)
            x2 = torch.zeros(d1 * d2, in2.dim, dtype=dtype)
            w = torch.zeros(d1 * d2, self.weight_numel, dtype=dtype)
            for i in range(d1):
                for j in range(d2):
                    x1[i * d2 + j, s1[ins.i_in1].start + i] = 1.0  # channel 0: the block's first d1 entries
                    x2[i * d2 + j, s2[ins.i_in2].start + j] = 1.0
            w[:, offset] = 1.0
            with torch.no_grad():
                y = product(x1, x2, w)
            block = y[:, so[ins.i_out].start:so[ins.i_out].start + d3].reshape(d1, d2, d3).detach().clone()
            if d1 == 1:
                kind = 0
            elif d2 == 1 and d1 == d3 and torch.equal(block[:, 0, :], block[0, 0, 0] * torch.eye(d1, dtype=dtype)):
                kind = 1
            elif d3 == 1:
                kind = 2
            else:
                kind = 3
            blocks.append(block)
            self.kind.append(kind)
            self.path_block.append(int(ins.i_in1))
            self.y_start.append(s2[ins.i_in2].start)
            self.y_dim.append(d2)
            self.out_dim.append(d3)
            self.w_index.append(offset // mul)
            out_start.append(so[ins.i_out].start)
            offset += mul
        if offset != self.weight_numel:
            raise ValueError("unexpected weight layout of the message tensor product")
        # blocks [n_paths] of [d1, d2, d3], padded into one buffer for TorchScript
        pad = max(max(b.shape) for b in blocks)
        padded = torch.zeros(len(blocks), pad, pad, pad, dtype=dtype)
        for p, b in enumerate(blocks):
            padded[p, : b.shape[0], : b.shape[1], : b.shape[2]] = b
        # not in state dicts: derived from the architecture, so checkpoints stay as they were
        self.register_buffer("coefficients", padded, persistent=False)
        # messages are concatenated in the order of the module's output blocks
        self.out_order: List[int] = sorted(range(len(blocks)), key=lambda p: out_start[p])
        self.register_buffer("message_order", component_major(out), persistent=False)  # rows of linear_down

    def forward(self, h_up: torch.Tensor, sh: torch.Tensor, weights: torch.Tensor, centre: torch.Tensor,
                neighbour: torch.Tensor, n: int) -> torch.Tensor:
        """Node features h_up [M, N, d_in] (component-major blocks), sh [M, E, d_sh], radial
        weights [M, E, n_weights] → the messages summed over each centre's edges,
        [M, n, d_msg] (component-major blocks, in the module's output order)."""
        m, e = sh.shape[0], sh.shape[1]
        u = self.channels
        gathered: List[torch.Tensor] = []
        for start, dim in zip(self.block_start, self.block_dim):
            block = h_up[:, :, start:start + u * dim].reshape(m, h_up.shape[1], dim, u)
            gathered.append(block[:, neighbour])  # [M, E, dim, u]
        # split, not slices: the backward of a split is one cat, of a slice a zero-filled copy
        path_weights = weights.split(u, dim=2)
        summed: List[torch.Tensor] = []
        for p in self.out_order:
            xa = gathered[self.path_block[p]]
            d1, d2, d3 = xa.shape[2], self.y_dim[p], self.out_dim[p]
            w = path_weights[self.w_index[p]].unsqueeze(2)  # [M, E, 1, u]
            yb = sh[:, :, self.y_start[p]:self.y_start[p] + d2]
            c = self.coefficients[p, :d1, :d2, :d3]
            kind = self.kind[p]
            if kind == 1:
                msg = xa * (w * (yb * c[0, 0, 0]).unsqueeze(3))
            else:
                # YC[m, e, i, k] = Σ_j Y[j] C[i, j, k]: small, shared by the channels
                yc = torch.matmul(yb, c.transpose(0, 1).reshape(d2, d1 * d3)).reshape(m, e, d1, d3)
                if kind == 0:
                    msg = (xa * w) * yc.reshape(m, e, d3, 1)
                elif kind == 2:
                    msg = (xa * yc).sum(dim=2, keepdim=True) * w
                else:
                    msg = torch.matmul(yc.transpose(2, 3), xa) * w
            total = torch.zeros(m, n, d3, u, dtype=msg.dtype, device=msg.device).index_add(1, centre, msg)
            summed.append(total.reshape(m, n, d3 * u))
        return torch.cat(summed, dim=2)
