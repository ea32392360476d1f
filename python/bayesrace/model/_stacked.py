"""M RACE members evaluated in one pass: weights stacked along a member axis.

A posterior's members (deep-ensemble members, SWAG/IVON/Laplace draws) share one
architecture and differ only in their weights, so every step of the network can run for
all of them at once: node features are [M, N, d], edge tensors [M, E, ...], and each
linear map is one batched matrix product instead of M small ones. The code is plain torch
(no e3nn at run time): the exact coefficients of the e3nn modules — the dense matrix of
each linear map, the restratification constants, the activation's normalisation — are
read off the members once, by evaluating them on unit inputs, and the message products
are the members' own ``MessagePaths`` (``_paths``), so the result equals
``RACE.atomic_outputs`` member by member to round-off (tests/model/test_stacked.py).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ._message_square import channel_square
from ._race import RACE
from ._radial import isolation_gate


def _dense(linear: torch.nn.Module, width_in: int, dtype: torch.dtype) -> torch.Tensor:
    """The [d_in, d_out] matrix of a linear module without bias: its image of the identity."""
    with torch.no_grad():
        return linear(torch.eye(width_in, dtype=dtype)).detach().clone()


def _stack(tensors: List[torch.Tensor]) -> torch.Tensor:
    return torch.stack(tensors).contiguous()


def _activation_constant(act: torch.nn.Module) -> float:
    """c with act(x) = c·silu(x) (e3nn's normalize2mom of SiLU); refuses anything else."""
    x = torch.linspace(-4.0, 4.0, 33, dtype=torch.float64)
    with torch.no_grad():
        c = float(getattr(act, "cst", 1.0)) if not getattr(act, "_is_id", False) else 1.0
        if not torch.allclose(act(x), c * torch.nn.functional.silu(x), rtol=1e-12, atol=1e-14):
            raise ValueError("stacked evaluation supports SiLU radial MLPs only")
    return c


class StackedLayer(torch.nn.Module):
    """One RACE layer and its readout for M members (see ``RaceLayer`` and ``Readout``)."""

    def __init__(self, layers: List[torch.nn.Module], readouts: List[torch.nn.Module], n_species: int,
                 dtype: torch.dtype):
        super().__init__()
        first = layers[0]
        d_in = first.linear_up.irreps_in.dim
        self.width_out = first.linear_out.irreps_out.dim
        # skip: bilinear in (h, one-hot species) → one [d_in, d_out] matrix per species
        skips = []
        for layer in layers:
            per_species = []
            for s in range(n_species):
                one_hot = torch.zeros(d_in, n_species, dtype=dtype)
                one_hot[:, s] = 1.0
                with torch.no_grad():
                    per_species.append(layer.skip(torch.eye(d_in, dtype=dtype), one_hot))
            skips.append(torch.cat(per_species, dim=1))  # [d_in, S * d_out]
        self.register_buffer("skip", _stack(skips))
        self.n_species = n_species
        # the members' own message paths (parameter-free, the same for every member); linear_up
        # writes and linear_down reads their component-major layout
        self.messages = first.paths
        self.register_buffer("linear_up", _stack([_dense(l.linear_up, d_in, dtype)[:, first.up_order] for l in layers]))
        mlps = [list(l.radial_mlp.children()) for l in layers]
        self.n_mlp = len(mlps[0])
        weights = []
        for k in range(self.n_mlp):
            # e3nn divides by sqrt(fan-in · var_in / var_out) in the last layer, sqrt(fan-in · var_in) before
            scale = []
            for mlp in mlps:
                lay = mlp[k]
                denom = lay.h_in * lay.var_in if lay.act is not None else lay.h_in * lay.var_in / lay.var_out
                scale.append((lay.weight / denom ** 0.5).detach().to(dtype))
            weights.append(_stack(scale))
        self.mlp_weights = torch.nn.ParameterList(
            [torch.nn.Parameter(w, requires_grad=False) for w in weights])
        activations = [mlp[k] for mlp in mlps for k in range(self.n_mlp - 1)]
        constants = {_activation_constant(lay.act) for lay in activations}
        out_scales = {float(lay.var_out) ** 0.5 for lay in activations}
        if len(constants) > 1 or len(out_scales) > 1:
            raise ValueError("stacked evaluation needs the same radial activation in every member")
        self.act_scale = (constants.pop() if constants else 1.0) * (out_scales.pop() if out_scales else 1.0)
        d_msg = first.message_product.irreps_out.dim
        self.register_buffer("linear_down", _stack(
            [_dense(l.linear_down, d_msg, dtype)[self.messages.message_order] for l in layers]))
        # restratification: out[k] = a⁽¹⁾[channel(k)] · h[k] · c[k] (channel-wise, no weights)
        d_hidden = self.width_out
        n_channels = first.restratify.irreps_in1.dim
        channel = torch.zeros(d_hidden, dtype=torch.int64)
        coefficient = torch.zeros(d_hidden, dtype=dtype)
        with torch.no_grad():
            probe = first.restratify(torch.eye(n_channels, dtype=dtype), torch.ones(n_channels, d_hidden, dtype=dtype))
        for k in range(d_hidden):
            nonzero = torch.nonzero(probe[:, k]).reshape(-1)
            if nonzero.numel() > 1:
                raise ValueError("restratification mixes channels: stacked evaluation does not apply")
            if nonzero.numel() == 1:
                channel[k] = nonzero[0]
                coefficient[k] = probe[nonzero[0], k]
        self.register_buffer("restratify_channel", channel)
        self.register_buffer("restratify_coefficient", coefficient)
        self.register_buffer("linear_out", _stack([_dense(l.linear_out, d_hidden, dtype) for l in layers]))
        # the message square (``_message_square``): its coupling is the same for every member
        # (empty placeholders without it: TorchScript needs the attributes either way)
        self.has_square = bool(first.has_square)
        empty, no_index = torch.zeros(0, dtype=dtype), torch.zeros(0, dtype=torch.int64)
        square = first.square
        self.register_buffer("square_weight", _stack([l.square.weight.detach().to(dtype) for l in layers])
                             if self.has_square else empty)  # [M, P, C]
        self.register_buffer("square_coupling", square.coupling.to(dtype) if self.has_square else empty)
        self.register_buffer("square_to_channels", square.to_channels if self.has_square else no_index)
        self.register_buffer("square_from_channels", square.from_channels if self.has_square else no_index)
        self.square_channels = int(square.channels) if self.has_square else 0
        self.inv_sqrt_neighbors = float(first.inv_sqrt_neighbors)
        if any(float(l.inv_sqrt_neighbors) != self.inv_sqrt_neighbors for l in layers):
            raise ValueError("members differ in avg_num_neighbors: stacked evaluation needs one")
        # readout: linear → (parameter-free) gate → linear
        self.register_buffer("readout_in", _stack([_dense(r.linear_in, d_hidden, dtype) for r in readouts]))
        self.gate = readouts[0].gate
        mid = readouts[0].linear_out.irreps_in.dim
        self.register_buffer("readout_out", _stack([_dense(r.linear_out, mid, dtype) for r in readouts]))

    def radial_weights(self, radial: torch.Tensor) -> torch.Tensor:
        x = radial
        for k, weight in enumerate(self.mlp_weights):
            x = torch.matmul(x, weight)
            if k < self.n_mlp - 1:
                x = torch.nn.functional.silu(x) * self.act_scale
        return x

    def forward(self, h: torch.Tensor, species: torch.Tensor, initial: torch.Tensor, radial: torch.Tensor,
                sh: torch.Tensor, centre: torch.Tensor, neighbour: torch.Tensor,
                n_centres: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """h [M, N, d_in] of every atom → (h' [M, n, d_out], readout [M, n, n_out]) of the
        first n = n_centres atoms; radial [M, E, n_radial], sh [M, E, d_sh]."""
        m = h.shape[0]
        n = n_centres
        d_out = self.width_out
        h_local = h[:, :n]
        by_species = torch.matmul(h_local, self.skip).reshape(m, n, self.n_species, d_out)
        index = species[:n].reshape(1, n, 1, 1).expand(m, n, 1, d_out)
        skip = torch.gather(by_species, 2, index).squeeze(2)
        h_up = torch.matmul(h, self.linear_up)
        summed = self.messages(h_up, sh, self.radial_weights(radial), centre, neighbour, n)
        h_new = torch.matmul(summed * self.inv_sqrt_neighbors, self.linear_down)
        if self.has_square:
            h_new = h_new + channel_square(h_new, self.square_weight, self.square_coupling, self.square_to_channels,
                                           self.square_from_channels, self.square_channels)
        stratified = initial[:, :n][:, :, self.restratify_channel] * h_new * self.restratify_coefficient
        h_next = torch.matmul(stratified, self.linear_out) + skip
        mid = torch.matmul(h_next, self.readout_in)
        gated = self.gate(mid.reshape(m * n, mid.shape[2]))
        gated = gated.reshape(m, n, gated.shape[1])
        return h_next, torch.matmul(gated, self.readout_out)


class StackedRace(torch.nn.Module):
    """Every member of a posterior in one network (read the module docstring)."""

    def __init__(self, members: List[RACE]):
        super().__init__()
        if not members:
            raise ValueError("stacked evaluation needs at least one member")
        first = members[0]
        for k, member in enumerate(members):
            if member.feature_widths() != first.feature_widths() or member.readout_width() != first.readout_width() \
                    or member.type_names != first.type_names or member.config.cutoff != first.config.cutoff:
                raise ValueError(f"member {k} differs in architecture from member 0: members cannot be stacked")
        dtype = first.energy_scale.dtype
        n_species = len(first.type_names)
        self.n_members = len(members)
        self.n_layers = int(first.n_layers)
        self.spherical_harmonics = first.spherical_harmonics  # parameter-free, shared
        self.radial_basis = first.radial_basis
        eye = torch.eye(n_species, dtype=dtype)
        with torch.no_grad():
            self.register_buffer("embedding", _stack([m.embedding(eye) for m in members]))  # [M, S, d0]
        d0 = first.embedding.irreps_out.dim
        self.register_buffer("initial_feature", _stack([_dense(m.initial_feature, d0, dtype) for m in members]))
        self.layers = torch.nn.ModuleList([
            StackedLayer([m.layers[k] for m in members], [m.readouts[k] for m in members], n_species, dtype)
            for k in range(self.n_layers)])
        self.widths: List[int] = list(first.feature_widths())
        if any(m.isolated_atom_limit != first.isolated_atom_limit for m in members):
            raise ValueError("members differ in isolated_atom_limit: members cannot be stacked")
        self.isolated_atom_limit = bool(first.isolated_atom_limit)
        # each member's energy shift in units of its scale: the first readout carries it (see RACE.gate_energy)
        self.register_buffer("shift_over_scale", torch.stack(
            [(m.energy_shift / m.energy_scale).to(dtype) for m in members]).reshape(len(members), 1))
        # with set_feature_columns: these channels of h_{k+1} follow readout k's columns (the
        # feature density's input, bayes._feature_density), detached: nothing differentiates them
        self.register_buffer("feature_index", torch.zeros(self.n_layers, 0, dtype=torch.int64))
        self.with_features = False

    @torch.jit.unused
    def set_feature_columns(self, index: torch.Tensor) -> None:
        """Append h_{k+1}[:, index[k]] to readout k from now on (``index`` [K, F] int64)."""
        if index.dim() != 2 or index.shape[0] != self.n_layers:
            raise ValueError(f"feature columns must be [{self.n_layers}, F], got {list(index.shape)}")
        self.feature_index = index.to(torch.int64).clone()
        self.with_features = True

    def embed(self, species: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(h_0, a⁽¹⁾), each [M, N, d_0]: species only."""
        h = self.embedding[:, species]
        return h, torch.matmul(h, self.initial_feature)

    def edge_geometry(self, edge_vectors: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(radial basis [M, E, n_radial], spherical harmonics [M, E, d_sh]) of edge vectors [M, E, 3]."""
        m, e = edge_vectors.shape[0], edge_vectors.shape[1]
        flat = edge_vectors.reshape(m * e, 3)
        lengths = torch.sqrt(torch.sum(flat * flat, dim=1))
        radial = self.radial_basis(lengths)
        sh = self.spherical_harmonics(flat)
        return radial.reshape(m, e, radial.shape[1]), sh.reshape(m, e, sh.shape[1])

    def interaction(self, index: int, h: torch.Tensor, species: torch.Tensor, initial: torch.Tensor,
                    radial: torch.Tensor, sh: torch.Tensor, edge_index: torch.Tensor,
                    n_centres: int) -> Tuple[torch.Tensor, torch.Tensor]:
        result: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        for k, layer in enumerate(self.layers):
            if k == index:
                result = layer(h, species, initial, radial, sh, edge_index[0], edge_index[1], n_centres)
        if result is None:
            raise IndexError(f"layer {index} out of range")
        if self.isolated_atom_limit:  # as RACE.gate_energy, for [M, n, n_out] readouts
            h_next, readout = result
            energy = readout[:, :, 0]
            if index == 0:
                energy = energy + self.shift_over_scale.to(readout.dtype)
            gated = energy * isolation_gate(radial, edge_index[0], n_centres)
            result = (h_next, torch.cat([gated.unsqueeze(2), readout[:, :, 1:]], dim=2))
        if self.with_features:
            h_next, readout = result
            result = (h_next, torch.cat([readout, h_next.detach()[:, :, self.feature_index[index]]], dim=2))
        return result

    def forward(self, species: torch.Tensor, edge_index: torch.Tensor, edge_vectors: torch.Tensor) -> torch.Tensor:
        """The readouts of every layer [K, M, N, n_out] of all N atoms (every atom a centre)."""
        radial, sh = self.edge_geometry(edge_vectors)
        h, initial = self.embed(species)
        n = species.shape[0]
        per_layer: List[torch.Tensor] = []
        for index in range(self.n_layers):
            h, readout = self.interaction(index, h, species, initial, radial, sh, edge_index, n)
            per_layer.append(readout)
        return torch.stack(per_layer)

