"""The deployable's network: ``DeployedPosterior``, the TorchScript module LAMMPS runs.

Shell mode (``forward``: every member, or one with ``forward_member``), layer mode (per
member: ``embed``, ``layer``, ``head``; all members at once: ``embed_all``, ``layer_all``,
``head_all``). The contract is in ``pair_bayesrace/README.md``; the metadata and the export
itself are in ``_deployable``.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from .. import keys
from ..bayes._feature_density import member_distances
from ._errors import ExportError


class DeployedPosterior(torch.nn.Module):
    """M RACE members behind the deployable's forward() (shell mode), its per-member
    layer-mode methods ``layer_widths``, ``n_readout``, ``embed``, ``layer``, ``head``
    (issue 11: the per-layer halo exchange; ``bayesrace.export.layered_evaluate`` is
    their reference use) and the same methods for all members at once, ``embed_all``,
    ``layer_all``, ``head_all`` (``bayesrace.model.StackedRace``), which forward() and the
    C++ core use: one pass evaluates every member."""

    def __init__(self, members: List[torch.nn.Module], feature_density: Optional[Dict[str, object]] = None):
        super().__init__()
        from ..bayes import feature_columns
        from ..model import StackedRace

        self.members = torch.nn.ModuleList(members)
        self.n_members = len(members)
        try:
            self.stacked = StackedRace(members)
            # each member alone, for forward_member (its weights stacked once more: a copy)
            self.singles = torch.nn.ModuleList([StackedRace([member]) for member in members])
        except ValueError as error:
            raise ExportError(f"the members cannot be evaluated together: {error}") from None
        self.feature_widths: List[int] = list(self.stacked.widths)
        self.readout_width: int = int(members[0].readout_width())
        # the feature density (bayes._feature_density): each layer's readout is followed by the
        # F scalar channels of h_{k+1}, and the heads report each member's feature distance
        dtype = members[0].energy_scale.dtype
        self.has_feature_density = feature_density is not None
        self.register_buffer("density_mean", torch.zeros(0, dtype=dtype))
        self.register_buffer("density_whiten", torch.zeros(0, dtype=dtype))
        if feature_density is not None:
            index = feature_columns(members[0])
            mean = torch.as_tensor(feature_density["mean"]).to(dtype)
            if mean.shape[0] != self.n_members or mean.shape[2] != index.numel():
                raise ExportError(f"feature_density.mean has shape {list(mean.shape)}, the members need "
                                  f"[{self.n_members}, S, {index.numel()}]")
            self.density_mean = mean
            self.density_whiten = torch.as_tensor(feature_density["whiten"]).to(dtype)
            for stacked in [self.stacked] + list(self.singles):
                stacked.set_feature_columns(index)
        self.n_density_columns: int = int(self.stacked.feature_index.shape[1])

    # -- all members in one pass: features [N, M * d_k], member-major within a row --------
    @torch.jit.export
    def embed_all(self, species: torch.Tensor) -> torch.Tensor:
        """h_0 of every atom and member, [N, M * d_0] (species only: ghosts too)."""
        h = self.stacked.embed(species)[0]
        return h.transpose(0, 1).reshape(species.shape[0], self.n_members * self.feature_widths[0])

    @torch.jit.export
    def layer_all(
        self,
        index: int,
        h: torch.Tensor,
        species: torch.Tensor,
        edge_index: torch.Tensor,
        edge_vectors: torch.Tensor,
        n_local: int,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``layer`` for all members: h_index [N, M * d_index] and edge vectors [M, E, 3]
        (one copy per member, so that autograd keeps the members' forces apart) →
        (h_{index+1} [n_local, M * d_{index+1}], r_index [M, n_local, n_out])."""
        widths = self.feature_widths
        m = self.n_members
        n_atoms = species.shape[0]
        if index < 0 or index >= len(widths) - 1:
            raise IndexError(f"layer {index} out of range (the deployable has {len(widths) - 1})")
        if h.dim() != 2 or h.shape[0] != n_atoms or h.shape[1] != m * widths[index]:
            raise ValueError(f"layer_all {index} needs h of shape [{n_atoms}, {m * widths[index]}], got {list(h.shape)}")
        if edge_vectors.dim() != 3 or edge_vectors.shape[0] != m or edge_vectors.shape[1] != edge_index.shape[1]:
            raise ValueError(f"layer_all needs edge vectors of shape [{m}, {edge_index.shape[1]}, 3]")
        if edge_index.shape[1] > 0 and int(edge_index[0].max()) >= n_local:
            raise ValueError("layer mode needs every edge centre < n_local (edges of local atoms only)")
        features = h.reshape(n_atoms, m, widths[index]).transpose(0, 1)
        initial = self.stacked.embed(species)[1]
        radial, sh = self.stacked.edge_geometry(edge_vectors)
        h_next, readout = self.stacked.interaction(index, features, species, initial, radial, sh, edge_index, n_local)
        return h_next.transpose(0, 1).reshape(n_local, m * widths[index + 1]), readout

    @torch.jit.export
    def head_all(
        self, readouts: torch.Tensor, species: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``head`` for all members: readouts [K, M, n_local, n_readout()] → (atomic energy [M, n_local],
        log-variance [M, n_local], force covariance [M, n_local, 3, 3], feature distance
        [M, n_local], or [M, 0] without a feature density)."""
        energies: List[torch.Tensor] = []
        log_vars: List[torch.Tensor] = []
        covariances: List[torch.Tensor] = []
        distances: List[torch.Tensor] = []
        for m, module in enumerate(self.members):
            energy, log_var, covariance = module.combine_readouts(readouts[:, m, :, :self.readout_width], species)
            energies.append(energy)
            log_vars.append(log_var)
            covariances.append(covariance)
            distances.append(self._feature_distance(m, readouts[:, m], species))
        return torch.stack(energies), torch.stack(log_vars), torch.stack(covariances), torch.stack(distances)

    def _feature_distance(self, member: int, readouts: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        """Member ``member``'s feature distance [n] from its readouts [K, n, n_readout()] ([0] without a density)."""
        if not self.has_feature_density:
            return torch.zeros(0, dtype=readouts.dtype, device=readouts.device)
        n = readouts.shape[1]
        features = readouts[:, :, self.readout_width:].transpose(0, 1).reshape(n, -1)  # layer after layer
        return member_distances(features, species, self.density_mean[member], self.density_whiten[member])

    # -- layer mode (HALO_SPEC.md): one layer at a time, the caller exchanges ghost rows --
    @torch.jit.export
    def layer_widths(self) -> List[int]:
        """[d_0, ..., d_K]: the width of the flattened node features h_k of one member."""
        return self.feature_widths

    @torch.jit.export
    def n_readout(self) -> int:
        """The width of one layer's readout r_k: n_out, plus the F feature channels with a feature density."""
        return self.readout_width + self.n_density_columns

    @torch.jit.export
    def embed(self, member: int, species: torch.Tensor) -> torch.Tensor:
        """h_0 [N, d_0] of every atom of member ``member`` (species only: ghosts too)."""
        result: Optional[torch.Tensor] = None
        for m, module in enumerate(self.members):
            if m == member:
                # every floating buffer was converted to the deployable's dtype on export
                result = module.embed_species(species, module.energy_scale.dtype)[1]
        if result is None:
            raise IndexError(f"member {member} out of range (the deployable has {self.n_members})")
        return result

    @torch.jit.export
    def layer(
        self,
        member: int,
        index: int,
        h: torch.Tensor,
        species: torch.Tensor,
        edge_index: torch.Tensor,
        edge_vectors: torch.Tensor,
        n_local: int,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(h_{index+1} [n_local, d_{index+1}], r_index [n_local, n_out]) of the local atoms
        from h_index of every atom [N, d_index]; every edge centre must be < n_local.
        The edge geometry is computed here from ``edge_vectors``, so autograd reaches them
        from every layer."""
        widths = self.layer_widths()
        if index < 0 or index >= len(widths) - 1:
            raise IndexError(f"layer {index} out of range (the deployable has {len(widths) - 1})")
        if h.dim() != 2 or h.shape[1] != widths[index] or h.shape[0] != species.shape[0]:
            raise ValueError(f"layer {index} needs h of shape [{species.shape[0]}, {widths[index]}], got {list(h.shape)}")
        if edge_index.shape[1] > 0 and int(edge_index[0].max()) >= n_local:
            raise ValueError("layer mode needs every edge centre < n_local (edges of local atoms only)")
        result: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        for m, module in enumerate(self.members):
            if m == member:
                h_next, readout = module.layer_step(index, h, species, edge_index, edge_vectors, n_local)
                if self.has_feature_density:
                    readout = torch.cat([readout, h_next.detach()[:, self.stacked.feature_index[index]]], dim=1)
                result = (h_next, readout)
        if result is None:
            raise IndexError(f"member {member} out of range (the deployable has {self.n_members})")
        return result

    @torch.jit.export
    def head(
        self, member: int, readouts: torch.Tensor, species: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(atomic energy, atomic_energy_log_var, force_covariance, feature distance) of the
        local atoms from the stacked readouts [K, n_local, n_readout()], exactly as
        ``RACE.atomic_outputs`` (the distance [0] without a feature density)."""
        result: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = None
        for m, module in enumerate(self.members):
            if m == member:
                energy, log_var, covariance = module.combine_readouts(readouts[:, :, :self.readout_width], species)
                result = (energy, log_var, covariance, self._feature_distance(m, readouts, species))
        if result is None:
            raise IndexError(f"member {member} out of range (the deployable has {self.n_members})")
        return result

    @torch.jit.export
    def forward_member(
        self,
        member: int,
        positions: torch.Tensor,
        species: torch.Tensor,
        edge_index: torch.Tensor,
        edge_shifts: torch.Tensor,
        n_local: int,
        compute_atomic_virial: bool,
    ) -> Dict[str, torch.Tensor]:
        """``forward`` of member ``member`` alone (the dict's member axis has length 1):
        what the pair style evaluates for ``dynamics member K`` on steps without uncertainty,
        at the cost of one network instead of M."""
        result: Optional[Dict[str, torch.Tensor]] = None
        for m, single in enumerate(self.singles):
            if m == member:
                base, vectors = self._edge_vectors(positions, edge_index, edge_shifts, 1)
                readouts = single(species, edge_index, vectors)  # [K, 1, N, n_out]
                result = self._outputs(positions, edge_index, base, vectors, self.head_one(m, readouts, species),
                                       n_local, compute_atomic_virial)
        if result is None:
            raise IndexError(f"member {member} out of range (the deployable has {self.n_members})")
        return result

    def head_one(self, member: int, readouts: torch.Tensor,
                 species: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``head_all`` for member ``member`` alone: readouts [K, 1, n_local, n_readout()]."""
        energy, log_var, covariance, distance = self.head(member, readouts[:, 0], species)
        return energy.unsqueeze(0), log_var.unsqueeze(0), covariance.unsqueeze(0), distance.unsqueeze(0)

    def forward(
        self,
        positions: torch.Tensor,
        species: torch.Tensor,
        edge_index: torch.Tensor,
        edge_shifts: torch.Tensor,
        n_local: int,
        compute_atomic_virial: bool,
    ) -> Dict[str, torch.Tensor]:
        base, vectors = self._edge_vectors(positions, edge_index, edge_shifts, self.n_members)
        readouts = self.stacked(species, edge_index, vectors)  # [K, M, N, n_out]
        return self._outputs(positions, edge_index, base, vectors, self.head_all(readouts, species), n_local,
                             compute_atomic_virial)

    def _edge_vectors(self, positions: torch.Tensor, edge_index: torch.Tensor, edge_shifts: torch.Tensor,
                      copies: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The edge vectors [E, 3] and ``copies`` copies of them [copies, E, 3] to differentiate."""
        # gradients are taken with respect to the edge vectors, not positions: the same
        # code then serves isolated molecules, periodic images and LAMMPS ghost atoms
        base = (positions[edge_index[1]] - positions[edge_index[0]] + edge_shifts).detach()
        if not torch.is_grad_enabled():
            # forces come from autograd: under no_grad they would silently be zero
            raise RuntimeError("the bayesrace deployable needs autograd enabled (do not call it under torch.no_grad)")
        # one copy of the edge vectors per member: the gradient of the summed energies then
        # holds each member's own dE/dr
        return base, base.unsqueeze(0).expand(copies, base.shape[0], 3).clone().requires_grad_(True)

    def _outputs(
        self,
        positions: torch.Tensor,
        edge_index: torch.Tensor,
        base: torch.Tensor,
        vectors: torch.Tensor,
        heads: Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        n_local: int,
        compute_atomic_virial: bool,
    ) -> Dict[str, torch.Tensor]:
        """The contract's dict from the members' heads [m, N, ...]: energies, and forces and
        virials by autograd through ``vectors`` [m, E, 3]."""
        atomic_energy, log_var, covariance, distance = heads
        n_atoms = positions.shape[0]
        centre = edge_index[0]
        neighbour = edge_index[1]
        # only local atoms count: ghosts are copies owned by another domain
        member_energy = atomic_energy[:, :n_local].sum(dim=1)
        g: Optional[torch.Tensor] = None
        if member_energy.requires_grad:
            g = torch.autograd.grad([member_energy.sum()], [vectors], allow_unused=True)[0]
        if g is None:
            g = torch.zeros_like(vectors)
        forces: List[torch.Tensor] = []
        virials: List[torch.Tensor] = []
        atomic_virials: List[torch.Tensor] = []
        for member in range(vectors.shape[0]):
            gm = g[member]
            # r_ij = x_j - x_i + shift: dE/dx_i = -g and dE/dx_j = +g, F = -dE/dx
            forces.append(torch.zeros_like(positions).index_add(0, centre, gm).index_add(0, neighbour, -gm))
            edge_virial = -base.unsqueeze(2) * gm.unsqueeze(1)  # [E, 3, 3], LAMMPS sign
            virials.append(edge_virial.sum(dim=0))
            if compute_atomic_virial:
                half = 0.5 * edge_virial
                w = torch.zeros(n_atoms, 3, 3, dtype=base.dtype, device=base.device)
                atomic_virials.append(w.index_add(0, centre, half).index_add(0, neighbour, half))
        if compute_atomic_virial:
            member_atomic_virial = torch.stack(atomic_virials)
        else:
            member_atomic_virial = torch.empty(0, dtype=positions.dtype, device=positions.device)
        return {
            keys.MEMBER_ENERGY: member_energy.detach(),
            keys.MEMBER_ATOMIC_ENERGY: atomic_energy.detach(),
            keys.MEMBER_FORCES: torch.stack(forces),
            keys.MEMBER_VIRIAL: torch.stack(virials),
            keys.MEMBER_ATOMIC_VIRIAL: member_atomic_virial,
            keys.ATOMIC_ENERGY_LOG_VAR: log_var.detach(),
            keys.FORCE_COVARIANCE: covariance.detach(),
            keys.MEMBER_FEATURE_DISTANCE: distance.detach(),
        }
