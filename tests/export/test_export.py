"""The exported deployable against the Python posterior, the C++ engine against the ASE
calculator and the contract's n_local semantics. The metadata, the refusals, the threshold
and the command line are in test_export_metadata.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bayesrace import keys
from bayesrace.calculator import UNCERTAINTY_RESULTS, BayesRaceCalculator
from bayesrace.bayes import Posterior
from bayesrace.data import build_psb3
from bayesrace.export import build_metadata, export_posterior
from conftest import batch_of, tiny_model
from deployable_tools import TYPES, call, deployable_inputs, engine_results

HASH = "ab" * 32
RTOL = 1e-10

MEMBER_FIELDS = (
    keys.MEMBER_ENERGY,
    keys.MEMBER_ATOMIC_ENERGY,
    keys.MEMBER_FORCES,
    keys.MEMBER_VIRIAL,
    keys.ATOMIC_ENERGY_LOG_VAR,
    keys.FORCE_COVARIANCE,
)


def relative(a, b) -> float:
    a = torch.as_tensor(np.asarray(a, dtype=np.float64))
    b = torch.as_tensor(np.asarray(b, dtype=np.float64))
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))


def psb3_like(seed=0):
    atoms = build_psb3()
    atoms.positions += np.random.default_rng(seed).normal(scale=0.05, size=atoms.positions.shape)
    return atoms


def periodic_cell(n=24, seed=3, triclinic=True):
    """Random C/H/N atoms in a small cell: cutoff 5 Å reaches several images."""
    import ase

    cell = np.array([[7.0, 0.0, 0.0], [1.1, 6.6, 0.0], [-0.7, 0.8, 7.2]]) if triclinic else np.diag([7.0, 6.6, 7.2])
    rng = np.random.default_rng(seed)
    frac = []
    while len(frac) < n:
        f = rng.uniform(size=3)
        if all(np.linalg.norm((d - np.round(d)) @ cell) > 1.0 for d in (f - np.array(frac).reshape(-1, 3))):
            frac.append(f)
    return ase.Atoms([("C", "H", "N", "H")[k % 4] for k in range(n)], scaled_positions=np.array(frac),
                     cell=cell, pbc=True)


def make_posterior(seeds=(0, 1, 2), **kw) -> Posterior:
    posterior = Posterior([tiny_model(seed=s, **kw) for s in seeds]).eval()
    posterior.record_info = {"data_sha256": HASH}
    return posterior


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    posterior = make_posterior()
    path = tmp_path_factory.mktemp("export") / "model.pt"
    meta = export_posterior(posterior, path)
    return posterior, str(path), meta


@pytest.fixture(scope="module")
def exported_l2(tmp_path_factory):
    """One l_max=2 member of the medium architecture (thin channels to stay fast)."""
    posterior = Posterior([tiny_model(seed=5, preset="medium", channels=4, covariance="equivariant")]).eval()
    posterior.record_info = {"data_sha256": HASH}
    path = tmp_path_factory.mktemp("export_l2") / "model.pt"
    export_posterior(posterior, path)
    return posterior, str(path)


def member_reference(posterior, atoms):
    """Per-member outputs of the Python models on one structure."""
    batch = batch_of([atoms], TYPES, posterior.cutoff)
    outs = [member(batch, True, True) for member in posterior.members]
    stack = lambda key: torch.stack([o[key].detach() for o in outs])  # noqa: E731
    return {
        keys.MEMBER_ENERGY: stack(keys.ENERGY)[:, 0],
        keys.MEMBER_ATOMIC_ENERGY: stack(keys.ATOMIC_ENERGY),
        keys.MEMBER_FORCES: stack(keys.FORCES),
        keys.MEMBER_VIRIAL: stack(keys.VIRIAL)[:, 0],
        keys.ATOMIC_ENERGY_LOG_VAR: stack(keys.ATOMIC_ENERGY_LOG_VAR),
        keys.FORCE_COVARIANCE: stack(keys.FORCE_COVARIANCE),
    }


# ------------------------------------------------------------------ deployable vs Python


@pytest.mark.parametrize("kind", ["psb3", "periodic"])
def test_deployable_reproduces_posterior(exported, kind):
    posterior, path, _ = exported
    module = torch.jit.load(path)
    atoms = psb3_like() if kind == "psb3" else periodic_cell()
    got = call(module, deployable_inputs(atoms, posterior.cutoff))
    want = member_reference(posterior, atoms)
    for key in MEMBER_FIELDS:
        assert relative(got[key], want[key]) < RTOL, key
    # the posterior's own predictive API on the same structure
    prediction = posterior(batch_of([atoms], TYPES, posterior.cutoff), compute_virial=True)
    assert relative(got[keys.MEMBER_ENERGY].mean(0), prediction[keys.ENERGY][0].detach()) < RTOL
    assert relative(got[keys.MEMBER_FORCES].mean(0), prediction[keys.FORCES].detach()) < RTOL
    assert relative(got[keys.MEMBER_VIRIAL].mean(0), prediction[keys.VIRIAL][0].detach()) < RTOL
    # per-atom virials split every edge half/half: they sum to the virial
    assert got[keys.MEMBER_ATOMIC_VIRIAL].shape == (3, len(atoms), 3, 3)
    assert relative(got[keys.MEMBER_ATOMIC_VIRIAL].sum(1), got[keys.MEMBER_VIRIAL]) < 1e-12


def test_l2_member_reproduces_python(exported_l2):
    posterior, path = exported_l2
    atoms = periodic_cell(n=20, seed=8, triclinic=True)
    got = call(torch.jit.load(path), deployable_inputs(atoms, posterior.cutoff))
    want = member_reference(posterior, atoms)
    for key in MEMBER_FIELDS:
        assert relative(got[key], want[key]) < RTOL, key


def test_atomic_virial_empty_unless_requested(exported):
    posterior, path, _ = exported
    got = call(torch.jit.load(path), deployable_inputs(psb3_like(), posterior.cutoff), atomic_virial=False)
    assert got[keys.MEMBER_ATOMIC_VIRIAL].numel() == 0


def test_no_grad_is_refused(exported):
    posterior, path, _ = exported
    module = torch.jit.load(path)
    with torch.no_grad(), pytest.raises(Exception, match="needs autograd enabled"):
        call(module, deployable_inputs(psb3_like(), posterior.cutoff))


def test_empty_domain(exported):
    """An MPI rank whose subdomain holds no atoms calls the model with N = E = 0."""
    _, path, _ = exported
    inputs = {"positions": np.zeros((0, 3)), "species": np.zeros(0, dtype=np.int64),
              "edge_index": np.zeros((2, 0), dtype=np.int64), "edge_shifts": np.zeros((0, 3))}
    got = call(torch.jit.load(path), inputs, n_local=0)
    assert got[keys.MEMBER_ENERGY].shape == (3,) and float(got[keys.MEMBER_ENERGY].abs().sum()) == 0.0
    assert got[keys.MEMBER_FORCES].shape == (3, 0, 3)
    assert got[keys.FORCE_COVARIANCE].shape == (3, 0, 3, 3)
    assert got[keys.MEMBER_ATOMIC_VIRIAL].shape == (3, 0, 3, 3)


# ------------------------------------------------------------------ n_local semantics


def test_n_local_counts_only_local_energies_and_differentiates_all_atoms(exported):
    """Forces on every atom (ghosts included) are -dE_local/dx, checked by autograd
    through positions, independently of the edge-vector chain rule of the deployable."""
    posterior, path, _ = exported
    atoms = psb3_like(seed=4)
    inputs = deployable_inputs(atoms, posterior.cutoff)
    n_local = 5
    got = call(torch.jit.load(path), inputs, n_local=n_local)
    ei = torch.tensor(inputs["edge_index"])
    for m, member in enumerate(posterior.members):
        x = torch.tensor(inputs["positions"], requires_grad=True)
        vectors = x[ei[1]] - x[ei[0]] + torch.tensor(inputs["edge_shifts"])
        atomic = member.atomic_outputs(torch.tensor(inputs["species"]), ei, vectors)[keys.ATOMIC_ENERGY]
        energy = atomic[:n_local].sum()
        (grad,) = torch.autograd.grad(energy, x)
        assert relative(got[keys.MEMBER_ENERGY][m], energy.detach()) < 1e-13
        assert relative(got[keys.MEMBER_FORCES][m], -grad) < RTOL
        # every atom's energy and heads are returned, local or not
        assert relative(got[keys.MEMBER_ATOMIC_ENERGY][m], atomic.detach()) < 1e-13
    assert float(got[keys.MEMBER_FORCES][:, n_local:].abs().max()) > 0.0  # ghosts feel the local energy


def test_two_domains_add_up_to_the_whole(exported):
    """Split a molecule into two 'ranks' (each sees every atom, owns a part): energies,
    forces and virials of the two calls add up to the single call, as LAMMPS needs."""
    posterior, path, _ = exported
    module = torch.jit.load(path)
    atoms = psb3_like(seed=5)
    n = len(atoms)
    whole = call(module, deployable_inputs(atoms, posterior.cutoff))
    order = np.random.default_rng(0).permutation(n)
    owned = [order[: n // 2], order[n // 2 :]]
    energy = torch.zeros(3, dtype=torch.float64)
    forces = torch.zeros(3, n, 3, dtype=torch.float64)
    virial = torch.zeros(3, 3, 3, dtype=torch.float64)
    for part in owned:
        rest = np.setdiff1d(np.arange(n), part)
        perm = np.concatenate([part, rest])  # local atoms first, then 'ghosts'
        out = call(module, deployable_inputs(atoms[perm], posterior.cutoff), n_local=len(part))
        energy += out[keys.MEMBER_ENERGY]
        forces[:, perm] += out[keys.MEMBER_FORCES]
        virial += out[keys.MEMBER_VIRIAL]
    assert relative(energy, whole[keys.MEMBER_ENERGY]) < 1e-13
    assert relative(forces, whole[keys.MEMBER_FORCES]) < RTOL
    assert relative(virial, whole[keys.MEMBER_VIRIAL]) < RTOL


# ------------------------------------------------------------------ C++ engine vs ASE


@pytest.mark.parametrize("kind", ["psb3", "periodic", "periodic_orthorhombic"])
def test_cpp_engine_matches_ase_calculator(exported, kind):
    from bayesrace import _bayesrace_core as core

    posterior, path, meta = exported
    engine = core.Engine(path)
    assert engine.metadata == meta
    assert engine.warnings == []
    atoms = {"psb3": psb3_like, "periodic": periodic_cell,
             "periodic_orthorhombic": lambda: periodic_cell(seed=6, triclinic=False)}[kind]()
    calc = BayesRaceCalculator(posterior)
    atoms.calc = calc
    properties = ["energy", "forces", "energies"] + (["stress"] if kind != "psb3" else [])
    calc.calculate(atoms, properties)
    got = engine_results(engine, atoms, posterior.cutoff)
    names = properties + list(UNCERTAINTY_RESULTS)
    assert set(UNCERTAINTY_RESULTS) <= set(got)
    for name in names:
        assert relative(got[name], calc.results[name]) < RTOL, name


def test_calibration_scales_engine_sigmas(exported, tmp_path):
    from bayesrace import _bayesrace_core as core

    posterior, path, _ = exported
    meta = build_metadata(posterior, "float64", calibration={keys.META_FORCE_STD_SCALE: 1.7,
                                                             keys.META_ENERGY_STD_SCALE: 0.6})
    # the threshold is on the calibrated sigma, so the default follows the force scale
    assert meta[keys.META_THRESHOLDS][keys.ATOMIC_FORCE_STD] == pytest.approx(1.7 * 3.0 * 1e-3**0.5)
    # same network, new metadata: re-save instead of scripting again (fast)
    scaled = tmp_path / "scaled.pt"
    torch.jit.save(torch.jit.load(path), str(scaled), _extra_files={keys.METADATA_FILE: json.dumps(meta)})
    atoms = psb3_like()
    base = engine_results(core.Engine(path), atoms, posterior.cutoff)
    cal = engine_results(core.Engine(str(scaled)), atoms, posterior.cutoff)
    assert relative(cal["forces"], base["forces"]) < 1e-14
    for name in ("forces_std", "forces_std_epistemic", "forces_std_aleatoric"):
        assert relative(cal[name], 1.7 * base[name]) < 1e-12, name
    for name in ("energy_std", "energy_std_epistemic", "energy_std_aleatoric", "energies_std"):
        assert relative(cal[name], 0.6 * base[name]) < 1e-12, name


@pytest.mark.parametrize("kind", ["psb3", "periodic"])
def test_map_calibration_engine_matches_calibrated_posterior(exported, tmp_path, kind):
    """Isotonic-style maps: the C++ engine reports the σ's of the Python posterior
    calibrated by the same calibration (Posterior.forward applies it)."""
    import copy

    from bayesrace import _bayesrace_core as core

    posterior, path, _ = exported
    atoms = psb3_like() if kind == "psb3" else periodic_cell()
    calc = BayesRaceCalculator(posterior)
    calc.calculate(atoms, ["energy"])
    sigma = np.sort(calc.results["forces_std"])
    per_atom_energy_sigma = calc.results["energy_std"] / len(atoms)
    # knots inside the atoms' σ range: some atoms below, between and above them
    force_knots = np.quantile(sigma, [0.2, 0.4, 0.6, 0.8])
    calibration = {
        keys.META_FORCE_STD_SCALE: 1.1,
        keys.META_ENERGY_STD_SCALE: 0.9,
        keys.META_FORCE_STD_MAP: {keys.META_MAP_SIGMA: force_knots.tolist(),
                                  keys.META_MAP_CALIBRATED: [0.05, 0.05, 0.3, 0.31]},
        keys.META_ENERGY_STD_MAP: {keys.META_MAP_SIGMA: [0.5 * per_atom_energy_sigma, 2 * per_atom_energy_sigma],
                                   keys.META_MAP_CALIBRATED: [0.001, 0.02]},
    }
    calibrated = copy.deepcopy(posterior)
    calibrated.calibration = calibration
    meta = build_metadata(calibrated, "float64")
    assert meta[keys.META_CALIBRATION] == calibration
    mapped = tmp_path / "mapped.pt"
    torch.jit.save(torch.jit.load(path), str(mapped), _extra_files={keys.METADATA_FILE: json.dumps(meta)})
    got = engine_results(core.Engine(str(mapped)), atoms, posterior.cutoff)
    calc = BayesRaceCalculator(calibrated)
    calc.calculate(atoms, ["energy", "forces", "energies"])
    for name in ["energy", "forces"] + list(UNCERTAINTY_RESULTS):
        assert relative(got[name], calc.results[name]) < RTOL, name
    base = engine_results(core.Engine(path), atoms, posterior.cutoff)
    ratio = got["forces_std"] / base["forces_std"]
    assert ratio.max() > 1.5 * ratio.min()  # a map, not a scale


def test_untrained_heads_report_zero_aleatoric(tmp_path):
    """An MSE-trained posterior: log-variance -inf and zero covariance travel through the
    deployable and the C++ aggregation as zero aleatoric σ (not NaN)."""
    from bayesrace import _bayesrace_core as core

    posterior = make_posterior(seeds=(0, 1))
    for member in posterior.members:
        member.set_trained_heads([])
    path = tmp_path / "mse.pt"
    export_posterior(posterior, path)
    atoms = psb3_like()
    got = engine_results(core.Engine(str(path)), atoms, posterior.cutoff)
    calc = BayesRaceCalculator(posterior)
    calc.calculate(atoms, ["energy", "forces"])
    for name in ["energy", "forces"] + list(UNCERTAINTY_RESULTS):
        assert np.all(np.isfinite(got[name])), name
        assert relative(got[name], calc.results[name]) < RTOL, name
    assert got["energy_std_aleatoric"] == 0.0 and float(np.max(got["forces_std_aleatoric"])) == 0.0
    assert got["energy_std"] > 0.0


def test_float32_export(tmp_path):
    from bayesrace import _bayesrace_core as core

    posterior = make_posterior(seeds=(0, 1))
    path32 = tmp_path / "model32.pt"
    meta = export_posterior(posterior, path32, dtype="float32")
    assert meta[keys.META_DTYPE] == "float32"
    assert next(posterior.parameters()).dtype == torch.float64  # the posterior is not touched
    atoms = psb3_like()
    got = engine_results(core.Engine(str(path32)), atoms, posterior.cutoff)
    calc = BayesRaceCalculator(posterior)
    calc.calculate(atoms, ["energy", "forces"])
    assert relative(got["energy"], calc.results["energy"]) < 1e-6
    assert relative(got["forces"], calc.results["forces"]) < 1e-4
    assert relative(got["forces_std"], calc.results["forces_std"]) < 1e-4
