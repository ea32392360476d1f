import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.calculator import PropertyNotImplementedError

from bayesrace import keys
from bayesrace.calculator import UNCERTAINTY_RESULTS, BayesRaceCalculator
from bayesrace.data import Frame, TypeMap, collate, frames_to_graphs
from bayesrace.model import build_model, model_config_from
from bayesrace.bayes import Posterior, save_posterior

torch.set_num_threads(1)

ELEMENTS = ["H", "C", "N", "O"]


def make_members(n_members, seed=0):
    config = model_config_from("tiny", avg_num_neighbors=8.0)
    members = [build_model(config, ELEMENTS, seed=seed + k) for k in range(n_members)]
    for member in members:
        # give the aleatoric heads some spread so σ's differ between atoms
        with torch.no_grad():
            for parameter in member.parameters():
                parameter.mul_(1.5)
    return members


@pytest.fixture(scope="module")
def posterior():
    return Posterior(make_members(3)).eval()


def random_positions(n_atoms, box, rng, min_distance=1.0):
    positions = []
    while len(positions) < n_atoms:
        candidate = rng.uniform(0.0, box, size=3)
        if all(np.linalg.norm(candidate - p) >= min_distance for p in positions):
            positions.append(candidate)
    return np.array(positions)


def molecule(seed=1):
    rng = np.random.default_rng(seed)
    return Atoms("CCNOHHHH", positions=random_positions(8, 3.0, rng))


def periodic_box(seed=2):
    rng = np.random.default_rng(seed)
    cell = np.array([[4.2, 0.0, 0.0], [0.5, 4.0, 0.0], [0.3, -0.4, 4.4]])
    fractional = rng.uniform(size=(6, 3))
    atoms = Atoms("CCHHHH", scaled_positions=fractional, cell=cell, pbc=True)
    # keep every pair (images included) at least 1 Å apart
    while min(atoms.get_all_distances(mic=True)[np.triu_indices(6, 1)]) < 1.0:
        atoms.set_scaled_positions(rng.uniform(size=(6, 3)))
    return atoms


def direct_prediction(posterior, atoms, compute_virial=False):
    frame = Frame(
        numbers=atoms.numbers.astype(np.int64),
        positions=atoms.positions.copy(),
        cell=atoms.cell.array.copy() if atoms.pbc.any() else np.zeros((3, 3)),
        pbc=atoms.pbc.copy(),
    )
    graphs = frames_to_graphs([frame], TypeMap(posterior.type_names), posterior.cutoff)
    out = posterior(collate(graphs, dtype=torch.float64), compute_virial=compute_virial)
    return {name: value.detach() for name, value in out.items()}


@pytest.mark.parametrize("make_atoms", [molecule, periodic_box])
def test_energy_and_forces_equal_posterior(posterior, make_atoms):
    atoms = make_atoms()
    atoms.calc = BayesRaceCalculator(posterior)
    expected = direct_prediction(posterior, atoms)
    assert atoms.get_potential_energy() == pytest.approx(float(expected[keys.ENERGY][0]), abs=1e-12)
    np.testing.assert_allclose(atoms.get_forces(), expected[keys.FORCES].detach().numpy(), atol=1e-12)
    np.testing.assert_allclose(
        atoms.calc.results["energies"], expected[keys.ATOMIC_ENERGY].detach().numpy(), atol=1e-12
    )
    assert atoms.calc.results["energies"].sum() == pytest.approx(atoms.get_potential_energy(), abs=1e-10)
    assert atoms.calc.results["free_energy"] == atoms.calc.results["energy"]


@pytest.mark.parametrize("make_atoms", [molecule, periodic_box])
def test_forces_are_negative_energy_gradient(posterior, make_atoms):
    atoms = make_atoms()
    atoms.calc = BayesRaceCalculator(posterior)
    forces = atoms.get_forces()
    step = 1e-5
    numerical = np.zeros_like(forces)
    for atom in range(len(atoms)):
        for axis in range(3):
            displaced = atoms.copy()
            displaced.calc = atoms.calc
            displaced.positions[atom, axis] += step
            e_plus = displaced.get_potential_energy()
            displaced.positions[atom, axis] -= 2 * step
            e_minus = displaced.get_potential_energy()
            numerical[atom, axis] = -(e_plus - e_minus) / (2 * step)
    assert np.abs(forces).max() > 1e-3  # the test means something
    np.testing.assert_allclose(forces, numerical, atol=1e-6)


def test_stress_matches_finite_strain(posterior):
    atoms = periodic_box()
    atoms.calc = BayesRaceCalculator(posterior)
    stress = atoms.get_stress(voigt=False)
    direct = direct_prediction(posterior, atoms, compute_virial=True)[keys.STRESS][0].numpy()
    np.testing.assert_allclose(stress, 0.5 * (direct + direct.T), atol=1e-14)
    volume = atoms.get_volume()
    cell = atoms.cell.array.copy()
    step = 1e-5
    for i, j in [(0, 0), (1, 1), (2, 2), (0, 1), (1, 2), (0, 2)]:
        strain = np.zeros((3, 3))
        # symmetric strain ε_ij = ε_ji = step/2, so dE = V σ_ij step for every component
        strain[i, j] += 0.5
        strain[j, i] += 0.5
        energies = []
        for sign in (1.0, -1.0):
            strained = atoms.copy()
            strained.calc = atoms.calc
            strained.set_cell(cell @ (np.eye(3) + sign * step * strain), scale_atoms=True)
            energies.append(strained.get_potential_energy())
        derivative = (energies[0] - energies[1]) / (2 * step)
        expected = derivative / volume
        assert stress[i, j] == pytest.approx(expected, abs=1e-7), (i, j)
    assert np.abs(stress).max() > 1e-4
    # ASE Voigt order xx, yy, zz, yz, xz, xy
    voigt = atoms.get_stress()
    np.testing.assert_allclose(
        voigt, [stress[0, 0], stress[1, 1], stress[2, 2], stress[1, 2], stress[0, 2], stress[0, 1]], atol=1e-14
    )


