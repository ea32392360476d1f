"""The C++ engine through the pybind11 binding: agreement with the TorchScript module run from
Python plus the aggregation formulas written in numpy (metadata checks: test_core_metadata.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cpp_fixtures import FILTERS

pytestmark = FILTERS

from cpp_fixtures import core, plugin_path, toy_dir, toy_model, toy_model_3layers  # noqa: E402,F401
import torch

from lmp_tools import molecule, periodic, reference_edges
from toy_deployable import default_metadata, write_toy


def numpy_ratio(sigma, scale, std_map=None):
    """The contract's r(σ) = s·g(σ)/σ, written independently with np.interp: g linear
    between the knots, proportional (σ·y_1/x_1, σ·y_K/x_K) outside; r(0) = s·y_1/x_1."""
    sigma = np.asarray(sigma, dtype=float)
    if std_map is None:
        return np.full_like(sigma, scale)
    x = np.asarray(std_map["sigma"], dtype=float)
    y = np.asarray(std_map["calibrated"], dtype=float)
    g = np.interp(sigma, x, y)
    g = np.where(sigma < x[0], sigma * y[0] / x[0], g)
    g = np.where(sigma > x[-1], sigma * y[-1] / x[-1], g)
    safe = np.where(sigma > 0, sigma, 1.0)
    return scale * np.where(sigma > 0, g / safe, y[0] / x[0])


def numpy_aggregate(raw, n_local, meta):
    """The contract's aggregation and calibration, independently in numpy."""
    cal = meta["calibration"]
    forces = raw["member_forces"][:, :n_local]
    dev = forces - forces.mean(0)
    epi = np.einsum("mia,mib->iab", dev, dev) / forces.shape[0]
    ale = raw["force_covariance"][:, :n_local].mean(0)
    tr = lambda c: np.trace(c, axis1=-2, axis2=-1) / 3.0  # noqa: E731
    ea = raw["member_atomic_energy"][:, :n_local]
    var_e = np.var(raw["member_energy"])
    var_a = np.mean(np.exp(raw["atomic_energy_log_var"][:, :n_local].mean(1)))
    # forces: per atom, from the uncalibrated total σ; energy: from the per-atom energy σ
    fs = numpy_ratio(np.sqrt(tr(epi + ale)), cal["force_std_scale"], cal.get("force_std_map"))
    es = numpy_ratio(np.sqrt(var_e + var_a) / n_local, cal["energy_std_scale"], cal.get("energy_std_map"))
    return {
        "atomic_force_std": fs * np.sqrt(tr(epi + ale)),
        "atomic_force_std_epistemic": fs * np.sqrt(tr(epi)),
        "atomic_force_std_aleatoric": fs * np.sqrt(tr(ale)),
        "atomic_energy_std": es * ea.std(0),
        "force_cov_epistemic": fs[:, None, None] ** 2 * epi,
        "force_cov_aleatoric": fs[:, None, None] ** 2 * ale,
        "energy_var_epistemic": es**2 * var_e,
        "energy_var_aleatoric": es**2 * var_a,
        "energy_std": es * np.sqrt(var_e + var_a),
    }


def torchscript(path, x, species, ei, shifts, n_local, atomic_virial, dtype=torch.float64):
    module = torch.jit.load(path)
    out = module(
        torch.tensor(x, dtype=dtype), torch.tensor(species), torch.tensor(ei),
        torch.tensor(shifts, dtype=dtype), int(n_local), atomic_virial,
    )
    return {k: v.detach().to(torch.float64).numpy() for k, v in out.items()}


def close(a, b, rtol):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    scale = max(np.abs(b).max(initial=0.0), 1e-300)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale)


def structure_inputs(kind):
    s = molecule() if kind == "molecule" else periodic(triclinic=(kind == "triclinic"))
    ei, shifts = reference_edges(s, 3.0)
    species = np.array([["H", "C", "N"].index(e) for e in s.elements], dtype=np.int64)
    return s.positions, species, ei, shifts


# --------------------------------------------------------------------------- metadata


def test_unknown_device(core, toy_model):
    with pytest.raises(RuntimeError, match="unknown device 'tpu'"):
        core.Engine(toy_model, device="tpu")


def test_cuda_refused_without_gpu(core, toy_model):
    if torch.cuda.is_available():
        pytest.fail("this test documents the CPU-only behaviour; run the CUDA checks instead on a GPU machine")
    with pytest.raises(RuntimeError, match="no CUDA support or no GPU"):
        core.Engine(toy_model, device="cuda")


