"""The channel-wise square of an atom's summed message: two neighbours of one centre at once.

A RACE layer's message is linear in its neighbours' features: h_i' = Σ_j φ(r_ij) ⊗ h_j, so
the only angles a layer sees are those along a path i–j–k through a neighbour; the angle
j–i–k at the centre itself appears only in a later layer, through that centre's own
neighbours, and is never seen in the last one. Squaring the summed message A_i of each
channel, A_i ⊗ A_i = Σ_jk φ(r_ij) ⊗ φ(r_ik), puts every pair of neighbours of the centre in
the same layer — the three-body term of ACE and MACE's product basis at correlation order 2.
It runs once per atom and channel (a [2l+1]³ contraction), not per edge, so it costs a small
fraction of a layer.

out[c, k] = Σ_p w_p[c] Σ_ij T_p[i, j, k] A[c, i] A[c, j], with p over the Clebsch–Gordan
paths (l1 ≤ l2 → l3) of the hidden irreps and T_p the Wigner 3j symbol times sqrt(2 l3 + 1)
(component normalisation), divided by sqrt(#paths into l3). ``RaceLayer`` adds it to its
message; ``StackedLayer`` runs the same function with a leading member axis.
"""

from __future__ import annotations

import math
from typing import List

import torch
from e3nn import o3

from ._radial import _default_dtype


def channel_components(irreps: o3.Irreps) -> torch.Tensor:
    """perm with x[..., perm].reshape(..., channels, D): every channel's components, block by block."""
    order: List[int] = []
    channels = irreps[0].mul
    for u in range(channels):
        for (mul, ir), block in zip(irreps, irreps.slices()):
            order.extend(block.start + u * ir.dim + k for k in range(ir.dim))
    return torch.tensor(order, dtype=torch.int64)


def channel_square(x: torch.Tensor, weight: torch.Tensor, coupling: torch.Tensor, to_channels: torch.Tensor,
                   from_channels: torch.Tensor, channels: int) -> torch.Tensor:
    """The squares of features x [N, d] with weights [P, C], or x [M, N, d] with weights
    [M, P, C] (M members at once); coupling [P, D, D, D]. Returns the shape of x."""
    dim = coupling.shape[1]
    xc = torch.index_select(x, -1, to_channels)
    xc = xc.reshape(list(xc.shape[:-1]) + [channels, dim])
    outer = (xc.unsqueeze(-1) * xc.unsqueeze(-2)).flatten(-2)  # [..., N, C, D²]
    flat_coupling = coupling.reshape(coupling.shape[0], dim * dim, dim)
    if x.dim() == 2:
        mixed = torch.einsum("pc,pqk->cqk", weight, flat_coupling)
        out = torch.einsum("ncq,cqk->nck", outer, mixed)
    else:
        mixed = torch.einsum("mpc,pqk->mcqk", weight, flat_coupling)
        out = torch.einsum("mncq,mcqk->mnck", outer, mixed)
    return torch.index_select(out.flatten(-2), -1, from_channels)


class MessageSquare(torch.nn.Module):
    """A ⊗ A per channel for hidden irreps in which every l has the same channel count."""

    def __init__(self, irreps: o3.Irreps):
        super().__init__()
        irreps = o3.Irreps(irreps)
        muls = {mul for mul, _ in irreps}
        if len(muls) != 1:
            raise ValueError(f"the message square needs one channel count for every irrep, got {irreps}")
        self.channels = int(irreps[0].mul)
        offsets, dim = [], 0
        for _, ir in irreps:
            offsets.append(dim)
            dim += ir.dim
        blocks = [ir for _, ir in irreps]
        paths = []
        for a, ir1 in enumerate(blocks):
            for b in range(a, len(blocks)):
                for ir3 in ir1 * blocks[b]:
                    if ir3 in blocks:
                        paths.append((a, b, blocks.index(ir3)))
        into = [sum(1 for p in paths if p[2] == c) for c in range(len(blocks))]
        coupling = torch.zeros(len(paths), dim, dim, dim, dtype=torch.float64)
        for p, (a, b, c) in enumerate(paths):
            l1, l2, l3 = blocks[a].l, blocks[b].l, blocks[c].l
            with _default_dtype(torch.float64):  # e3nn derives the 3j symbols in the default dtype
                w3j = o3.wigner_3j(l1, l2, l3, dtype=torch.float64)
            w3j = w3j * math.sqrt(2 * l3 + 1) / math.sqrt(into[c])
            coupling[p, offsets[a]:offsets[a] + 2 * l1 + 1, offsets[b]:offsets[b] + 2 * l2 + 1,
                     offsets[c]:offsets[c] + 2 * l3 + 1] = w3j
        self.register_buffer("coupling", coupling, persistent=False)
        order = channel_components(irreps)
        self.register_buffer("to_channels", order, persistent=False)
        self.register_buffer("from_channels", torch.argsort(order), persistent=False)
        self.weight = torch.nn.Parameter(torch.ones(len(paths), self.channels, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_square(x, self.weight, self.coupling.to(x.dtype), self.to_channels, self.from_channels,
                              self.channels)
