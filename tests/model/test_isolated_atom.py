"""The isolated-atom limit (issue 13): an atom with no neighbour has exactly its reference
energy, whatever the members learned, and the learned part switches on smoothly."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from bayesrace import keys
from bayesrace.data import Frame, TypeMap, collate, frames_to_graphs
from bayesrace.model import StackedRace, build_model, model_config_from, model_config_from_record

REFERENCES = [-13.6, -1030.0]


def _model(seed=0, **overrides):
    config = model_config_from("tiny", avg_num_neighbors=3.0, **overrides)
    return build_model(config, ["H", "C"], reference_energies=REFERENCES, energy_shift=-0.7, energy_scale=0.3,
                       seed=seed)


def _batch(positions, numbers, cutoff=5.0):
    frame = Frame(numbers=np.array(numbers), positions=np.array(positions, dtype=float), cell=np.zeros((3, 3)),
                  pbc=np.zeros(3, dtype=bool))
    return collate(frames_to_graphs([frame], TypeMap(["H", "C"]), cutoff))


def test_isolated_atoms_have_their_reference_energy_exactly():
    for seed in (0, 1):
        model = _model(seed)
        out = model(_batch([[0.0, 0.0, 0.0]], [6]))
        assert float(out[keys.ENERGY][0].detach()) == REFERENCES[1]
        out = model(_batch([[0.0, 0.0, 0.0], [0.0, 0.0, 5.01]], [1, 6]))  # just beyond the cutoff
        assert float(out[keys.ENERGY][0].detach()) == REFERENCES[0] + REFERENCES[1]
        assert torch.all(out[keys.FORCES] == 0)


def test_the_learned_part_comes_in_smoothly():
    model = _model()
    energies, forces = [], []
    distances = np.linspace(3.5, 5.2, 35)
    for d in distances:
        out = model(_batch([[0.0, 0.0, 0.0], [0.0, 0.0, d]], [1, 1]))
        energies.append(float(out[keys.ENERGY][0].detach()) - 2 * REFERENCES[0])
        forces.append(float(out[keys.FORCES][1, 2].detach()))
    energies, forces = np.array(energies), np.array(forces)
    assert abs(energies[0]) > 1e-4  # bonded enough to feel the model at 3.5 Å
    assert np.all(np.abs(energies[distances > 5.0]) == 0) and np.all(forces[distances > 5.0] == 0)
    # F = −dE/dr all the way out, and both go to zero continuously at the cutoff
    central = -(energies[2:] - energies[:-2]) / (distances[2:] - distances[:-2])
    np.testing.assert_allclose(forces[1:-1], central, atol=2e-3 * np.abs(forces).max() + 1e-9)
    assert abs(energies[distances < 5.0][-1]) < 1e-6


def test_members_disagree_near_but_not_at_the_limit():
    members = [_model(seed) for seed in range(3)]
    near = [float(m(_batch([[0, 0, 0], [0, 0, 2.5]], [1, 1]))[keys.ENERGY][0].detach()) for m in members]
    far = [float(m(_batch([[0, 0, 0], [0, 0, 6.0]], [1, 1]))[keys.ENERGY][0].detach()) for m in members]
    assert np.std(near) > 1e-4 and np.std(far) == 0.0


def test_stacked_members_gate_alike():
    members = [_model(seed) for seed in range(2)]
    batch = _batch([[0, 0, 0], [0, 0, 1.1], [0, 1.0, 4.0]], [6, 1, 1])
    stacked = StackedRace(members)
    edge_vectors = (batch[keys.POSITIONS][batch[keys.EDGE_INDEX][1]] - batch[keys.POSITIONS][batch[keys.EDGE_INDEX][0]])
    readouts = stacked(batch[keys.SPECIES], batch[keys.EDGE_INDEX], edge_vectors.unsqueeze(0).expand(2, -1, -1))
    for m, member in enumerate(members):
        energy = member.combine_readouts(readouts[:, m], batch[keys.SPECIES])[0]
        expected = member.atomic_outputs(batch[keys.SPECIES], batch[keys.EDGE_INDEX], edge_vectors)[keys.ATOMIC_ENERGY]
        torch.testing.assert_close(energy, expected, rtol=1e-12, atol=1e-12)


def test_models_saved_before_the_limit_load_without_it():
    fields = dataclasses.asdict(model_config_from("tiny", avg_num_neighbors=3.0))
    del fields["isolated_atom_limit"]
    assert model_config_from_record(fields).isolated_atom_limit is False
    legacy = _model(isolated_atom_limit=False)
    out = legacy(_batch([[0.0, 0.0, 0.0]], [6]))
    assert float(out[keys.ENERGY][0].detach()) != REFERENCES[1]  # the old behaviour: shift and readouts act alone