def test_member_count_mismatch(core, tmp_path):
    path = tmp_path / "m4.pt"
    write_toy(str(path), n_members=3, metadata_override={"n_members": 4})
    engine = core.Engine(str(path))
    x, species, ei, shifts = structure_inputs("molecule")
    with pytest.raises(RuntimeError, match="member_energy' of shape"):
        engine.evaluate(x, species, ei, shifts)


# --------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("kind", ["molecule", "periodic", "triclinic"])
@pytest.mark.parametrize("driving", ["mean", 1])
@pytest.mark.parametrize("atomic_virial", [True, False])
def test_binding_matches_torchscript(core, toy_model, kind, driving, atomic_virial):
    x, species, ei, shifts = structure_inputs(kind)
    n = len(x)
    engine = core.Engine(toy_model)
    got = engine.evaluate(x, species, ei, shifts, n, driving, atomic_virial)
    raw = torchscript(toy_model, x, species, ei, shifts, n, atomic_virial)
    for key in ["member_energy", "member_atomic_energy", "member_forces", "member_virial",
                "atomic_energy_log_var", "force_covariance"]:
        close(got[key], raw[key], 1e-12)
    if atomic_virial:
        close(got["member_atomic_virial"], raw["member_atomic_virial"], 1e-12)
        assert got["atomic_virial"].shape == (n, 3, 3)
    else:
        assert "member_atomic_virial" not in got and "atomic_virial" not in got
    pick = (lambda a: a.mean(0)) if driving == "mean" else (lambda a: a[driving])
    close(got["energy"], pick(raw["member_energy"]), 1e-12)
    close(got["forces"], pick(raw["member_forces"]), 1e-12)
    close(got["virial"], pick(raw["member_virial"]), 1e-12)
    close(got["atomic_energy"], pick(raw["member_atomic_energy"]), 1e-12)
    if atomic_virial:
        close(got["atomic_virial"], pick(raw["member_atomic_virial"]), 1e-12)
    ref = numpy_aggregate(raw, n, engine.metadata)
    for key, value in ref.items():
        close(got[key], value, 1e-12)
    # physics sanity of the toy: forces sum to zero, virial = sum x f for a molecule
    np.testing.assert_allclose(got["forces"].sum(0), 0.0, atol=1e-12)
    if kind == "molecule":
        close(got["virial"], np.einsum("na,nb->ab", x, got["forces"]), 1e-10)


def test_n_local_subset(core, toy_model):
    """Rows beyond n_local are ghosts: not summed, not aggregated."""
    x, species, ei, shifts = structure_inputs("molecule")
    n_local = 6
    engine = core.Engine(toy_model)
    got = engine.evaluate(x, species, ei, shifts, n_local, "mean", True)
    raw = torchscript(toy_model, x, species, ei, shifts, n_local, True)
    close(got["member_energy"], raw["member_atomic_energy"][:, :n_local].sum(1), 1e-12)
    ref = numpy_aggregate(raw, n_local, engine.metadata)
    for key, value in ref.items():
        close(got[key], value, 1e-12)
    assert got["atomic_force_std"].shape == (n_local,)


def test_float32_model(core, tmp_path):
    path = tmp_path / "f32.pt"
    write_toy(str(path), dtype="float32")
    x, species, ei, shifts = structure_inputs("periodic")
    engine = core.Engine(str(path))
    got = engine.evaluate(x, species, ei, shifts)
    raw = torchscript(str(path), x, species, ei, shifts, len(x), False, dtype=torch.float32)
    close(got["member_forces"], raw["member_forces"], 1e-6)
    assert got["forces"].dtype == np.float64


def test_aggregate_function(core):
    rng = np.random.default_rng(5)
    m, n = 4, 7
    raw = {
        "member_forces": rng.normal(size=(m, n, 3)),
        "member_atomic_energy": rng.normal(size=(m, n)),
        "atomic_energy_log_var": rng.normal(size=(m, n)),
    }
    a = rng.normal(size=(m, n, 3, 3))
    raw["force_covariance"] = a @ np.swapaxes(a, -1, -2) + 1e-3 * np.eye(3)
    raw["member_energy"] = raw["member_atomic_energy"].sum(1)
    meta = {"calibration": {"force_std_scale": 1.7, "energy_std_scale": 0.6}}
    got = core.aggregate(
        raw["member_forces"], raw["force_covariance"], raw["member_atomic_energy"], raw["member_energy"],
        raw["atomic_energy_log_var"].sum(1), float(n), 1.7, 0.6,
    )
    for key, value in numpy_aggregate(raw, n, meta).items():
        close(got[key], value, 1e-12)


