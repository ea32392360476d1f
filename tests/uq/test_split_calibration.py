"""Calibration by parts (method split): known answers of the fit, the epistemic σ never
narrowed by in-distribution data, order kept within each part, and the application."""

from __future__ import annotations

import numpy as np
import pytest

from bayesrace import keys
from bayesrace.bayes import METHODS, CalibrationError, calibrate_prediction, validate_calibration
from bayesrace.uq import fit_calibration
from bayesrace.uq._predict import reference_key
from bayesrace.uq._split_calibration import fit_split_maps

SIGMA, CALIBRATED = keys.META_MAP_SIGMA, keys.META_MAP_CALIBRATED


def parts_sample(seed, n, epistemic_factor, aleatoric_factor, aleatoric_power=1.0, components=3):
    """Raw σ's of both parts, and squared errors drawn with the true variance
    (f_e·e)² + (f_a·a0·(a/a0)^p)², summed over ``components``."""
    rng = np.random.default_rng(seed)
    e = np.exp(rng.uniform(np.log(0.005), np.log(0.3), n))
    a = np.exp(rng.uniform(np.log(0.02), np.log(0.2), n))
    a0 = np.median(a)
    true_sigma = np.sqrt((epistemic_factor * e) ** 2 + (aleatoric_factor * a0 * (a / a0) ** aleatoric_power) ** 2)
    squared_error = np.sum((rng.normal(size=(n, components)) * true_sigma[:, None]) ** 2, axis=1)
    return squared_error, e, a


def test_fit_recovers_known_factors():
    y, e, a = parts_sample(0, 20000, epistemic_factor=2.0, aleatoric_factor=0.5)
    epistemic, aleatoric, fitted = fit_split_maps(y, e, a, 3, "forces")
    assert fitted["epistemic_scale"] == pytest.approx(2.0, rel=0.05)
    assert fitted["aleatoric_scale"] == pytest.approx(0.5, rel=0.05)
    assert fitted["aleatoric_power"] == pytest.approx(1.0, abs=0.1)
    assert epistemic[CALIBRATED][0] / epistemic[SIGMA][0] == pytest.approx(fitted["epistemic_scale"], rel=1e-12)


def test_fit_recovers_a_power_and_chooses_it_on_held_out_data():
    y, e, a = parts_sample(1, 20000, epistemic_factor=1.0, aleatoric_factor=0.7, aleatoric_power=2.0)
    _, aleatoric, fitted = fit_split_maps(y, e, a, 3, "forces")
    assert fitted["held_out_nll_power_free"] < fitted["held_out_nll_power_1"]
    assert fitted["aleatoric_power"] == pytest.approx(2.0, rel=0.1)
    x, g = np.asarray(aleatoric[SIGMA]), np.asarray(aleatoric[CALIBRATED])
    assert np.all(np.diff(x) > 0) and np.all(np.diff(g) > 0)  # strictly increasing: the order is kept


def test_in_distribution_fit_never_narrows_the_epistemic_part():
    """Both parts twice too wide in distribution: the total map shrinks every σ, the split
    fit shrinks only the aleatoric part. On an out-of-distribution atom (large epistemic,
    ordinary aleatoric σ) the split σ keeps the raw epistemic σ, the isotonic one does not."""
    y, e, a = parts_sample(2, 20000, epistemic_factor=0.5, aleatoric_factor=0.5)
    _, _, fitted = fit_split_maps(y, e, a, 3, "forces")
    assert fitted["epistemic_scale"] == pytest.approx(1.0, abs=1e-9)  # floored, not 0.5
    assert fitted["aleatoric_scale"] < 0.6
    prediction = {
        keys.FORCES: np.zeros((e.size, 3)),
        reference_key(keys.FORCES): np.sqrt(y / 3.0)[:, None] * np.ones(3),
        keys.ATOMIC_FORCE_STD: np.hypot(e, a),
        keys.ATOMIC_FORCE_STD_EPISTEMIC: e,
        keys.ATOMIC_FORCE_STD_ALEATORIC: a,
    }
    split, isotonic = fit_calibration(prediction, "split"), fit_calibration(prediction, "isotonic")
    ood = {keys.ATOMIC_FORCE_STD: np.array([np.hypot(3.0, 0.1)]), keys.ATOMIC_FORCE_STD_EPISTEMIC: np.array([3.0]),
           keys.ATOMIC_FORCE_STD_ALEATORIC: np.array([0.1])}
    assert calibrate_prediction(ood, split)[keys.ATOMIC_FORCE_STD][0] >= 3.0
    assert calibrate_prediction(ood, isotonic)[keys.ATOMIC_FORCE_STD][0] < 0.8 * 3.0


