"""Layer mode (issue 11): the deployable's per-layer methods, driven by the Python reference
``layered_evaluate`` with its single-process halo exchange, against the deployable's
``forward`` (shell mode) and the Python models on molecules, periodic cells smaller than
twice the cutoff and triclinic cells, in float64 and float32, after torch.jit.save/load."""

from __future__ import annotations

import ase
import numpy as np
import pytest
import torch

from bayesrace import keys
from bayesrace.bayes import Posterior
from bayesrace.export import export_posterior, ghost_images, layered_evaluate
from conftest import batch_of, random_molecule, tiny_model
from deployable_tools import TYPES, call, deployable_inputs
from test_export import HASH, periodic_cell, relative

RTOL = 1e-10
FIELDS = (keys.MEMBER_ENERGY, keys.MEMBER_ATOMIC_ENERGY, keys.MEMBER_FORCES, keys.MEMBER_VIRIAL,
          keys.MEMBER_ATOMIC_VIRIAL, keys.ATOMIC_ENERGY_LOG_VAR, keys.FORCE_COVARIANCE)


def export_members(tmp_path, seeds, covariance="cholesky", dtype=None):
    """The loaded deployable of tiny members (3 layers: two exchanges per evaluation)."""
    members = [tiny_model(seed=s, covariance=covariance, n_layers=3) for s in seeds]
    posterior = Posterior(members).eval()
    posterior.record_info = {"data_sha256": HASH}
    path = tmp_path / "model.pt"
    export_posterior(posterior, path, dtype=dtype)
    return posterior, torch.jit.load(str(path))


@pytest.fixture(scope="module")
def deployable(tmp_path_factory):
    """deployable(seeds, covariance="cholesky", dtype=None): exported once per module
    (scripting costs seconds per member)."""
    cache = {}

    def get(seeds, covariance="cholesky", dtype=None):
        key = (tuple(seeds), covariance, dtype)
        if key not in cache:
            cache[key] = export_members(tmp_path_factory.mktemp("layered"), seeds, covariance, dtype)
        return cache[key]

    return get


def small_cell():
    """Five atoms in a triclinic cell with two edges shorter than the 5 Å cutoff: every atom
    is its own neighbour through several images."""
    cell = np.array([[4.2, 0.0, 0.0], [0.9, 4.6, 0.0], [-0.5, 0.7, 6.1]])
    frac = np.array([[0.05, 0.1, 0.2], [0.5, 0.45, 0.1], [0.3, 0.8, 0.6], [0.8, 0.2, 0.75], [0.6, 0.7, 0.35]])
    return ase.Atoms("CHNHC", scaled_positions=frac, cell=cell, pbc=True)


def layered(module, system, atomic_virial=True):
    return layered_evaluate(module, torch.tensor(system["positions"]), torch.tensor(system["species"]),
                            torch.tensor(system["edge_index"]), system["n_local"],
                            torch.tensor(system["ghost_owner"]), atomic_virial)


def fold(values, system):
    """Ghost rows added onto their owners: the local rows of the whole structure."""
    values = torch.as_tensor(values)
    n_local = system["n_local"]
    owner = torch.tensor(system["ghost_owner"])
    return values[:, :n_local].index_add(1, owner, values[:, n_local:])


# ------------------------------------------------------------------ the pieces