def test_bad_inputs(core, toy_model):
    engine = core.Engine(toy_model)
    x, species, ei, shifts = structure_inputs("molecule")
    bad = species.copy()
    bad[2] = 3
    with pytest.raises(ValueError, match=r"species\[2\] = 3"):
        engine.evaluate(x, bad, ei, shifts)
    bad_ei = ei.copy()
    bad_ei[1, 0] = len(x)
    with pytest.raises(ValueError, match="edge_index holds atom"):
        engine.evaluate(x, species, bad_ei, shifts)
    with pytest.raises(ValueError, match="out of range"):
        engine.evaluate(x, species, ei, shifts, driving=3)
    with pytest.raises(ValueError, match="driving"):
        engine.evaluate(x, species, ei, shifts, driving="median")
    with pytest.raises(ValueError, match="positions must have shape"):
        engine.evaluate(x[:, :2], species, ei, shifts)


def test_metadata_json_written_by_python_json(core, tmp_path):
    """Unicode and escapes in strings survive the C++ JSON reader."""
    path = tmp_path / "uni.pt"
    write_toy(str(path), metadata_override={"posterior": "ensemble \u00e5 \"q\" \\ \U0001F600"})
    assert core.Engine(str(path)).metadata["posterior"] == "ensemble \u00e5 \"q\" \\ \U0001F600"
    assert json.loads(json.dumps(default_metadata(["H"], 3.0, 2, 3, "float64")))


# --------------------------------------------------------------------------- calibration maps


def random_members(seed, m=4, n=9):
    rng = np.random.default_rng(seed)
    raw = {
        "member_forces": rng.normal(size=(m, n, 3)) * rng.uniform(0.2, 3.0, size=(1, n, 1)),
        "member_atomic_energy": rng.normal(size=(m, n)),
        "atomic_energy_log_var": rng.normal(size=(m, n)),
    }
    a = rng.normal(size=(m, n, 3, 3))
    raw["force_covariance"] = 0.1 * (a @ np.swapaxes(a, -1, -2)) + 1e-3 * np.eye(3)
    raw["member_energy"] = raw["member_atomic_energy"].sum(1)
    return raw


def core_aggregate(core, raw, calibration):
    n = raw["member_forces"].shape[1]
    return core.aggregate(
        raw["member_forces"], raw["force_covariance"], raw["member_atomic_energy"], raw["member_energy"],
        raw["atomic_energy_log_var"].sum(1), float(n), calibration.get("force_std_scale", 1.0),
        calibration.get("energy_std_scale", 1.0), calibration.get("force_std_map"),
        calibration.get("energy_std_map"),
    )


def test_calibration_ratio_known_values(core):
    """Hand-computed: s = 2, knots (1, 1), (2, 3), (4, 3)."""
    std_map = {"sigma": [1.0, 2.0, 4.0], "calibrated": [1.0, 3.0, 3.0]}
    sigma = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0])
    # g: 0, 0.5 (proportional below), 1, 2 (interpolated), 3, 3, 3, 3.75 (proportional above)
    want = 2.0 * np.array([1.0, 1.0, 1.0, 2.0 / 1.5, 1.5, 1.0, 0.75, 0.75])
    np.testing.assert_allclose(core.calibration_ratio(sigma, 2.0, std_map), want, rtol=1e-15)
    np.testing.assert_array_equal(core.calibration_ratio(sigma, 1.7), np.full_like(sigma, 1.7))
    single = {"sigma": [0.5], "calibrated": [0.8]}  # one knot: proportional everywhere
    np.testing.assert_allclose(core.calibration_ratio(sigma, 1.0, single), np.full_like(sigma, 1.6), rtol=1e-15)
    rng = np.random.default_rng(0)
    x = np.sort(rng.uniform(0.01, 1.0, 64))
    y = np.sort(rng.uniform(0.01, 2.0, 64))
    dense = {"sigma": x.tolist(), "calibrated": y.tolist()}
    probe = np.concatenate([rng.uniform(0.0, 1.5, 500), x])  # in between, outside and on the knots
    np.testing.assert_allclose(core.calibration_ratio(probe, 0.7, dense), numpy_ratio(probe, 0.7, dense),
                               rtol=1e-13)
    # and the Python implementation that Posterior.forward applies
    from bayesrace.bayes import std_ratio

    probe = np.concatenate([[0.0], probe])
    np.testing.assert_allclose(core.calibration_ratio(probe, 0.7, dense), std_ratio(probe, 0.7, dense), rtol=1e-13)