def test_split_fit_of_a_prediction_sets_both_quantities_by_parts():
    rng = np.random.default_rng(3)
    y, e, a = parts_sample(3, 3000, 1.5, 0.8)
    num_atoms = np.full(300, 10)
    energy_e, energy_a = rng.uniform(0.001, 0.01, 300), rng.uniform(0.002, 0.004, 300)
    energy_error = rng.normal(size=300) * np.hypot(1.5 * energy_e, 0.8 * energy_a) * num_atoms
    prediction = {
        keys.FORCES: np.zeros((e.size, 3)), reference_key(keys.FORCES): np.sqrt(y / 3.0)[:, None] * np.ones(3),
        keys.ATOMIC_FORCE_STD: np.hypot(e, a), keys.ATOMIC_FORCE_STD_EPISTEMIC: e,
        keys.ATOMIC_FORCE_STD_ALEATORIC: a,
        keys.ENERGY: energy_error, reference_key(keys.ENERGY): np.zeros(300),
        keys.ENERGY_VAR_EPISTEMIC: (energy_e * num_atoms) ** 2, keys.ENERGY_VAR_ALEATORIC: (energy_a * num_atoms) ** 2,
        keys.NUM_ATOMS: num_atoms,
    }
    calibration = fit_calibration(prediction, "split")
    assert set(calibration) == {keys.META_FORCE_STD_SCALE, keys.META_ENERGY_STD_SCALE,
                                keys.META_FORCE_EPISTEMIC_STD_MAP, keys.META_FORCE_ALEATORIC_STD_MAP,
                                keys.META_ENERGY_EPISTEMIC_STD_MAP, keys.META_ENERGY_ALEATORIC_STD_MAP}
    calibrated = calibrate_prediction(prediction, calibration)
    for part in (keys.ATOMIC_FORCE_STD_EPISTEMIC, keys.ATOMIC_FORCE_STD_ALEATORIC):
        # each part keeps its raw order exactly (no ties made)
        np.testing.assert_array_equal(np.argsort(calibrated[part], kind="stable"),
                                      np.argsort(prediction[part], kind="stable"))


def test_application_by_parts_known_values():
    """Two atoms, two structures; one-knot maps (pure ratios) and one interpolated knot pair."""
    prediction = {
        keys.ATOMIC_FORCE_STD: np.array([0.5, 0.5]),
        keys.ATOMIC_FORCE_STD_EPISTEMIC: np.array([0.3, 0.4]),
        keys.ATOMIC_FORCE_STD_ALEATORIC: np.array([0.4, 0.3]),
        keys.FORCE_COV_EPISTEMIC: np.array([0.09, 0.16])[:, None, None] * np.eye(3),
        keys.FORCE_COV_ALEATORIC: np.array([0.16, 0.09])[:, None, None] * np.eye(3),
        keys.ENERGY_VAR_EPISTEMIC: np.array([0.04, 0.16]),  # 2 atoms each: per-atom σ 0.1, 0.2
        keys.ENERGY_VAR_ALEATORIC: np.array([0.01, 0.01]),  # per-atom σ 0.05
        keys.ENERGY_STD: np.sqrt([0.05, 0.17]),
        keys.ATOMIC_ENERGY_STD: np.array([1.0, 1.0, 1.0, 1.0]),
        keys.NUM_ATOMS: np.array([2, 2]),
        keys.BATCH: np.array([0, 0, 1, 1]),
    }
    calibration = {
        keys.META_FORCE_STD_SCALE: 2.0,
        keys.META_FORCE_EPISTEMIC_STD_MAP: {SIGMA: [1.0], CALIBRATED: [3.0]},  # r = 3 (× 2)
        keys.META_FORCE_ALEATORIC_STD_MAP: {SIGMA: [0.3, 0.4], CALIBRATED: [0.15, 0.2]},  # r = 0.5 (× 2)
        keys.META_ENERGY_EPISTEMIC_STD_MAP: {SIGMA: [0.1, 0.2], CALIBRATED: [0.1, 0.4]},  # r = 1, 2
    }
    got = calibrate_prediction(prediction, calibration)
    np.testing.assert_allclose(got[keys.ATOMIC_FORCE_STD_EPISTEMIC], [1.8, 2.4], rtol=1e-12)
    np.testing.assert_allclose(got[keys.ATOMIC_FORCE_STD_ALEATORIC], [0.4, 0.3], rtol=1e-12)
    np.testing.assert_allclose(got[keys.ATOMIC_FORCE_STD], np.hypot([1.8, 2.4], [0.4, 0.3]), rtol=1e-12)
    np.testing.assert_allclose(got[keys.FORCE_COV_EPISTEMIC][:, 0, 0], [1.8**2, 2.4**2], rtol=1e-12)
    np.testing.assert_allclose(got[keys.FORCE_COV_ALEATORIC][:, 1, 1], [0.16, 0.09], rtol=1e-12)
    np.testing.assert_allclose(got[keys.ENERGY_VAR_EPISTEMIC], [0.04, 0.64], rtol=1e-12)
    np.testing.assert_allclose(got[keys.ENERGY_VAR_ALEATORIC], [0.01, 0.01], rtol=1e-12)  # no map: scale 1
    np.testing.assert_allclose(got[keys.ENERGY_STD], np.sqrt([0.05, 0.65]), rtol=1e-12)
    np.testing.assert_allclose(got[keys.ATOMIC_ENERGY_STD], [1.0, 1.0, 2.0, 2.0], rtol=1e-12)