def test_ghost_images_are_the_images_within_the_cutoff():
    atoms = small_cell()
    system = ghost_images(atoms, 5.0, TYPES)
    n_local, owner = system["n_local"], system["ghost_owner"]
    positions, centre, neighbour = system["positions"], *system["edge_index"]
    assert n_local == len(atoms) and len(positions) == n_local + len(owner)
    assert np.all(centre < n_local)
    # an atom is its own ghost, several times
    assert all(np.sum(owner == a) >= 2 for a in range(n_local))
    lengths = np.linalg.norm(positions[neighbour] - positions[centre], axis=1)
    assert lengths.max() < 5.0 and lengths.min() > 0.5
    # every ghost is its owner shifted by a lattice vector, and every ghost is used
    frac = np.linalg.solve(atoms.cell.array.T, (positions[n_local:] - positions[owner]).T).T
    assert np.allclose(frac, np.round(frac), atol=1e-9) and np.all(np.abs(np.round(frac)).sum(1) > 0)
    assert set(neighbour[neighbour >= n_local]) == set(range(n_local, len(positions)))
    # the same edges (lengths) as the periodic neighbour list
    inputs = deployable_inputs(atoms, 5.0)
    ei = inputs["edge_index"]
    want = np.linalg.norm(inputs["positions"][ei[1]] - inputs["positions"][ei[0]] + inputs["edge_shifts"], axis=1)
    assert np.allclose(np.sort(lengths), np.sort(want), rtol=0, atol=1e-12)
    assert system["species"].tolist() == [TYPES.index(s) for s in atoms.get_chemical_symbols()] + [
        TYPES.index(atoms.get_chemical_symbols()[a]) for a in owner]


def test_layer_methods_survive_save_and_load(deployable):
    posterior, module = deployable((0, 1, 2))
    member = posterior.members[0]
    assert module.layer_widths() == member.feature_widths() == [8, 32, 32, 32]
    assert module.n_readout() == member.readout_width() == 8
    species = torch.tensor([0, 1, 2, 1])
    h = module.embed(1, species)
    assert h.shape == (4, 8) and h.dtype == torch.float64
    edge_index = torch.tensor([[0, 1, 1, 0], [1, 0, 2, 3]])
    vectors = torch.tensor([[1.0, 0.2, 0.0], [-1.0, -0.2, 0.0], [0.3, 1.1, 0.4], [0.0, 0.0, 1.4]], dtype=torch.float64)
    h1, r0 = module.layer(1, 0, h, species, edge_index, vectors, 2)
    assert h1.shape == (2, 32) and r0.shape == (2, 8)
    energy, log_var, covariance, distance = module.head(1, torch.stack([r0, r0, r0]), species[:2])
    assert energy.shape == (2,) and log_var.shape == (2,) and covariance.shape == (2, 3, 3)
    assert distance.shape == (0,)  # no feature density
    # the head is RACE's own combination of the readouts
    want = posterior.members[1].combine_readouts(torch.stack([r0, r0, r0]), species[:2])
    for got, expected in zip((energy, log_var, covariance), want):
        assert torch.equal(got, expected.detach())
    with pytest.raises(Exception, match="member 3 out of range"):
        module.embed(3, species)
    with pytest.raises(Exception, match="layer 3 out of range"):
        module.layer(0, 3, h, species, edge_index, vectors, 2)
    with pytest.raises(Exception, match="edge centre < n_local"):
        module.layer(0, 0, h, species, edge_index, vectors, 1)
    with pytest.raises(Exception, match=r"needs h of shape \[4, 32\]"):
        module.layer(0, 1, h, species, edge_index, vectors, 2)


# ------------------------------------------------------------------ against forward


@pytest.mark.parametrize("covariance", ["cholesky", "equivariant"])
@pytest.mark.parametrize("seeds", [(0,), (0, 1, 2)])
def test_molecule_layered_equals_forward(deployable, covariance, seeds):
    _, module = deployable(seeds, covariance)
    atoms = random_molecule(11, seed=4, box=4.0)
    system = ghost_images(atoms, 5.0, TYPES)
    assert system["n_local"] == len(atoms) and len(system["ghost_owner"]) == 0
    got = layered(module, system)
    want = call(module, deployable_inputs(atoms, 5.0))
    for key in FIELDS:
        assert got[key].shape == want[key].shape, key
        assert relative(got[key], want[key]) < RTOL, key


