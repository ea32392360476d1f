"""PSB3 SA-2-CASSCF(6,6) labels (PySCF): labeller against PySCF called directly, forces,
π active space at a twisted geometry, resume, settings check, deterministic geometries."""

import json

import numpy as np
import pytest

pytest.importorskip("pyscf")

from ase.units import Bohr, Hartree
from bayesrace.data import _casscf as casscf
from bayesrace.data._casscf_geometry import (
    bond_length_alternation,
    frame_geometry,
    geometry_hash,
    psb3_minimum,
    torsion_angle,
)
from pyscf import lib

lib.num_threads(1)


@pytest.fixture(scope="module")
def twisted():
    """Frame 2 of seed 0 is a torsion frame at about 14 deg; twist one to 90 deg too."""
    atoms = psb3_minimum()
    mask = np.zeros(len(atoms), dtype=bool)
    mask[[3, 4, 5, 8, 9, 12, 13]] = True
    atoms.set_dihedral(1, 2, 3, 4, 90.0, mask=mask)
    return atoms


@pytest.fixture(scope="module")
def labelled():
    atoms = frame_geometry(0, 3)  # a bla frame: noisy, no symmetry
    return atoms, casscf.label_casscf(atoms, "sto-3g")


def test_labeller_matches_pyscf_called_directly(labelled):
    from pyscf import mcscf, scf

    atoms, result = labelled
    mol = casscf._molecule(atoms, "sto-3g")
    mf = scf.RHF(mol)
    mf.conv_tol = 1e-11
    mf.kernel()
    mo, _, _ = casscf.pi_active_space(mf, atoms)
    mc = mcscf.CASSCF(mf, 6, 6)
    mc.fix_spin_(ss=0)
    mc = mc.state_average_([0.5, 0.5])
    mc.conv_tol = 1e-9
    mc.kernel(mo)
    assert mc.converged
    energies = np.asarray(mc.e_states) * Hartree
    np.testing.assert_allclose(result["energies"], energies, rtol=0, atol=1e-6)
    # plain PySCF gradient of S1 (no cached integrals): forces = -gradient in eV/Å
    gradient = mc.nuc_grad_method().kernel(state=1) * (Hartree / Bohr)
    np.testing.assert_allclose(np.asarray(result["forces"][1]), -gradient, rtol=0, atol=1e-6)
    assert np.asarray(result["forces"]).shape == (2, len(atoms), 3)
    assert result["energies"][1] > result["energies"][0]
    assert max(result["spin_square"]) < 1e-3
    for occupations in result["natural_occupations"]:
        assert len(occupations) == 6 and abs(sum(occupations) - 6.0) < 1e-6


def test_forces_are_minus_the_energy_slope(labelled):
    """Central difference of the S0 energy along one coordinate (sto-3g)."""
    atoms, result = labelled
    atom, axis, step = 4, 0, 2e-3  # Å
    energies = []
    for sign in (+1, -1):
        displaced = atoms.copy()
        displaced.positions[atom, axis] += sign * step
        energies.append(_sa_casscf_energies(displaced)[0])
    slope = (energies[0] - energies[1]) / (2 * step)
    assert abs(-slope - result["forces"][0][atom][axis]) < 2e-3


def _sa_casscf_energies(atoms):
    from pyscf import mcscf, scf

    mf = scf.RHF(casscf._molecule(atoms, "sto-3g"))
    mf.conv_tol = 1e-11
    mf.kernel()
    mc = mcscf.CASSCF(mf, 6, 6)
    mc.fix_spin_(ss=0)
    mc = mc.state_average_([0.5, 0.5])
    mc.conv_tol = 1e-10
    mc.kernel(casscf.pi_active_space(mf, atoms)[0])
    return np.asarray(mc.e_states) * Hartree


def test_pi_space_at_a_twisted_geometry(twisted):
    from pyscf import scf

    assert abs(torsion_angle(twisted) - 90.0) < 1e-6
    mf = scf.RHF(casscf._molecule(twisted, "sto-3g")).run()
    mo, w_occ, w_vir = casscf.pi_active_space(mf, twisted)
    assert np.sum(w_occ > casscf.PI_THRESHOLD) == 3 and np.sum(w_vir > casscf.PI_THRESHOLD) == 3
    assert mo.shape == mf.mo_coeff.shape
    # the active orbitals are orthonormal
    n_core = mf.mol.nelectron // 2 - 3
    active = mo[:, n_core : n_core + 6]
    np.testing.assert_allclose(active.T @ mf.get_ovlp() @ active, np.eye(6), atol=1e-8)
    # a space asked with the wrong size is an error, not a silent choice
    with pytest.raises(casscf.CASSCFFailure, match="π space"):
        casscf.pi_active_space(mf, twisted, n_orbitals=8, n_electrons=8)