def test_total_and_parts_together_are_refused():
    both = {keys.META_FORCE_STD_MAP: {SIGMA: [1.0], CALIBRATED: [1.0]},
            keys.META_FORCE_ALEATORIC_STD_MAP: {SIGMA: [1.0], CALIBRATED: [1.0]}}
    with pytest.raises(CalibrationError, match="force_std_map.*force_aleatoric_std_map"):
        validate_calibration(both)
    with pytest.raises(CalibrationError, match="energy_epistemic_std_map.sigma must be strictly increasing"):
        validate_calibration({keys.META_ENERGY_EPISTEMIC_STD_MAP: {SIGMA: [2.0, 1.0], CALIBRATED: [1.0, 1.0]}})


def test_fit_refuses_samples_without_any_sigma():
    y, e, a = parts_sample(4, 50, 1.0, 1.0)
    e[3] = a[3] = 0.0
    with pytest.raises(CalibrationError, match="neither an epistemic nor an aleatoric"):
        fit_split_maps(y, e, a, 3, "forces")


def test_one_member_without_spread_gets_only_an_aleatoric_map():
    y, e, a = parts_sample(5, 4000, 1.0, 1.3)
    epistemic, aleatoric, fitted = fit_split_maps(y, np.zeros_like(e), a, 3, "forces")
    assert epistemic is None and aleatoric is not None


def test_every_spelt_out_list_of_methods_is_complete():
    from bayesrace.active._config import CALIBRATION_METHODS as active_methods
    from bayesrace.cli._main import CALIBRATION_METHODS as cli_methods

    assert sorted(cli_methods) == sorted(active_methods) == sorted(METHODS)


def test_calibrate_command_split_end_to_end(tmp_path, capsys):
    """bayesrace calibrate --method split writes maps by parts that the loaded posterior applies."""
    from bayesrace import cli
    from bayesrace.bayes import load_posterior, save_posterior
    from bayesrace.data import read_frames
    from bayesrace.uq import predict_frames
    from conftest import tiny_model
    from test_calibration import write_labelled_set

    posterior_path = tmp_path / "posterior.pt"
    save_posterior(posterior_path, [tiny_model(seed=1), tiny_model(seed=2)], data_sha256="abc")
    valid = write_labelled_set(tmp_path / "valid.xyz", n_frames=12, seed=10)
    out = tmp_path / "split.pt"
    assert cli.main(["calibrate", str(posterior_path), str(valid), "--out", str(out), "--method", "split",
                     "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "forces: scale 1, epistemic map of 1 knots" in printed and "aleatoric map of" in printed
    calibration = load_posterior(out).calibration
    assert keys.META_FORCE_EPISTEMIC_STD_MAP in calibration and keys.META_ENERGY_ALEATORIC_STD_MAP in calibration
    frames = read_frames(valid)
    expected = calibrate_prediction(predict_frames(load_posterior(posterior_path), frames), calibration)
    predicted = predict_frames(load_posterior(out), frames)
    for name in (keys.ATOMIC_FORCE_STD, keys.FORCE_COV_EPISTEMIC, keys.ENERGY_VAR_ALEATORIC, keys.ATOMIC_ENERGY_STD):
        np.testing.assert_allclose(predicted[name], expected[name], rtol=1e-10)


def test_calibrate_command_fits_a_feature_density_for_an_older_posterior(tmp_path, capsys):
    """--feature-density-from: a posterior saved without a density gains one (fitted on that file)
    and a stored feature-distance threshold; a wrong file is a clear error, nothing written."""
    from bayesrace import cli
    from bayesrace.bayes import fit_feature_density, load_posterior, save_posterior
    from bayesrace.data import TypeMap, frames_to_graphs, read_frames
    from conftest import tiny_model
    from test_calibration import write_labelled_set

    posterior_path = tmp_path / "posterior.pt"
    save_posterior(posterior_path, [tiny_model(seed=1), tiny_model(seed=2)], data_sha256="abc")
    assert load_posterior(posterior_path).feature_density is None
    train = write_labelled_set(tmp_path / "train.xyz", n_frames=10, seed=3)
    valid = write_labelled_set(tmp_path / "valid.xyz", n_frames=12, seed=10)
    out = tmp_path / "calibrated.pt"
    missing = tmp_path / "nope.xyz"
    assert cli.main(["calibrate", str(posterior_path), str(valid), "--out", str(out), "--quiet",
                     "--feature-density-from", str(missing)]) != 0
    assert str(missing) in capsys.readouterr().err and not out.exists()
    assert cli.main(["calibrate", str(posterior_path), str(valid), "--out", str(out), "--quiet",
                     "--feature-density-from", str(train)]) == 0
    assert "atomic_feature_distance" in capsys.readouterr().out
    calibrated = load_posterior(out)
    posterior = load_posterior(posterior_path)
    expected = fit_feature_density(list(posterior.members),
                                   frames_to_graphs(read_frames(train), TypeMap(posterior.type_names), posterior.cutoff))
    assert np.allclose(calibrated.feature_density["whiten"].numpy(), expected["whiten"].numpy())
    assert calibrated.thresholds[keys.ATOMIC_FEATURE_DISTANCE] > 0
