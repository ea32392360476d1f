"""Graphs and batches: checked frames in, neighbour lists and tensors for the model out.

``frames_to_graphs`` adds species indices and a neighbour list to each ``Frame``;
``collate`` / ``iterate_batches`` turn graphs into dictionaries of torch tensors named by
``bayesrace.keys``; ``split`` divides a data set reproducibly. Two atoms on one position
(which would give NaN energies and forces) raise ``DataError`` here, whether or not the
frames came through ``read_frames``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from .. import keys
from ._frames import Frame, TypeMap, _too_close_error, _vesin

__all__ = [
    "Graph",
    "collate",
    "frames_to_graphs",
    "iterate_batches",
    "neighbour_list",
    "split",
]

# Å. Atoms closer than this count as on one position: their edge vector has no direction,
# so the spherical harmonics, and with them energies and forces, become NaN.
_COINCIDENT_DISTANCE = 1e-8


@dataclass
class Graph:
    """A frame with species indices and a neighbour list, ready to be collated."""

    species: np.ndarray  # [N] int64, index into the type map
    atomic_numbers: np.ndarray  # [N] int64
    positions: np.ndarray  # [N, 3] float64, Å
    cell: np.ndarray  # [3, 3] float64, Å
    pbc: np.ndarray  # [3] bool
    edge_index: np.ndarray  # [2, E] int64, row 0 = centre i, row 1 = neighbour j
    edge_cell_shift: np.ndarray  # [E, 3] int64, r_ij = x_j - x_i + S @ cell
    energy: float | None = None
    forces: np.ndarray | None = None
    stress: np.ndarray | None = None
    source: str = ""

    @property
    def num_atoms(self) -> int:
        return int(self.species.shape[0])

    @property
    def num_edges(self) -> int:
        return int(self.edge_index.shape[1])


# --------------------------------------------------------------------------------------
# neighbour lists and graphs


def neighbour_list(
    positions, cell, pbc, cutoff: float, numbers=None, source: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """Full neighbour list within ``cutoff`` Å, periodic images included.

    Returns ``edge_index`` [2, E] int64 (row 0 = centre i, row 1 = neighbour j) and
    ``cell_shift`` [E, 3] int64 with r_ij = x_j - x_i + S @ cell. Both directions of
    every pair are present; an atom is never its own neighbour without a cell shift.
    Edges are sorted by i, then j, then shift so that the result is reproducible.

    Two atoms (or an atom and its periodic image) on one position raise ``DataError``
    naming them and their distance; ``numbers`` (atomic numbers [N]) and ``source``
    (e.g. "file.xyz, frame 3") only make that message more precise.
    """
    positions = np.ascontiguousarray(positions, dtype=np.float64)
    pbc = np.asarray(pbc, dtype=bool).reshape(3)
    cell = np.zeros((3, 3)) if not pbc.any() else np.ascontiguousarray(cell, dtype=np.float64)
    i, j, shift, distance = _vesin(cutoff, full_list=True).compute(
        positions, cell, [bool(p) for p in pbc], quantities="ijSd", copy=True
    )
    i = np.asarray(i, dtype=np.int64)
    j = np.asarray(j, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64).reshape(-1, 3)
    distance = np.asarray(distance, dtype=np.float64)
    keep = ~((i == j) & np.all(shift == 0, axis=1))
    i, j, shift, distance = i[keep], j[keep], shift[keep], distance[keep]
    order = np.lexsort((shift[:, 2], shift[:, 1], shift[:, 0], j, i))
    i, j, shift, distance = i[order], j[order], shift[order], distance[order]
    error = _too_close_error(
        i, j, shift, distance, _COINCIDENT_DISTANCE, source, numbers, why="atoms on one position give NaN energies and forces"
    )
    if error is not None:
        raise error
    return np.stack([i, j]), np.ascontiguousarray(shift)


def frames_to_graphs(frames: Sequence[Frame], type_map: TypeMap, cutoff: float, progress: bool = False) -> list[Graph]:
    """Species indices and neighbour lists for every frame."""
    from tqdm.auto import tqdm

    graphs = []
    for frame in tqdm(frames, desc="neighbour lists", unit="frame", disable=not progress):
        edge_index, cell_shift = neighbour_list(
            frame.positions, frame.cell, frame.pbc, cutoff, numbers=frame.numbers, source=frame.source
        )
        graphs.append(
            Graph(
                species=type_map.species(frame.numbers, frame.source),
                atomic_numbers=frame.numbers,
                positions=frame.positions,
                cell=frame.cell,
                pbc=frame.pbc,
                edge_index=edge_index,
                edge_cell_shift=cell_shift,
                energy=frame.energy,
                forces=frame.forces,
                stress=frame.stress,
                source=frame.source,
            )
        )
    return graphs


# --------------------------------------------------------------------------------------
# batching


def collate(graphs: Sequence[Graph], dtype=None) -> dict[str, Any]:
    """Concatenates graphs into one batch of tensors named by ``bayesrace.keys``.

    Edge indices are offset by the atoms of the preceding structures. Labels (energy,
    forces, stress) are included only when every graph of the batch has them.
    """
    import torch

    dtype = torch.float64 if dtype is None else dtype
    if not graphs:
        raise ValueError("collate: no graphs to batch")
    num_atoms = np.array([g.num_atoms for g in graphs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(num_atoms)[:-1]])

    def floats(array) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64)).to(dtype)

    def ints(array) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))

    batch = {
        keys.POSITIONS: floats(np.concatenate([g.positions for g in graphs])),
        keys.SPECIES: ints(np.concatenate([g.species for g in graphs])),
        keys.ATOMIC_NUMBERS: ints(np.concatenate([g.atomic_numbers for g in graphs])),
        keys.CELL: floats(np.stack([g.cell for g in graphs])),
        keys.PBC: torch.from_numpy(np.stack([np.asarray(g.pbc, dtype=bool) for g in graphs])),
        keys.BATCH: ints(np.repeat(np.arange(len(graphs), dtype=np.int64), num_atoms)),
        keys.NUM_ATOMS: ints(num_atoms),
        keys.EDGE_INDEX: ints(np.concatenate([g.edge_index + o for g, o in zip(graphs, offsets)], axis=1)),
        keys.EDGE_CELL_SHIFT: floats(np.concatenate([g.edge_cell_shift for g in graphs]).reshape(-1, 3)),
    }
    if all(g.energy is not None for g in graphs):
        batch[keys.ENERGY] = floats(np.array([g.energy for g in graphs]))
    if all(g.forces is not None for g in graphs):
        batch[keys.FORCES] = floats(np.concatenate([g.forces for g in graphs]))
    if all(g.stress is not None for g in graphs):
        batch[keys.STRESS] = floats(np.stack([g.stress for g in graphs]))
    return batch


def _shuffled_order(count: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch)])).permutation(count)


def iterate_batches(
    graphs: Sequence[Graph],
    batch_size: int,
    shuffle: bool,
    seed: int | None = None,
    epoch: int = 0,
    dtype=None,
) -> Iterator[dict[str, Any]]:
    """Yields collated batches of at most ``batch_size`` graphs (the last may be smaller).

    With ``shuffle`` the order is a function of (seed, epoch) only, so a training run
    resumed at some epoch sees the same batches; ``seed=None`` counts as 0 to keep runs
    reproducible by default.
    """
    if batch_size < 1:
        raise ValueError(f"iterate_batches: batch_size must be at least 1, got {batch_size}")
    order = _shuffled_order(len(graphs), 0 if seed is None else seed, epoch) if shuffle else np.arange(len(graphs))
    for start in range(0, len(order), batch_size):
        yield collate([graphs[k] for k in order[start : start + batch_size]], dtype=dtype)


def split(items: Sequence, n_valid: int, seed: int) -> tuple[list, list]:
    """Deterministic random split into (train, valid) with ``n_valid`` items in valid.

    Both parts keep the original relative order of the items.
    """
    n_valid = int(n_valid)
    if not 0 <= n_valid <= len(items):
        raise ValueError(f"split: n_valid={n_valid} must lie between 0 and the number of items ({len(items)})")
    chosen = np.zeros(len(items), dtype=bool)
    chosen[np.random.default_rng(seed).permutation(len(items))[:n_valid]] = True
    train = [item for item, is_valid in zip(items, chosen) if not is_valid]
    valid = [item for item, is_valid in zip(items, chosen) if is_valid]
    return train, valid
