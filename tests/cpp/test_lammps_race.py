"""LAMMPS with a real exported RACE ensemble: agreement with the Python ASE calculator,
finite differences, NVE energy conservation, MPI, and fix halt on extrapolation.

The model is a tiny RACE ensemble (3 members, 2 layers, float64) exported by
bayesrace.export; LAMMPS finds the installed plugin with no `plugin load` line.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from bayesrace import keys
from cpp_fixtures import FILTERS

pytestmark = FILTERS

from cpp_fixtures import core, plugin_path  # noqa: E402,F401

from lmp_tools import (  # noqa: E402
    Structure,
    assert_same,
    lammps_input,
    lammps_instance,
    parse_lammps_result,
    parse_tagged,
    reference_result,
    run_in_process,
    run_lmp,
    write_data,
)

TYPES = ["H", "C", "N"]
N_MEMBERS = 3


# ----------------------------------------------------------------------------- structures


def psb3_structure(seed=0, origin=(15.0, 15.0, 15.0), box=(30.0, 30.0, 30.0), jitter=0.05) -> Structure:
    """PSB3 (C5H8N+), slightly distorted so that no force vanishes by symmetry."""
    from bayesrace.data import build_psb3

    atoms = build_psb3()
    x = atoms.positions - atoms.positions.mean(0) + np.asarray(origin)
    x = x + np.random.default_rng(seed).normal(scale=jitter, size=x.shape)
    ids = 4 + 3 * np.arange(len(x))[::-1]  # non-contiguous and not in position order
    return Structure(x, atoms.get_chemical_symbols(), ids, box_lo=(0.0, 0.0, 0.0), box_hi=tuple(box))


def cell_structure(seed=2, n=24, triclinic=False) -> Structure:
    """Random C/H/N atoms (no pair closer than 1 Å) in a sparse cell of about 9-10 Å: the
    10 Å interaction range (2 layers x 5 Å) reaches periodic images, while the ghost
    shell LAMMPS must evaluate stays small enough for a quick test."""
    if triclinic:
        cell = np.array([[10.0, 0.0, 0.0], [1.8, 9.4, 0.0], [-1.3, 1.6, 9.9]])
    else:
        cell = np.diag([9.5, 9.0, 9.8])
    rng = np.random.default_rng(seed)
    frac = np.zeros((0, 3))
    while len(frac) < n:
        f = rng.uniform(size=3)
        d = f - frac
        d = (d - np.round(d)) @ cell
        if len(frac) == 0 or np.linalg.norm(d, axis=1).min() > 1.0:
            frac = np.vstack([frac, f])
    elements = [("C", "H", "N", "H")[k % 4] for k in range(n)]
    ids = 50 + 2 * np.arange(n)
    return Structure(frac @ cell, elements, ids, cell=cell, pbc=True)


STRUCTURES = {
    "psb3": lambda: psb3_structure(),
    "cell": lambda: cell_structure(),
    "triclinic": lambda: cell_structure(seed=5, n=26, triclinic=True),
}


def to_atoms(s: Structure):
    import ase

    if s.pbc:
        return ase.Atoms(s.elements, positions=s.positions, cell=s.cell, pbc=True)
    return ase.Atoms(s.elements, positions=s.positions)


# ----------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def race(tmp_path_factory):
    """An untrained tiny RACE ensemble (weights from fixed seeds), exported frozen in float64."""
    from bayesrace.export import export_posterior
    from bayesrace.bayes import Posterior
    from conftest import tiny_model

    from bayesrace.calculator import BayesRaceCalculator

    posterior = Posterior([tiny_model(seed=s) for s in range(N_MEMBERS)]).eval()
    # a threshold inside the range of PSB3's per-atom σ, so that the count is not trivial
    calc = BayesRaceCalculator(posterior)
    calc.calculate(to_atoms(psb3_structure()), ["energy"])
    threshold = float(np.median(calc.results["forces_std"]))
    path = tmp_path_factory.mktemp("race") / "race.pt"
    meta = export_posterior(posterior, path, training_data_sha256="0" * 64,
                            thresholds={keys.ATOMIC_FORCE_STD: threshold})
    assert meta[keys.META_N_LAYERS] == 2 and meta[keys.META_N_MEMBERS] == N_MEMBERS
    assert meta[keys.META_DTYPE] == "float64"
    return posterior, str(path), meta


@pytest.fixture(scope="module")
def trained(psb3_small, tmp_path_factory):
    """A RACE ensemble trained briefly (tiny, 3 members, 5 epochs, MSE) on PSB3 xTB data."""
    from bayesrace.train import load_config
    from bayesrace.export import export_posterior
    from bayesrace.bayes import load_posterior
    from bayesrace.train import train
    from conftest import write_training_config

    out = tmp_path_factory.mktemp("trained")
    config = write_training_config(
        out / "config.yaml", psb3_small, out / "run",
        ensemble={"members": N_MEMBERS}, training={"max_epochs": 5}, loss={"kind": "mse", "mse_warmup_epochs": 0},
    )
    posterior = load_posterior(train(load_config(config), progress=False))
    path = out / "model.pt"
    export_posterior(posterior, path)
    return posterior, str(path), psb3_small


# ----------------------------------------------------------------------------- Python reference


def python_reference(posterior, s: Structure, threshold: float) -> dict:
    """What LAMMPS must print, from the Python ASE calculator (rows sorted by atom id)."""
    from bayesrace.calculator import BayesRaceCalculator
    from conftest import batch_of

    atoms = to_atoms(s)
    calc = BayesRaceCalculator(posterior)
    calc.calculate(atoms, ["energy", "forces", "energies"] + (["stress"] if s.pbc else []))
    r = calc.results
    if s.pbc:
        # ASE stress (Voigt xx yy zz yz xz xy) = -W / V
        st = -r["stress"] * atoms.get_volume()
        virial6 = np.array([st[0], st[1], st[2], st[5], st[4], st[3]])
    else:
        w = posterior(batch_of([atoms], TYPES, posterior.cutoff), compute_virial=True)[keys.VIRIAL][0]
        w = w.detach().numpy()
        virial6 = np.array([w[0, 0], w[1, 1], w[2, 2], w[0, 1], w[0, 2], w[1, 2]])
    order = np.argsort(s.ids)
    sig = r["forces_std"]
    return {
        "energy": r["energy"],
        "max_force_std": sig.max(),
        "mean_force_std": sig.mean(),
        "energy_std": r["energy_std"],
        "n_over": float((sig > threshold).sum()),
        "virial6": virial6,
        "max_force_std_epistemic": r["forces_std_epistemic"].max(),
        "energy_std_epistemic_per_atom": r["energy_std_epistemic"] / len(s.ids),
        "max_relative_force_std": r["forces_std_relative"].max(),
        "relative_force_std": r["forces_std_relative"][order],
        "id": np.asarray(s.ids)[order],
        "forces": r["forces"][order],
        "atomic_energy": r["energies"][order],
        "uq": np.stack([r["forces_std"], r["forces_std_epistemic"], r["forces_std_aleatoric"], r["energies_std"]],
                       1)[order],
    }


# ----------------------------------------------------------------------------- LAMMPS vs Python


@pytest.mark.parametrize("kind", list(STRUCTURES))
def test_lammps_matches_python_calculator(core, plugin_path, race, tmp_path, kind):
    posterior, model, meta = race
    s = STRUCTURES[kind]()
    write_data(s, tmp_path / "data.lmp")
    rc, out = run_lmp(lammps_input(plugin_path, model, s), tmp_path)
    assert rc == 0, out[-3000:]
    got = parse_lammps_result(tmp_path)
    want = python_reference(posterior, s, meta[keys.META_THRESHOLDS][keys.ATOMIC_FORCE_STD])
    if kind == "psb3":
        assert 0 < want["n_over"] < len(s.ids)  # the count is exercised
    assert_same(got, want, rtol=1e-8, skip=("atomic_virial6",))
    # and the per-atom virial (stress/atom) against the C++ binding on the whole structure
    assert_same(got, reference_result(core, model, s, posterior.cutoff), rtol=1e-10)


@pytest.mark.parametrize("kind, nprocs, by_parts", [("psb3", 1, False), ("cell", 1, False), ("cell", 2, False),
                                                    ("psb3", 1, True), ("cell", 2, True)])
def test_lammps_matches_python_with_map_calibration(core, plugin_path, race, tmp_path, kind, nprocs, by_parts):
    """Isotonic-style maps (scales and monotone knots) in the metadata: pair_style bayesrace
    and compute bayesrace/atom report the σ's of the Python posterior calibrated by the
    same calibration (Posterior.forward applies it; force map per atom, energy map on the
    per-atom energy σ of the whole system). ``by_parts``: one map for the epistemic and one
    for the aleatoric σ of each quantity (method split) instead of the total maps."""
    import copy
    import json

    import torch

    from bayesrace.calculator import BayesRaceCalculator
    from bayesrace.export import build_metadata

    posterior, model, meta = race
    s = STRUCTURES[kind]()
    calc = BayesRaceCalculator(posterior)
    calc.calculate(to_atoms(s), ["energy"])
    sigma = calc.results["forces_std"]
    per_atom_energy_sigma = calc.results["energy_std"] / len(s.ids)
    knots = np.quantile(sigma, [0.1, 0.3, 0.5, 0.7, 0.9])  # atoms below, between, above
    calibration = {
        keys.META_FORCE_STD_SCALE: 1.2,
        keys.META_ENERGY_STD_SCALE: 0.8,
        keys.META_FORCE_STD_MAP: {keys.META_MAP_SIGMA: knots.tolist(),
                                  keys.META_MAP_CALIBRATED: [0.02, 0.02, 0.05, 0.4, 0.41]},
        keys.META_ENERGY_STD_MAP: {keys.META_MAP_SIGMA: [0.3 * per_atom_energy_sigma, 3 * per_atom_energy_sigma],
                                   keys.META_MAP_CALIBRATED: [0.002, 0.003]},
    }
    if by_parts:
        from conftest import batch_of

        epistemic, aleatoric = calc.results["forces_std_epistemic"], calc.results["forces_std_aleatoric"]
        energy_var = posterior(batch_of([to_atoms(s)], TYPES, posterior.cutoff))
        epi_pa, ale_pa = (float(energy_var[name][0].detach().sqrt()) / len(s.ids)
                          for name in (keys.ENERGY_VAR_EPISTEMIC, keys.ENERGY_VAR_ALEATORIC))
        del calibration[keys.META_FORCE_STD_MAP], calibration[keys.META_ENERGY_STD_MAP]
        calibration.update({
            keys.META_FORCE_EPISTEMIC_STD_MAP: {keys.META_MAP_SIGMA: np.quantile(epistemic, [0.2, 0.5, 0.8]).tolist(),
                                                keys.META_MAP_CALIBRATED: [0.01, 0.2, 0.5]},
            keys.META_FORCE_ALEATORIC_STD_MAP: {keys.META_MAP_SIGMA: np.quantile(aleatoric, [0.3, 0.7]).tolist(),
                                                keys.META_MAP_CALIBRATED: [0.02, 0.03]},
            keys.META_ENERGY_EPISTEMIC_STD_MAP: {keys.META_MAP_SIGMA: [0.5 * epi_pa, 2 * epi_pa],
                                                 keys.META_MAP_CALIBRATED: [0.004, 0.005]},
            keys.META_ENERGY_ALEATORIC_STD_MAP: {keys.META_MAP_SIGMA: [2 * ale_pa], keys.META_MAP_CALIBRATED: [0.001]},
        })
    calibrated = copy.deepcopy(posterior)
    calibrated.calibration = calibration
    threshold = 1.2 * 0.1  # on the calibrated σ: atoms above the 4th knot exceed it, below the 3rd not
    mapped_meta = build_metadata(calibrated, "float64", thresholds={keys.ATOMIC_FORCE_STD: threshold},
                                 training_data_sha256="0" * 64)
    assert mapped_meta[keys.META_CALIBRATION] == calibration
    mapped = tmp_path / "mapped.pt"
    # same network, new metadata: re-save instead of scripting again
    torch.jit.save(torch.jit.load(model), str(mapped), _extra_files={keys.METADATA_FILE: json.dumps(mapped_meta)})
    write_data(s, tmp_path / "data.lmp")
    rc, out = run_lmp(lammps_input(plugin_path, str(mapped), s), tmp_path, nprocs=nprocs)
    assert rc == 0, out[-3000:]
    got = parse_lammps_result(tmp_path)
    want = python_reference(calibrated, s, threshold)
    assert 0 < want["n_over"] < len(s.ids)
    assert_same(got, want, rtol=1e-8, skip=("atomic_virial6",))
    # and the calibration does act per atom (a map, not one scale)
    plain = python_reference(posterior, s, threshold)
    ratio = want["uq"][:, 0] / plain["uq"][:, 0]
    assert ratio.max() > 1.5 * ratio.min()


def test_forces_are_finite_differences_of_lammps_energy(plugin_path, race, tmp_path):
    """Central differences of `pe` after moving one atom (`set atom`), in one LAMMPS."""
    _, model, _ = race
    s = psb3_structure(seed=3)
    write_data(s, tmp_path / "data.lmp")
    lines = [f"plugin load {plugin_path}" if plugin_path else "", "units metal", "boundary f f f",
             "atom_style atomic", "atom_modify map yes", "read_data data.lmp",
             "pair_style bayesrace", f"pair_coeff * * {model} H C N", "thermo_style custom step pe", "run 0"]
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        lmp = lammps_instance()
        try:
            lmp.commands_string("\n".join(lines))
            ids = np.array(lmp.numpy.extract_atom("id"))[: lmp.get_natoms()].copy()
            forces = np.array(lmp.numpy.extract_atom("f"))[: len(ids)].copy()
            f_by_id = dict(zip(ids.tolist(), forces))
            h = 1e-4
            worst = 0.0
            for k in (0, 5, 9, 13):  # a C, the N, and two H
                atom_id = int(s.ids[k])
                for axis, name in enumerate("xyz"):
                    energies = []
                    for step in (h, -h):
                        value = float(s.positions[k, axis] + step)
                        lmp.command(f"set atom {atom_id} {name} {value!r}")
                        lmp.command("run 0")
                        energies.append(lmp.get_thermo("pe"))
                    lmp.command(f"set atom {atom_id} {name} {float(s.positions[k, axis])!r}")
                    fd = -(energies[0] - energies[1]) / (2 * h)
                    worst = max(worst, abs(fd - f_by_id[atom_id][axis]))
            scale = np.abs(forces).max()
        finally:
            lmp.close()
    finally:
        os.chdir(old)
    print(f"finite differences (h = 1e-4 Å): max |F_fd - F| {worst:.2e} eV/Å, max |F| {scale:.3g} eV/Å")
    assert scale > 0.01  # forces far from zero, so the comparison means something
    assert worst < 1e-6 * max(scale, 1.0), (worst, scale)


def _nve_fluctuation(plugin_path, model, s, tmp_path, dt_fs, time_fs) -> float:
    steps = int(round(time_fs / dt_fs))
    extra = "\n".join([
        "velocity all create 300.0 4928459 loop geom",
        "fix nve all nve",
        f"timestep {dt_fs / 1000.0}",
        "thermo 1",
        'fix e all print 1 "NVE $(step) $(etotal:%.17g)" screen no file nve.txt',
    ])
    inp = lammps_input(plugin_path, model, s, dump=False, extra=extra, run=f"run {steps}")
    inp = inp.replace("compute u all bayesrace/atom\ncompute ug all bayesrace\n", "")
    inp = re.sub(r"thermo_style custom .*\n", "thermo_style custom step etotal\n", inp)
    inp = re.sub(r"print \"GLOBAL.*\n", "", inp)
    work = tmp_path / f"dt{dt_fs}"
    work.mkdir()
    write_data(s, work / "data.lmp")
    rc, out = run_lmp(inp, work)
    assert rc == 0, out[-3000:]
    e = parse_tagged((work / "nve.txt").read_text(), "NVE")
    assert len(e) == steps + 1
    return float(np.abs(e[:, 1] - e[0, 1]).max())


def test_nve_energy_error_shrinks_as_dt_squared(plugin_path, race, tmp_path):
    """Velocity Verlet conserves a shadow energy: |E_tot - E_0| scales as dt^2."""
    _, model, _ = race
    s = psb3_structure(seed=1, jitter=0.0)
    big = _nve_fluctuation(plugin_path, model, s, tmp_path, 0.5, 50.0)
    small = _nve_fluctuation(plugin_path, model, s, tmp_path, 0.25, 50.0)
    ratio = big / small
    print(f"NVE 50 fs: max |E-E0| {big:.3e} eV (0.5 fs), {small:.3e} eV (0.25 fs), ratio {ratio:.2f}")
    assert big < 0.05
    assert 2.5 < ratio < 6.0, ratio


# ----------------------------------------------------------------------------- MPI


@pytest.mark.parametrize("kind", ["psb3", "triclinic"])
def test_mpi_matches_serial(plugin_path, race, tmp_path, kind):
    _, model, _ = race
    s = STRUCTURES[kind]()
    results = {}
    for nprocs in (1, 2, 4):
        work = tmp_path / f"np{nprocs}"
        work.mkdir()
        write_data(s, work / "data.lmp")
        rc, out = run_lmp(lammps_input(plugin_path, model, s), work, nprocs=nprocs)
        assert rc == 0, out[-3000:]
        results[nprocs] = parse_lammps_result(work)
    for nprocs in (2, 4):
        assert_same(results[nprocs], results[1], rtol=1e-10)


def test_mpi_empty_subdomain(plugin_path, race, tmp_path):
    """processors 4 1 1 with PSB3 at one end of a long box: some ranks own no atom."""
    _, model, _ = race
    s = psb3_structure(origin=(5.0, 15.0, 15.0), box=(48.0, 30.0, 30.0))
    results = {}
    for nprocs, processors in ((1, ""), (4, "processors 4 1 1")):
        work = tmp_path / f"np{nprocs}"
        work.mkdir()
        write_data(s, work / "data.lmp")
        rc, out = run_lmp(lammps_input(plugin_path, model, s, processors=processors), work, nprocs=nprocs)
        assert rc == 0, out[-3000:]
        if nprocs == 4:
            nlocal = re.search(r"Nlocal:\s+(\S+) ave\s+(\S+) max\s+(\S+) min", out)
            assert nlocal and float(nlocal.group(3)) == 0.0, "expected an empty subdomain"
        results[nprocs] = parse_lammps_result(work)
    assert_same(results[4], results[1], rtol=1e-10)


# ----------------------------------------------------------------------------- fix halt


def _frame_structure(atoms) -> Structure:
    x = atoms.positions - atoms.positions.mean(0) + 15.0
    return Structure(x, atoms.get_chemical_symbols(), 1 + np.arange(len(atoms)))


def _halt_run(plugin_path, model, s, threshold, work):
    write_data(s, work / "data.lmp")
    extra = "\n".join([
        "thermo 1",
        "variable s equal c_ug[1]",
        f"fix h all halt 1 v_s > {threshold!r} error soft",
    ])
    # no time integration: the frame itself is judged at every step
    rc, out = run_lmp(lammps_input(plugin_path, model, s, dump=False, extra=extra, run="run 5"), work)
    assert rc == 0, out[-3000:]
    fired = re.search(r"Fix halt condition.*met on step (\d+)", out)
    return (int(fired.group(1)) if fired else None), out


def test_fix_halt_fires_out_of_distribution_only(plugin_path, trained, tmp_path):
    """Threshold between the largest max-σ of the in-distribution test frames and the
    max-σ of a strongly distorted geometry (an in-distribution frame compressed to 85 %)."""
    import ase.io

    from bayesrace.calculator import BayesRaceCalculator

    posterior, model, data = trained
    calc = BayesRaceCalculator(posterior)

    def max_sigma(atoms):
        atoms = atoms.copy()
        atoms.calc = calc
        atoms.get_potential_energy()
        return float(calc.results["forces_std"].max())

    id_frames = ase.io.read(data / "test_id.xyz", ":")
    id_sigmas = [max_sigma(a) for a in id_frames]
    worst_id = id_frames[int(np.argmax(id_sigmas))]
    ood = id_frames[0].copy()
    ood.positions = 0.85 * (ood.positions - ood.positions.mean(0))
    torsion = ase.io.read(data / "test_ood_torsion.xyz", ":")
    twisted = [a for a in torsion if abs(a.info.get("dihedral_deg", 0.0) - 90.0) < 1.0]
    sig_ood = max_sigma(ood)
    report = (f"max force σ (eV/Å): ID test frames {min(id_sigmas):.3f}..{max(id_sigmas):.3f}, "
              f"compressed 85 % {sig_ood:.3f}, torsion 90° "
              f"{max_sigma(twisted[0]) if twisted else float('nan'):.3f}")
    print(report)
    assert sig_ood > max(id_sigmas), "the briefly trained ensemble does not separate ID from OOD: " + report
    threshold = float(np.sqrt(max(id_sigmas) * sig_ood))  # geometric midpoint

    (tmp_path / "id").mkdir()
    (tmp_path / "ood").mkdir()
    step_id, out_id = _halt_run(plugin_path, model, _frame_structure(worst_id), threshold, tmp_path / "id")
    step_ood, out_ood = _halt_run(plugin_path, model, _frame_structure(ood), threshold, tmp_path / "ood")
    assert step_id is None, out_id[-2000:]
    assert step_ood == 1, out_ood[-2000:]


# ----------------------------------------------------------------------------- examples


def test_psb3_example_runs_under_mpi_and_halts(plugin_path, trained, tmp_path, monkeypatch):
    """examples/ hold exactly what bayesrace.lammps writes; the example runs under
    mpirun -np 2 and stops at the first check once an atom's σ exceeds the threshold
    (the trained model's default threshold, 3 x sqrt(1e-3) eV/Å, is below every σ)."""
    from pathlib import Path

    from bayesrace.lammps import PSB3_INPUT, psb3_data_text, run_psb3_example

    root = Path(__file__).resolve().parents[2]
    assert (root / "examples" / "psb3" / "in.psb3").read_text() == PSB3_INPUT
    assert (root / "examples" / "psb3" / "psb3.data").read_text() == psb3_data_text()
    assert (root / "examples" / "periodic" / "cell.data").read_text() == psb3_data_text(box=11.0)
    if plugin_path:  # a hand-built plugin: let lmp find it without a 'plugin load' line
        monkeypatch.setenv("LAMMPS_PLUGIN_PATH", str(Path(plugin_path).parent))
    _, model, _ = trained
    result = run_psb3_example(model, tmp_path, nprocs=2, steps=200)
    assert result["halted"] and result["halt_step"] == 10, result
    assert result["max_force_std"] > 3.0 * 1e-3**0.5
    dump = result["dump"].read_text()
    assert dump.count("ITEM: ATOMS id type x y z c_u[1] c_u[2] c_u[3] c_u[4] c_u[7]") == 2  # steps 0 and 10
    assert result["max_feature_distance"] > 0  # bayesrace train fitted a feature density
