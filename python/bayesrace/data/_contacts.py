"""Shortest contacts: the closest approach of each pair of elements in the training data, and
how close each atom of a new structure comes relative to it.

The contact ratio of atom i is ρ_i = min_j r_ij / r_min(t_i, t_j) over its neighbours within
the cutoff, where r_min(a, b) is the shortest a–b distance in the training set (a pair never
seen there takes the shortest distance of any pair). ρ_i < 1: atom i is closer to a
neighbour than any such pair was in training, a geometry the model has not seen and where
its forces are extrapolated (atoms colliding in hot MD). An atom without neighbours gets
``NO_CONTACT_RATIO`` (cutoff / the shortest training distance, > 1). The LAMMPS pair style
computes the same per atom from the deployable's ``shortest_contacts`` (docs/design.md).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np

ContactTable = List[List[Optional[float]]]  # [T][T], Å; None: pair not seen within the cutoff


def edge_distances(graph) -> np.ndarray:
    """|r_ij| of every edge of a ``Graph`` (r_ij = x_j − x_i + S @ cell)."""
    i, j = graph.edge_index
    vectors = graph.positions[j] - graph.positions[i] + graph.edge_cell_shift @ graph.cell
    return np.linalg.norm(vectors, axis=1)


def shortest_contacts(graphs: Sequence, n_types: int) -> ContactTable:
    """The shortest distance between atoms of each pair of types over ``graphs`` (symmetric)."""
    table = np.full((n_types, n_types), np.inf)
    for graph in graphs:
        if graph.edge_index.shape[1] == 0:
            continue
        ti, tj = graph.species[graph.edge_index[0]], graph.species[graph.edge_index[1]]
        np.minimum.at(table, (ti, tj), edge_distances(graph))
    table = np.minimum(table, table.T)
    return [[float(v) if np.isfinite(v) else None for v in row] for row in table]


def contact_table(contacts: ContactTable) -> np.ndarray:
    """``contacts`` as a [T, T] array with every unseen pair set to the shortest of all
    (ValueError if the table is not square, has a value ≤ 0, or has no pair at all)."""
    n = len(contacts)
    if n == 0 or any(len(row) != n for row in contacts):
        raise ValueError(f"shortest_contacts must be a square table of {n} rows of {n} values")
    table = np.array([[np.nan if v is None else float(v) for v in row] for row in contacts], dtype=np.float64)
    seen = table[np.isfinite(table)]
    if seen.size == 0:
        raise ValueError("shortest_contacts has no pair (the training data had no two atoms within the cutoff)")
    if np.any(seen <= 0):
        raise ValueError("shortest_contacts must hold distances > 0 Å (or null for a pair never seen)")
    return np.where(np.isfinite(table), table, seen.min())


def no_contact_ratio(contacts: ContactTable, cutoff: float) -> float:
    """The ratio of an atom without neighbours: cutoff / the shortest training distance."""
    return float(cutoff) / float(contact_table(contacts).min())


def contact_ratios(species: np.ndarray, edge_index: np.ndarray, distances: np.ndarray, contacts: ContactTable,
                   cutoff: float) -> np.ndarray:
    """ρ_i for every atom (module docstring)."""
    table = contact_table(contacts)
    ratios = np.full(len(species), no_contact_ratio(contacts, cutoff))
    if edge_index.shape[1]:
        i, j = edge_index
        np.minimum.at(ratios, i, distances / table[species[i], species[j]])
    return ratios
