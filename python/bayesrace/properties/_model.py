"""RACE with property readouts: molecular properties (QM9) and several electronic states.

The trunk is RACE's: species embedding, the fixed initial feature a⁽¹⁾ in every layer
(restratification) and the same interaction layers (``bayesrace.model._race.RaceLayer``).
Only the per-layer readouts differ: per atom and layer they give, for each scalar target, a
value and a log-variance; for the dipole, a charge, a log-variance and one vector (l=1);
for each state, an energy, an energy log-variance and a force log-variance. Values are
summed over layers and log-variances averaged, as in RACE's energy model; each target then
pools its per-atom values as its ``pooling`` says (``_targets``).
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from .. import keys
from ..model import ModelConfig, add_trunk
from ._targets import E_ANGSTROM_IN_DEBYE, Target, TargetStatistics, split_targets

STATE_FORCE_VARIANCE_FLOOR = 1e-4  # (eV/Å)² added to every state's force variance


class PropertyRACE(torch.nn.Module):
    """``forward(batch)`` returns ``keys.PROPERTIES`` / ``PROPERTY_VARIANCE`` [B, T] for the
    scalar targets (and ``DIPOLE`` when one of them is the dipole), and ``STATE_ENERGIES`` /
    ``STATE_ENERGY_VARIANCE`` [B, S], ``STATE_FORCES`` [N, S, 3] and ``STATE_FORCE_VARIANCE``
    [N, S] for the states."""

    def __init__(self, config: ModelConfig, type_names: Sequence[str], targets: Sequence[Target],
                 statistics: TargetStatistics):
        super().__init__()
        config.validate()
        if config.avg_num_neighbors <= 0:
            raise ValueError("model.avg_num_neighbors must be set (measured on training data) before building")
        self.config = config
        self.type_names = list(type_names)
        self.targets = list(targets)
        scalars, states = split_targets(targets)
        if [t.name for t in scalars + states] != [t.name for t in targets]:
            raise ValueError("list the scalar targets before the states")
        if sum(t.pooling == "dipole" for t in scalars) > 1:
            raise ValueError("at most one dipole target")
        self.n_scalars, self.n_states = len(scalars), len(states)
        self.poolings = [t.pooling for t in scalars]
        self.dipole_column = next((k for k, t in enumerate(scalars) if t.pooling == "dipole"), -1)
        self.cutoff = float(config.cutoff)
        n_species = len(type_names)
        n_out = 2 * self.n_scalars + 3 * self.n_states
        add_trunk(self, config, n_species, n_out, 1 if self.dipole_column >= 0 else 0)
        n_columns = self.n_scalars + self.n_states
        if len(statistics.scale) != n_columns:
            raise ValueError(f"statistics for {len(statistics.scale)} targets, the model has {n_columns}")
        self.register_buffer("shift", torch.tensor(statistics.shift, dtype=torch.float64))
        self.register_buffer("scale", torch.tensor(statistics.scale, dtype=torch.float64))
        loss_scale = statistics.loss_scale or statistics.scale
        self.register_buffer("loss_scale", torch.tensor(loss_scale, dtype=torch.float64))
        self.register_buffer("references", torch.tensor(statistics.references, dtype=torch.float64).reshape(n_columns, n_species))

    def per_atom_outputs(self, batch: Dict[str, torch.Tensor], edge_vectors: torch.Tensor):
        """(scalars [N, n_out] summed/averaged over layers as described, vectors [N, 3] or None)."""
        species = batch[keys.SPECIES]
        centre, neighbour = batch[keys.EDGE_INDEX]
        dtype = edge_vectors.dtype
        lengths = torch.sqrt(torch.sum(edge_vectors * edge_vectors, dim=1))
        radial, sh = self.radial_basis(lengths), self.spherical_harmonics(edge_vectors)
        one_hot = torch.nn.functional.one_hot(species, len(self.type_names)).to(dtype)
        h = self.embedding(one_hot)
        initial = self.initial_feature(h)
        outputs = []
        for layer, readout in zip(self.layers, self.readouts):
            h = layer(h, one_hot, initial, radial, sh, centre, neighbour)
            outputs.append(readout(h))
        stacked = torch.stack(outputs)  # [layers, N, n_out (+3)]
        n_out = 2 * self.n_scalars + 3 * self.n_states
        values = stacked[..., :n_out]
        is_value = torch.zeros(n_out, dtype=torch.bool, device=values.device)
        is_value[0 : 2 * self.n_scalars : 2] = True  # scalar targets: (value, log-variance) pairs
        is_value[2 * self.n_scalars :: 3] = True  # states: (energy, energy log-var, force log-var)
        combined = torch.where(is_value, values.sum(dim=0), values.mean(dim=0))
        vectors = stacked[..., n_out:].sum(dim=0) if self.dipole_column >= 0 else None
        return combined, vectors

    def forward(self, batch: Dict[str, torch.Tensor], compute_forces: bool = True) -> Dict[str, torch.Tensor]:
        positions = batch[keys.POSITIONS]
        species, structure = batch[keys.SPECIES], batch[keys.BATCH]
        n_structures = batch[keys.NUM_ATOMS].shape[0]
        n_atoms = batch[keys.NUM_ATOMS].to(positions.dtype)
        centre, neighbour = batch[keys.EDGE_INDEX]
        shifts = torch.einsum("ek,ekl->el", batch[keys.EDGE_CELL_SHIFT], batch[keys.CELL][structure[centre]])
        edge_vectors = (positions[neighbour] - positions[centre] + shifts).detach()
        want_forces = compute_forces and self.n_states > 0
        if want_forces:
            edge_vectors.requires_grad_(True)
        per_atom, vectors = self.per_atom_outputs(batch, edge_vectors)
        scale, dtype = self.scale.to(positions.dtype), positions.dtype

        def pool_sum(x):
            return torch.zeros(n_structures, dtype=dtype, device=x.device).index_add(0, structure, x)

        out: Dict[str, torch.Tensor] = {}
        means, variances = [], []
        centroid = torch.zeros(n_structures, 3, dtype=dtype, device=positions.device).index_add(
            0, structure, positions) / n_atoms[:, None]
        squared_extent = torch.sum((positions - centroid[structure]) ** 2, dim=1)  # |r_i − r̄|², Å²
        for k, pooling in enumerate(self.poolings):
            value, log_var = per_atom[:, 2 * k], per_atom[:, 2 * k + 1]
            if pooling == "sum":
                mean = pool_sum(scale[k] * value + self.references[k].to(dtype)[species])
            elif pooling == "extent":
                mean = pool_sum((scale[k] * value + self.references[k].to(dtype)[species]) * squared_extent)
            elif pooling == "mean":
                mean = self.shift[k].to(dtype) + scale[k] * pool_sum(value) / n_atoms
            else:
                mean = self._dipole(out, scale[k] * value, scale[k] * vectors, positions - centroid[structure],
                                    structure, n_atoms, pool_sum)
            means.append(mean)
            variances.append(torch.exp(pool_sum(log_var) / n_atoms) * scale[k] ** 2)
        if self.n_scalars:
            out[keys.PROPERTIES] = torch.stack(means, dim=1)
            out[keys.PROPERTY_VARIANCE] = torch.stack(variances, dim=1)
        if self.n_states:
            base = 2 * self.n_scalars
            energies, energy_vars, force_vars = [], [], []
            for s in range(self.n_states):
                k = self.n_scalars + s
                atomic = scale[k] * per_atom[:, base + 3 * s] + self.references[k].to(dtype)[species]
                energies.append(pool_sum(atomic))
                energy_vars.append(torch.exp(pool_sum(per_atom[:, base + 3 * s + 1]) / n_atoms) * scale[k] ** 2)
                force_vars.append(torch.exp(per_atom[:, base + 3 * s + 2]) * scale[k] ** 2 + STATE_FORCE_VARIANCE_FLOOR)
            out[keys.STATE_ENERGIES] = torch.stack(energies, dim=1)
            out[keys.STATE_ENERGY_VARIANCE] = torch.stack(energy_vars, dim=1)
            out[keys.STATE_FORCE_VARIANCE] = torch.stack(force_vars, dim=1)
            if want_forces:
                out[keys.STATE_FORCES] = self._state_forces(energies, edge_vectors, centre, neighbour, positions)
        return out

    def _dipole(self, out, charges, atomic_dipoles, relative_positions, structure, n_atoms, pool_sum):
        """|Σ q_i (r_i − r̄) + Σ μ_i| in Debye, the charges shifted to sum to zero per structure."""
        charges = charges - (pool_sum(charges) / n_atoms)[structure]
        n_structures = n_atoms.shape[0]
        per_atom = charges[:, None] * relative_positions + atomic_dipoles
        dipole = torch.zeros(n_structures, 3, dtype=relative_positions.dtype, device=relative_positions.device).index_add(
            0, structure, per_atom) * E_ANGSTROM_IN_DEBYE
        out[keys.DIPOLE] = dipole
        out[keys.ATOMIC_CHARGES] = charges
        # the small constant keeps the gradient of |μ| finite for symmetric molecules (μ = 0)
        return torch.sqrt(torch.sum(dipole * dipole, dim=1) + 1e-12)

    def _state_forces(self, energies: List[torch.Tensor], edge_vectors, centre, neighbour, positions):
        forces = []
        for s, energy in enumerate(energies):
            # create_graph when training: the force loss is differentiated with respect to the weights
            (dE_dr,) = torch.autograd.grad([energy.sum()], [edge_vectors], create_graph=self.training,
                                           retain_graph=self.training or s + 1 < len(energies))
            forces.append(torch.zeros_like(positions).index_add(0, centre, dE_dr).index_add(0, neighbour, -dE_dr))
        return torch.stack(forces, dim=1)


def build_property_model(config: ModelConfig, type_names, targets, statistics, seed: int = 0,
                         dtype: torch.dtype = torch.float64) -> PropertyRACE:
    torch.manual_seed(seed)
    return PropertyRACE(config, type_names, targets, statistics).to(dtype)