def test_geometries_are_deterministic():
    for index in range(8):
        a, b = frame_geometry(7, index), frame_geometry(7, index)
        assert geometry_hash(a) == geometry_hash(b) and a.info == b.info
    assert geometry_hash(frame_geometry(7, 0)) != geometry_hash(frame_geometry(8, 0))
    kinds = [frame_geometry(0, i).info["config_type"] for i in range(8)]
    assert kinds == ["equilibrium", "equilibrium", "torsion", "bla"] * 2
    minimum = psb3_minimum()
    assert bond_length_alternation(minimum.positions) > 0.03
    assert abs(torsion_angle(minimum) - 180.0) < 1.0


def _fake_labels(atoms, basis):
    """Cheap stand-in with the labeller's keys (the real one is tested above)."""
    n = len(atoms)
    return {"energies": [-1.0, 2.0], "forces": np.zeros((2, n, 3)).tolist(), "converged": True,
            "spin_square": [0.0, 0.0], "natural_occupations": [[2, 2, 2, 0, 0, 0], [2, 2, 1, 1, 0, 0]],
            "ci_leading_weight": [0.9, 0.4], "pi_weights_occupied": [1.0] * 4, "pi_weights_virtual": [1.0] * 4,
            "seconds": 0.0}


def test_generate_resumes_and_refuses_other_settings(tmp_path, monkeypatch):
    import ase.io

    calls = []
    real = casscf.label_casscf

    def counting(labeller):
        def label(atoms, basis):
            calls.append(basis)
            return labeller(atoms, basis)
        return label

    out = tmp_path / "casscf"
    # one frame end to end with the real labeller
    monkeypatch.setattr(casscf, "label_casscf", counting(real))
    first = casscf.generate_psb3_casscf(out, n_frames=1, basis="sto-3g", seed=0, progress=False)
    assert len(calls) == 1 and first["labelled_this_run"] == 1 and first["failed"] == []
    assert first["files"]["train.xyz"]["frames"] == 1
    (frame,) = ase.io.read(out / "train.xyz", index=":")
    assert frame.info["energy_s1"] > frame.info["energy_s0"]
    assert frame.info["casscf_converged"] and frame.info["config_type"] == "equilibrium"
    assert frame.arrays["forces_s0"].shape == frame.arrays["forces_s1"].shape == (len(frame), 3)
    np.testing.assert_allclose(frame.get_potential_energy(), frame.info["energy_s0"])
    np.testing.assert_allclose(frame.get_forces(), frame.arrays["forces_s0"])
    np.testing.assert_allclose(frame.info["gap_s1_s0"], frame.info["energy_s1"] - frame.info["energy_s0"])
    assert len(frame.info["natocc_s0"]) == 6

    # more frames in the same directory: only the new ones are labelled, then none
    monkeypatch.setattr(casscf, "label_casscf", counting(_fake_labels))
    second = casscf.generate_psb3_casscf(out, n_frames=3, basis="sto-3g", seed=0, progress=False)
    assert len(calls) == 3 and second["labelled_this_run"] == 2
    assert sum(entry["frames"] for entry in second["files"].values()) == 3
    third = casscf.generate_psb3_casscf(out, n_frames=3, basis="sto-3g", seed=0, progress=False)
    assert len(calls) == 3 and third["labelled_this_run"] == 0
    assert json.loads((out / "manifest.json").read_text())["labelled_this_run"] == 0
    assert third["counts"] == {"bla": 0, "equilibrium": 2, "torsion": 1}

    with pytest.raises(ValueError, match="basis"):
        casscf.generate_psb3_casscf(out, n_frames=3, basis="3-21g", seed=0, progress=False)
    with pytest.raises(ValueError, match="seed"):
        casscf.generate_psb3_casscf(out, n_frames=3, basis="sto-3g", seed=1, progress=False)
    assert len(calls) == 3


def test_twisted_frames_go_to_test_torsion(tmp_path, monkeypatch):
    monkeypatch.setattr(casscf, "label_casscf", _fake_labels)
    manifest = casscf.generate_psb3_casscf(tmp_path, n_frames=24, basis="sto-3g", seed=0, progress=False)
    import ase.io

    twisted = ase.io.read(tmp_path / "test_torsion.xyz", index=":")
    assert manifest["files"]["test_torsion.xyz"]["frames"] == len(twisted) > 0
    assert all(f.info["config_type"] == "torsion" and f.info["torsion_deg"] < 150.0 for f in twisted)
    n_in = sum(manifest["files"][name]["frames"] for name in ("train.xyz", "valid.xyz", "test.xyz"))
    assert n_in + len(twisted) == 24 and manifest["files"]["valid.xyz"]["frames"] > 0


def test_failed_frames_are_recorded_not_written(tmp_path, monkeypatch):
    def failing(atoms, basis):
        raise casscf.CASSCFFailure("SA-CASSCF did not converge")

    monkeypatch.setattr(casscf, "label_casscf", failing)
    manifest = casscf.generate_psb3_casscf(tmp_path, n_frames=1, basis="sto-3g", seed=0, progress=False)
    assert manifest["failed"] == [{"index": 0, "config_type": "equilibrium",
                                   "reason": "CASSCFFailure: SA-CASSCF did not converge"}]
    assert sum(entry["frames"] for entry in manifest["files"].values()) == 0
