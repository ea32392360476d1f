"""What a property model predicts, and labelled sets of structures for it.

A ``Target`` names one quantity of a structure and how per-atom readouts pool into it:

- ``sum``     extensive: Σ_i (per-atom term + a per-element reference) — U0, ZPVE, Cv, α …
- ``mean``    intensive: the mean of per-atom terms — HOMO, LUMO, gap;
- ``extent``  a spatial extent such as ⟨R²⟩: Σ_i (per-atom term + a per-element reference)·|r_i − r̄|²,
              r̄ the centroid of the atoms — it grows with the square of the molecule's size, which
              a plain sum of local terms cannot follow;
- ``dipole``  |μ| from per-atom charges and dipoles, μ = Σ_i q_i (r_i − r̄) + Σ_i μ_i, with the
              charges made to sum to zero (QM9 molecules are neutral), in Debye;
- ``state``   an electronic state's potential energy surface: E_s = Σ_i ε_i,s plus references,
              with forces −∂E_s/∂r (multi-state PSB3).

``PropertySet`` holds the graphs of a file with a label matrix: one column per scalar target,
and per state the energy and the forces.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence

import numpy as np

from .. import keys
from ..data import DataError, TypeMap, collate, frames_to_graphs, read_frames

POOLINGS = ("sum", "mean", "extent", "dipole", "state")
E_ANGSTROM_IN_DEBYE = 4.803204  # 1 e·Å in Debye


@dataclasses.dataclass(frozen=True)
class Target:
    """One predicted quantity; ``key`` is where a file stores it (``atoms.info``; for a state,
    the energy key, and ``forces_key`` the per-atom forces)."""

    name: str
    pooling: str
    unit: str = ""
    key: str = ""
    forces_key: str = ""

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"target {self.name!r}: pooling {self.pooling!r}; expected one of {list(POOLINGS)}")
        if not self.key:
            object.__setattr__(self, "key", self.name)
        if self.pooling == "state" and not self.forces_key:
            raise ValueError(f"target {self.name!r}: a state needs the key of its forces (forces_key)")


def state_targets(n_states: int, energy_key: str = "energy_s{}", forces_key: str = "forces_s{}") -> List[Target]:
    """S0..S{n-1} as ``state`` targets read from ``energy_s0``/``forces_s0`` … (eV, eV/Å)."""
    return [Target(f"S{s}", "state", "eV", energy_key.format(s), forces_key.format(s)) for s in range(n_states)]


def split_targets(targets: Sequence[Target]):
    """(scalar targets, state targets), each in the given order."""
    return [t for t in targets if t.pooling != "state"], [t for t in targets if t.pooling == "state"]


@dataclasses.dataclass
class PropertySet:
    """Graphs of one file and their labels: ``values`` [B, T] for the scalar targets,
    ``state_energies`` [B, S] (eV) and ``state_forces`` (one [N_b, S, 3] array per structure)."""

    graphs: list
    values: np.ndarray
    state_energies: np.ndarray
    state_forces: List[np.ndarray]
    source: str = ""

    def __len__(self) -> int:
        return len(self.graphs)

    def subset(self, indices: Sequence[int]) -> "PropertySet":
        indices = list(indices)
        return PropertySet(
            [self.graphs[i] for i in indices], self.values[indices], self.state_energies[indices],
            [self.state_forces[i] for i in indices], self.source,
        )

    def batch(self, indices: Sequence[int], dtype=None) -> Dict[str, object]:
        """The collated structures ``indices`` with their labels (``keys.PROPERTIES`` …)."""
        import torch

        indices = list(indices)
        batch = collate([self.graphs[i] for i in indices], dtype=dtype)
        dtype = batch[keys.POSITIONS].dtype
        if self.values.shape[1]:
            batch[keys.PROPERTIES] = torch.from_numpy(self.values[indices]).to(dtype)
        if self.state_energies.shape[1]:
            batch[keys.STATE_ENERGIES] = torch.from_numpy(self.state_energies[indices]).to(dtype)
            batch[keys.STATE_FORCES] = torch.from_numpy(np.concatenate([self.state_forces[i] for i in indices])).to(dtype)
        return batch


def _info_value(frame, target: Target) -> float:
    if target.key not in frame.info:
        raise DataError(f"{frame.source}: field '{target.key}' is missing (target {target.name!r}); "
                        f"this frame has {sorted(frame.info)}")
    try:
        value = float(frame.info[target.key])
    except (TypeError, ValueError):
        raise DataError(f"{frame.source}: field '{target.key}' is {frame.info[target.key]!r}, expected a number") from None
    if not np.isfinite(value):
        raise DataError(f"{frame.source}: field '{target.key}' is {value}, expected a finite number")
    return value


def read_property_set(
    path, targets: Sequence[Target], type_map: TypeMap, cutoff: float, index=":"
) -> PropertySet:
    """Reads ``path`` (extxyz) with the labels of ``targets``; ``DataError`` names the file,
    frame and field of anything missing or not finite."""
    scalars, states = split_targets(targets)
    if states:
        per_state = [read_frames(path, energy_key=t.key, forces_key=t.forces_key, index=index) for t in states]
        frames = per_state[0]
        energies = np.array([[f.energy for f in state_frames] for state_frames in per_state]).T
        forces = [np.stack([state_frames[b].forces for state_frames in per_state], axis=1) for b in range(len(frames))]
    else:
        frames = read_frames(path, index=index, require_energy=False, require_forces=False)
        energies = np.zeros((len(frames), 0))
        forces = [np.zeros((f.num_atoms, 0, 3)) for f in frames]
    values = np.array([[_info_value(f, t) for t in scalars] for f in frames], dtype=np.float64).reshape(len(frames), len(scalars))
    graphs = frames_to_graphs(frames, type_map, cutoff)
    return PropertySet(graphs, values, np.asarray(energies, dtype=np.float64), forces, source=str(path))


def element_counts(graphs, n_types: int) -> np.ndarray:
    """[B, n_types] number of atoms of each species in each structure."""
    return np.stack([np.bincount(g.species, minlength=n_types) for g in graphs]).astype(np.float64)


def squared_extent_by_element(graphs, n_types: int) -> np.ndarray:
    """[B, n_types] Σ over the atoms of each species of |r_i − r̄|² (Å²), r̄ the centroid."""
    rows = []
    for g in graphs:
        d2 = np.sum((g.positions - g.positions.mean(axis=0)) ** 2, axis=1)
        rows.append(np.bincount(g.species, weights=d2, minlength=n_types))
    return np.stack(rows)


def fit_per_element(counts: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Least-squares per-element contributions c with counts @ c ≈ values (ridge 1e-8 for
    elements that always come together)."""
    gram = counts.T @ counts + 1e-8 * np.eye(counts.shape[1])
    return np.linalg.solve(gram, counts.T @ values)


