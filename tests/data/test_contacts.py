"""Shortest contacts of the training data and the contact ratio of new structures (issue 13:
very short contacts are flagged)."""

from __future__ import annotations

import numpy as np
import pytest

from bayesrace.data import (
    Frame,
    TypeMap,
    contact_ratios,
    contact_table,
    edge_distances,
    frames_to_graphs,
    no_contact_ratio,
    shortest_contacts,
)

TYPES = TypeMap(["H", "C", "O"])


def molecule(numbers, positions, cell=None):
    periodic = cell is not None
    return Frame(numbers=np.array(numbers), positions=np.array(positions, dtype=float),
                 cell=np.array(cell if periodic else np.zeros((3, 3)), dtype=float), pbc=np.full(3, periodic))


def test_shortest_contacts_known_answer():
    frames = [
        molecule([1, 1], [[0, 0, 0], [0.74, 0, 0]]),  # H-H 0.74
        molecule([6, 1, 1], [[0, 0, 0], [1.09, 0, 0], [0, 1.2, 0]]),  # C-H 1.09 and 1.2, H-H 1.62
        molecule([1], [[0.5, 0.5, 0.5]], cell=np.eye(3) * 4.0),  # H with its own images, 4 Å
    ]
    table = shortest_contacts(frames_to_graphs(frames, TYPES, 5.0), 3)
    assert table[0][0] == pytest.approx(0.74)
    assert table[0][1] == table[1][0] == pytest.approx(1.09)
    assert table[1][1] is None and table[2][2] is None and table[0][2] is None  # never seen
    dense = contact_table(table)
    assert dense[1, 1] == dense[0, 2] == pytest.approx(0.74)  # unseen: the shortest of all
    assert no_contact_ratio(table, 5.0) == pytest.approx(5.0 / 0.74)


def test_contact_ratio_known_answer_and_periodic_images():
    table = [[0.8, 1.0], [1.0, None]]
    graphs = frames_to_graphs([molecule([1, 1, 6], [[0, 0, 0], [0.4, 0, 0], [0, 3.0, 0]]),
                               molecule([6], [[0, 0, 0]], cell=np.eye(3) * 1.2)], TypeMap(["H", "C"]), 5.0)
    g = graphs[0]
    ratios = contact_ratios(g.species, g.edge_index, edge_distances(g), table, 5.0)
    # H-H at 0.4 Å against 0.8; the C's closest neighbour is an H at 3.0 Å against 1.0
    np.testing.assert_allclose(ratios, [0.5, 0.5, 3.0])
    g = graphs[1]  # one C and its own periodic images 1.2 Å away; C-C unseen -> 0.8
    ratios = contact_ratios(g.species, g.edge_index, edge_distances(g), table, 5.0)
    np.testing.assert_allclose(ratios, [1.5])
    lone = frames_to_graphs([molecule([1], [[0, 0, 0]])], TypeMap(["H", "C"]), 5.0)[0]
    ratios = contact_ratios(lone.species, lone.edge_index, edge_distances(lone), table, 5.0)
    np.testing.assert_allclose(ratios, [5.0 / 0.8])


@pytest.mark.parametrize("table, message", [
    ([[1.0, 2.0]], "square table"),
    ([[None]], "has no pair"),
    ([[0.0]], "distances > 0"),
])
def test_bad_tables_are_refused(table, message):
    with pytest.raises(ValueError, match=message):
        contact_table(table)