def test_stress_needs_full_periodicity(posterior):
    atoms = molecule()
    atoms.calc = BayesRaceCalculator(posterior)
    with pytest.raises(PropertyNotImplementedError, match="periodic"):
        atoms.get_stress()


def test_uncertainty_results(posterior):
    atoms = molecule()
    atoms.calc = BayesRaceCalculator(posterior)
    atoms.get_potential_energy()
    results = atoms.calc.results
    n_atoms, n_members = len(atoms), len(posterior.members)
    assert set(UNCERTAINTY_RESULTS) <= set(results)
    for name in ("energy_std", "energy_std_epistemic", "energy_std_aleatoric"):
        assert isinstance(results[name], float) and results[name] >= 0
    for name in ("forces_std", "forces_std_epistemic", "forces_std_aleatoric", "energies_std"):
        assert results[name].shape == (n_atoms,)
        assert np.all(results[name] >= 0)
    assert results["member_energies"].shape == (n_members,)
    assert results["member_forces"].shape == (n_members, n_atoms, 3)
    # members really differ, and the mixture moments agree with the member arrays
    assert results["energy_std_epistemic"] == pytest.approx(results["member_energies"].std(), rel=1e-10)
    assert results["energy_std_epistemic"] > 0
    assert results["energy_std"] ** 2 == pytest.approx(
        results["energy_std_epistemic"] ** 2 + results["energy_std_aleatoric"] ** 2, rel=1e-10
    )
    np.testing.assert_allclose(results["forces_std"] ** 2,
                               results["forces_std_epistemic"] ** 2 + results["forces_std_aleatoric"] ** 2,
                               rtol=1e-10)
    np.testing.assert_allclose(results["member_forces"].mean(axis=0), results["forces"], atol=1e-12)
    assert results["member_energies"].mean() == pytest.approx(results["energy"], abs=1e-10)
    # readable through the ASE property interface too
    np.testing.assert_array_equal(atoms.calc.get_property("forces_std", atoms), results["forces_std"])


def test_single_member_has_no_epistemic_uncertainty():
    atoms = molecule()
    atoms.calc = BayesRaceCalculator(Posterior(make_members(1)))
    atoms.get_forces()
    results = atoms.calc.results
    assert results["energy_std_epistemic"] == 0.0
    np.testing.assert_array_equal(results["forces_std_epistemic"], 0.0)
    np.testing.assert_array_equal(results["energies_std"], 0.0)
    assert results["energy_std"] == pytest.approx(results["energy_std_aleatoric"])
    np.testing.assert_allclose(results["forces_std"], results["forces_std_aleatoric"])
    # the covariance floor of 1e-3 (eV/Å)² bounds the aleatoric σ from below
    assert np.all(results["forces_std_aleatoric"] >= np.sqrt(1e-3) - 1e-12)


def test_results_follow_position_changes(posterior):
    atoms = molecule()
    atoms.calc = BayesRaceCalculator(posterior)
    first = atoms.get_potential_energy()
    atoms.positions[0] += [0.1, 0.0, 0.0]
    second = atoms.get_potential_energy()
    assert first != second
    assert second == pytest.approx(float(direct_prediction(posterior, atoms)[keys.ENERGY][0]), abs=1e-12)


def test_loads_posterior_from_path(tmp_path):
    members = make_members(2, seed=7)
    path = tmp_path / "posterior.pt"
    save_posterior(path, members)
    atoms = molecule()
    from_path = BayesRaceCalculator(path)
    from_object = BayesRaceCalculator(Posterior(members))
    assert from_path.get_potential_energy(atoms) == pytest.approx(from_object.get_potential_energy(atoms), abs=1e-12)
    np.testing.assert_allclose(from_path.get_forces(atoms), from_object.get_forces(atoms), atol=1e-12)
    np.testing.assert_allclose(
        from_path.get_property("forces_std", atoms), from_object.get_property("forces_std", atoms), atol=1e-12
    )


def test_unknown_element_is_named(posterior):
    atoms = Atoms("CHSi", positions=[[0, 0, 0], [1.1, 0, 0], [0, 2.0, 0]])
    atoms.calc = BayesRaceCalculator(posterior)
    with pytest.raises(ValueError, match=r"element Si .*\['H', 'C', 'N', 'O'\]"):
        atoms.get_potential_energy()


def test_isolated_atom_and_partial_periodicity(posterior):
    single = Atoms("O", positions=[[0, 0, 0]])
    single.calc = BayesRaceCalculator(posterior)
    np.testing.assert_array_equal(single.get_forces(), 0.0)
    assert np.isfinite(single.get_potential_energy())

    slab = periodic_box()
    slab.pbc = [True, True, False]
    slab.calc = BayesRaceCalculator(posterior)
    expected = direct_prediction(posterior, slab)
    assert slab.get_potential_energy() == pytest.approx(float(expected[keys.ENERGY][0]), abs=1e-12)
    with pytest.raises(PropertyNotImplementedError):
        slab.get_stress()


def test_atoms_on_one_position_are_an_error_not_nan(posterior):
    from bayesrace.data import DataError

    atoms = Atoms("CHH", positions=[[0, 0, 0], [1.1, 0, 0], [1.1, 0, 0]])
    atoms.calc = BayesRaceCalculator(posterior)
    with pytest.raises(DataError, match=r"BayesRaceCalculator.*atoms 1 \(H\) and 2 \(H\) are 0 Å apart"):
        atoms.get_potential_energy()