@dataclasses.dataclass
class TargetStatistics:
    """Per-target normalisation measured on a training set (all in the targets' units)."""

    shift: List[float]  # mean of intensive targets; 0 otherwise
    scale: List[float]  # spread of what the network must learn per atom (or per structure)
    references: List[List[float]]  # [T + S][n_types] per-element terms of sum and state targets
    # spread over structures of what is left after the references: the loss divides each scalar
    # target's error by it, so extensive and intensive targets weigh alike
    loss_scale: List[float] = dataclasses.field(default_factory=list)

    @classmethod
    def measure(cls, data: PropertySet, targets: Sequence[Target], n_types: int) -> "TargetStatistics":
        scalars, states = split_targets(targets)
        counts = element_counts(data.graphs, n_types)
        n_atoms = counts.sum(axis=1)
        shift, scale, references, loss_scale = [], [], [], []
        columns = [(t, data.values[:, k]) for k, t in enumerate(scalars)]
        columns += [(t, data.state_energies[:, k]) for k, t in enumerate(states)]
        for target, column in columns:
            reference = np.zeros(n_types)
            if target.pooling in ("sum", "state", "extent"):
                design = squared_extent_by_element(data.graphs, n_types) if target.pooling == "extent" else counts
                reference = fit_per_element(design, column)
                # per atom, and for an extent per unit of Σ|r_i − r̄|²
                size = design.sum(axis=1) if target.pooling == "extent" else n_atoms
                residual = (column - design @ reference) / np.maximum(size, 1e-12)
                spread, centre = residual.std(), 0.0
                structure_spread = (column - design @ reference).std()
            elif target.pooling == "mean":
                spread, centre = column.std(), column.mean()
                structure_spread = spread
            else:  # dipole: per-atom charges of a few tenths of e
                spread, centre = 0.1, 0.0
                structure_spread = column.std()
            if target.pooling == "state":  # forces set the scale of an energy surface
                all_forces = np.concatenate([f[:, states.index(target)].ravel() for f in data.state_forces])
                spread = float(np.sqrt(np.mean(all_forces**2)))
            if target.pooling == "state":
                structure_spread = spread  # the state loss has its own per-atom normalisation
            shift.append(float(centre))
            scale.append(float(spread) if spread > 1e-12 else 1.0)
            loss_scale.append(float(structure_spread) if structure_spread > 1e-12 else 1.0)
            references.append([float(x) for x in reference])
        return cls(shift, scale, references, loss_scale)


def average_neighbours(graphs) -> float:
    return float(np.mean([g.num_edges / g.num_atoms for g in graphs]))


def type_map_of(paths: Sequence, extra: Optional[Sequence[str]] = None) -> TypeMap:
    """The elements found in ``paths`` (sorted by atomic number), plus ``extra`` symbols."""
    frames = []
    for path in paths:
        frames += read_frames(path, require_energy=False, require_forces=False)
    type_map = TypeMap.from_frames(frames)
    names = list(type_map.type_names) + [s for s in (extra or []) if s not in type_map.type_names]
    return TypeMap(names)