@pytest.mark.parametrize("kind", ["small", "triclinic"])
def test_periodic_layered_equals_periodic_model(deployable, kind):
    posterior, module = deployable((0, 1, 2), "equivariant" if kind == "small" else "cholesky")
    atoms = small_cell() if kind == "small" else periodic_cell()
    system = ghost_images(atoms, posterior.cutoff, TYPES)
    got = layered(module, system)
    n_local, n_atoms = system["n_local"], len(system["positions"])
    # the whole structure by the deployable's forward with cell shifts (shell mode)
    shell = call(module, deployable_inputs(atoms, posterior.cutoff))
    assert relative(got[keys.MEMBER_ENERGY], shell[keys.MEMBER_ENERGY]) < RTOL
    assert relative(fold(got[keys.MEMBER_FORCES], system), shell[keys.MEMBER_FORCES]) < RTOL
    assert relative(got[keys.MEMBER_VIRIAL], shell[keys.MEMBER_VIRIAL]) < RTOL
    assert relative(fold(got[keys.MEMBER_ATOMIC_VIRIAL], system), shell[keys.MEMBER_ATOMIC_VIRIAL]) < RTOL
    for key in (keys.MEMBER_ATOMIC_ENERGY, keys.ATOMIC_ENERGY_LOG_VAR, keys.FORCE_COVARIANCE):
        assert got[key].shape[1] == n_atoms and torch.all(got[key][:, n_local:] == 0), key
        assert relative(got[key][:, :n_local], shell[key]) < RTOL, key
    # and by the Python models (RACE.forward on the periodic batch)
    batch = batch_of([atoms], TYPES, posterior.cutoff)
    for m, member in enumerate(posterior.members):
        out = member(batch, True, True)
        assert relative(got[keys.MEMBER_ENERGY][m], out[keys.ENERGY][0].detach()) < RTOL
        assert relative(fold(got[keys.MEMBER_FORCES], system)[m], out[keys.FORCES].detach()) < RTOL
        assert relative(got[keys.MEMBER_VIRIAL][m], out[keys.VIRIAL][0].detach()) < RTOL


def test_periodic_forces_are_the_energy_gradient(deployable):
    _, module = deployable((0,))
    atoms = small_cell()
    system = ghost_images(atoms, 5.0, TYPES)
    forces = fold(layered(module, system, False)[keys.MEMBER_FORCES], system)[0]
    step = 1e-4
    for atom, axis in ((0, 0), (2, 1), (4, 2)):
        energies = []
        for sign in (1.0, -1.0):
            moved = atoms.copy()
            moved.positions[atom, axis] += sign * step  # every image of the atom moves with it
            energies.append(float(layered(module, ghost_images(moved, 5.0, TYPES), False)[keys.MEMBER_ENERGY][0]))
        numerical = -(energies[0] - energies[1]) / (2 * step)
        assert abs(numerical - float(forces[atom, axis])) < 1e-6 * max(1.0, float(forces.abs().max())), (atom, axis)


def test_float32_export_layered_equals_forward(deployable):
    posterior, module = deployable((0, 1), dtype="float32")
    assert module.embed(0, torch.tensor([0, 1])).dtype == torch.float32
    atoms = small_cell()
    system = ghost_images(atoms, posterior.cutoff, TYPES)
    got = layered(module, system)
    assert got[keys.MEMBER_FORCES].dtype == torch.float32
    shell = call(module, deployable_inputs(atoms, posterior.cutoff), dtype=torch.float32)
    assert relative(got[keys.MEMBER_ENERGY], shell[keys.MEMBER_ENERGY]) < 1e-5
    assert relative(fold(got[keys.MEMBER_FORCES], system), shell[keys.MEMBER_FORCES]) < 1e-5
    assert relative(got[keys.MEMBER_VIRIAL], shell[keys.MEMBER_VIRIAL]) < 1e-5
    assert relative(got[keys.FORCE_COVARIANCE][:, :system["n_local"]], shell[keys.FORCE_COVARIANCE]) < 1e-5