@pytest.mark.parametrize("energy_position", ["below", "on_knot", "between", "above"])
def test_aggregate_with_maps_matches_numpy(core, energy_position):
    """Force knots through the atoms' own uncalibrated σ's: two atoms below the first knot,
    three exactly on knots, two between, two above the last."""
    raw = random_members(7)
    n = raw["member_forces"].shape[1]
    plain = core_aggregate(core, raw, {})
    s = np.sort(plain["atomic_force_std"])
    assert len(np.unique(s)) == n
    force_map = {"sigma": [s[2], 0.5 * (s[3] + s[4]), s[5], s[6]], "calibrated": [0.3, 0.9, 0.9, 2.5]}
    e = float(plain["energy_std"]) / n  # the per-atom energy σ
    energy_knots = {
        "below": [1.5 * e, 2.0 * e, 3.0 * e],
        "on_knot": [0.5 * e, e, 3.0 * e],
        "between": [0.5 * e, 0.7 * e, 3.0 * e],
        "above": [0.2 * e, 0.5 * e, 0.8 * e],
    }[energy_position]
    energy_map = {"sigma": energy_knots, "calibrated": [0.1, 0.4, 1.1]}
    cal = {"force_std_scale": 1.3, "energy_std_scale": 0.7, "force_std_map": force_map,
           "energy_std_map": energy_map}
    got = core_aggregate(core, raw, cal)
    want = numpy_aggregate(raw, n, {"calibration": cal})
    for key, value in want.items():
        close(got[key], value, 1e-12)
    # on a knot, c(x_k) = s·y_k exactly as the contract says
    on = [np.flatnonzero(plain["atomic_force_std"] == s[k])[0] for k in (2, 5, 6)]
    np.testing.assert_allclose(got["atomic_force_std"][on], 1.3 * np.array([0.3, 0.9, 2.5]), rtol=1e-14)
    if energy_position == "on_knot":
        close(got["energy_std"], 0.7 * 0.4 * n, 1e-13)
    # and the map does change things: calibrated/uncalibrated differs between atoms
    ratio = got["atomic_force_std"] / plain["atomic_force_std"]
    assert ratio.max() > 1.5 * ratio.min()


def test_proportional_single_knot_map_equals_its_scale_bit_for_bit(core):
    """A map g(σ) = σ·y/x with y/x = 1 leaves the scalar calibration untouched, to the bit."""
    raw = random_members(3)
    scalar = core_aggregate(core, raw, {"force_std_scale": 1.7, "energy_std_scale": 0.6})
    unit = {"sigma": [0.25], "calibrated": [0.25]}
    mapped = core_aggregate(core, raw, {"force_std_scale": 1.7, "energy_std_scale": 0.6,
                                        "force_std_map": unit, "energy_std_map": unit})
    for key in scalar:
        np.testing.assert_array_equal(mapped[key], scalar[key], err_msg=key)


def test_aggregate_refuses_bad_maps(core):
    raw = random_members(1)
    with pytest.raises(ValueError, match=r"'force_std_map\.sigma' must be strictly increasing"):
        core_aggregate(core, raw, {"force_std_map": {"sigma": [0.2, 0.1], "calibrated": [1.0, 2.0]}})
    with pytest.raises(ValueError, match=r"energy_std_map has no 'calibrated'"):
        core_aggregate(core, raw, {"energy_std_map": {"sigma": [0.2]}})


def test_engine_applies_metadata_maps(core, toy_model, tmp_path):
    """A deployable whose metadata carries maps: the engine's σ's follow the contract."""
    x, species, ei, shifts = structure_inputs("periodic")
    n = len(x)
    raw = torchscript(toy_model, x, species, ei, shifts, n, False)
    plain = numpy_aggregate(raw, n, {"calibration": {"force_std_scale": 1.0, "energy_std_scale": 1.0}})
    q = np.quantile(plain["atomic_force_std"], [0.2, 0.5, 0.8])
    e = float(plain["energy_std"]) / n
    cal = {
        "force_std_scale": 1.1, "energy_std_scale": 0.9,
        "force_std_map": {"sigma": q.tolist(), "calibrated": [0.05, 0.5, 0.6]},
        "energy_std_map": {"sigma": [0.5 * e, 2.0 * e], "calibrated": [0.01, 0.3]},
    }
    path = tmp_path / "mapped.pt"
    write_toy(str(path), metadata_override={"calibration": cal})
    engine = core.Engine(str(path))
    assert engine.metadata["calibration"] == cal
    got = engine.evaluate(x, species, ei, shifts)
    for key, value in numpy_aggregate(raw, n, {"calibration": cal}).items():
        close(got[key], value, 1e-12)
