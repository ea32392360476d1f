"""Recalibration: the map of the calibration contract, its application, fitting, the file and the CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bayesrace import keys
from bayesrace.bayes import (
    IDENTITY,
    CalibrationError,
    calibrate_prediction,
    calibrated_std,
    std_ratio,
    validate_calibration,
)
from bayesrace.uq import (
    ence,
    extrapolation_threshold,
    fit_calibration,
    gaussian_nll,
    miscalibration_area,
    reference_key,
)

from conftest import random_molecule, tiny_model

torch.set_num_threads(1)

SIGMA, CALIBRATED = keys.META_MAP_SIGMA, keys.META_MAP_CALIBRATED
FORCE_MAP = {SIGMA: [0.1, 0.2, 0.4], CALIBRATED: [0.2, 0.3, 0.3]}


# -- the map ---------------------------------------------------------------------------


def test_map_interpolates_inside_and_is_proportional_outside():
    sigma = np.array([0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.8])
    # below x_1: σ·y_1/x_1 = 2σ; inside: linear through the knots; above x_K: σ·y_K/x_K = 0.75σ
    g = np.array([0.0, 0.1, 0.2, 0.25, 0.3, 0.3, 0.3, 0.6])
    np.testing.assert_allclose(calibrated_std(sigma, 2.0, FORCE_MAP), 2.0 * g, rtol=1e-14)
    ratio = np.array([2.0, 2.0, 2.0, 0.25 / 0.15, 1.5, 1.0, 0.75, 0.75])
    np.testing.assert_allclose(std_ratio(sigma, 2.0, FORCE_MAP), 2.0 * ratio, rtol=1e-14)
    # torch in, torch out, same numbers
    as_tensor = calibrated_std(torch.tensor(sigma), 2.0, FORCE_MAP)
    assert isinstance(as_tensor, torch.Tensor)
    np.testing.assert_allclose(as_tensor.numpy(), 2.0 * g, rtol=1e-14)
    # one knot: proportional everywhere; no map: the scale alone
    np.testing.assert_allclose(calibrated_std(sigma, 1.0, {SIGMA: [0.5], CALIBRATED: [2.0]}), 4.0 * sigma)
    np.testing.assert_allclose(std_ratio(sigma, 3.0, None), np.full(sigma.shape, 3.0))
    np.testing.assert_allclose(calibrated_std(sigma, 3.0, None), 3.0 * sigma)


@pytest.mark.parametrize(
    "calibration, message",
    [
        ({keys.META_FORCE_STD_SCALE: 0.0}, "calibration.force_std_scale must be a finite number > 0"),
        ({keys.META_ENERGY_STD_SCALE: "big"}, "calibration.energy_std_scale must be a number"),
        ({"force_scale": 1.0}, "unknown field(s) ['force_scale']"),
        ({keys.META_FORCE_STD_MAP: {SIGMA: [0.2, 0.1], CALIBRATED: [1.0, 2.0]}},
         "calibration.force_std_map.sigma must be strictly increasing"),
        ({keys.META_ENERGY_STD_MAP: {SIGMA: [0.1, 0.2], CALIBRATED: [2.0, 1.0]}},
         "calibration.energy_std_map.calibrated must be non-decreasing"),
        ({keys.META_FORCE_STD_MAP: {SIGMA: [0.1, 0.2], CALIBRATED: [1.0]}}, "2 knots in 'sigma' but 1 values"),
        ({keys.META_FORCE_STD_MAP: {SIGMA: [0.0, 0.2], CALIBRATED: [1.0, 2.0]}},
         "calibration.force_std_map.sigma must hold finite numbers > 0"),
        ({keys.META_FORCE_STD_MAP: {SIGMA: [], CALIBRATED: []}}, "calibration.force_std_map.sigma must be a non-empty"),
        ({keys.META_FORCE_STD_MAP: {SIGMA: [0.1]}}, "calibration.force_std_map.calibrated is missing"),
        ({keys.META_FORCE_STD_MAP: [0.1, 0.2]}, "calibration.force_std_map must be an object"),
    ],
)
def test_invalid_calibrations_name_the_field(calibration, message):
    with pytest.raises(CalibrationError) as raised:
        validate_calibration(calibration)
    assert message in str(raised.value)


def test_identity_changes_nothing():
    assert validate_calibration(None) == {} and validate_calibration(IDENTITY) == {}
    prediction = {keys.ATOMIC_FORCE_STD: np.array([0.3]), keys.FORCES: np.zeros((1, 3))}
    calibrated = calibrate_prediction(prediction, IDENTITY)
    assert calibrated is not prediction
    assert calibrated[keys.ATOMIC_FORCE_STD] is prediction[keys.ATOMIC_FORCE_STD]


# -- application -------------------------------------------------------------------------


def small_prediction():
    """Two structures (atoms 0, 1 | 2), σ's chosen to land in different branches of the maps."""
    force_sigma = np.array([0.05, 0.15, 0.8])
    eye = np.eye(3)
    return {
        keys.ENERGY: np.array([-1.0, -2.0]),
        keys.FORCES: np.arange(9.0).reshape(3, 3),
        keys.ATOMIC_FORCE_STD: force_sigma,
        keys.ATOMIC_FORCE_STD_EPISTEMIC: np.sqrt(0.6) * force_sigma,
        keys.ATOMIC_FORCE_STD_ALEATORIC: np.sqrt(0.4) * force_sigma,
        keys.FORCE_COV_EPISTEMIC: 0.6 * force_sigma[:, None, None] ** 2 * eye,
        keys.FORCE_COV_ALEATORIC: 0.4 * force_sigma[:, None, None] ** 2 * eye,
        # total energy σ 0.03 eV on 2 atoms (0.015 per atom) and 0.04 eV on 1 atom
        keys.ENERGY_VAR_EPISTEMIC: np.array([0.5, 0.25]) * np.array([0.03, 0.04]) ** 2,
        keys.ENERGY_VAR_ALEATORIC: np.array([0.5, 0.75]) * np.array([0.03, 0.04]) ** 2,
        keys.ATOMIC_ENERGY_STD: np.array([0.1, 0.2, 0.3]),
        keys.NUM_ATOMS: np.array([2, 1]),
        keys.BATCH: np.array([0, 0, 1]),
    }


CALIBRATION = {
    keys.META_FORCE_STD_SCALE: 1.0,
    keys.META_FORCE_STD_MAP: FORCE_MAP,
    keys.META_ENERGY_STD_SCALE: 2.0,
    keys.META_ENERGY_STD_MAP: {SIGMA: [0.01, 0.02], CALIBRATED: [0.02, 0.03]},
}


def check_calibrated(prediction, calibrated):
    # forces: σ = 0.05 (below, r = 2), 0.15 (inside, g = 0.25), 0.8 (above, r = 0.75)
    force_ratio = np.array([2.0, 0.25 / 0.15, 0.75])
    for name in (keys.ATOMIC_FORCE_STD, keys.ATOMIC_FORCE_STD_EPISTEMIC, keys.ATOMIC_FORCE_STD_ALEATORIC):
        np.testing.assert_allclose(calibrated[name], prediction[name] * force_ratio, rtol=1e-12)
    np.testing.assert_allclose(calibrated[keys.ATOMIC_FORCE_STD], [0.1, 0.25, 0.6], rtol=1e-12)
    for name in (keys.FORCE_COV_EPISTEMIC, keys.FORCE_COV_ALEATORIC):
        np.testing.assert_allclose(calibrated[name], prediction[name] * force_ratio[:, None, None] ** 2, rtol=1e-12)
    # energy per atom: 0.015 (inside, g = 0.025, r = 2·5/3) and 0.04 (above, r = 2·1.5)
    energy_ratio = np.array([2.0 * 0.025 / 0.015, 2.0 * 1.5])
    for name in (keys.ENERGY_VAR_EPISTEMIC, keys.ENERGY_VAR_ALEATORIC):
        np.testing.assert_allclose(calibrated[name], prediction[name] * energy_ratio**2, rtol=1e-12)
    np.testing.assert_allclose(
        calibrated[keys.ATOMIC_ENERGY_STD], [0.1 * energy_ratio[0], 0.2 * energy_ratio[0], 0.3 * energy_ratio[1]],
        rtol=1e-12,
    )
    for name in (keys.ENERGY, keys.FORCES, keys.NUM_ATOMS, keys.BATCH):
        np.testing.assert_array_equal(np.asarray(calibrated[name]), np.asarray(prediction[name]))


def test_calibrate_prediction_scales_by_explicit_ratios():
    prediction = small_prediction()
    original = {name: value.copy() for name, value in prediction.items()}
    calibrated = calibrate_prediction(prediction, CALIBRATION)
    assert all(isinstance(value, np.ndarray) for value in calibrated.values())
    check_calibrated(prediction, calibrated)
    for name, value in original.items():  # the input is not modified
        np.testing.assert_array_equal(prediction[name], value)


def test_calibrate_prediction_on_tensors_gives_the_same_numbers():
    prediction = small_prediction()
    tensors = {name: torch.from_numpy(value.copy()) for name, value in prediction.items()}
    calibrated = calibrate_prediction(tensors, CALIBRATION, tensors[keys.NUM_ATOMS], tensors[keys.BATCH])
    assert all(isinstance(value, torch.Tensor) for value in calibrated.values())
    check_calibrated(prediction, {name: value.numpy() for name, value in calibrated.items()})


# -- fitting -------------------------------------------------------------------------------


def synthetic_prediction(seed, true_sigma_of, n_structures=400, atoms_per_structure=(3, 12)):
    """Predictions whose errors are drawn with true σ = true_sigma_of(predicted σ)."""
    rng = np.random.default_rng(seed)
    num_atoms = rng.integers(*atoms_per_structure, size=n_structures)
    n_atoms = int(num_atoms.sum())
    force_sigma = np.exp(rng.uniform(np.log(0.02), np.log(0.5), size=n_atoms))
    forces = rng.normal(size=(n_atoms, 3))
    reference_forces = forces - rng.normal(size=(n_atoms, 3)) * true_sigma_of(force_sigma)[:, None]
    per_atom_energy_sigma = np.exp(rng.uniform(np.log(0.002), np.log(0.05), size=n_structures))
    energy_sigma = per_atom_energy_sigma * num_atoms
    energy = rng.normal(size=n_structures)
    reference_energy = energy - rng.normal(size=n_structures) * true_sigma_of(per_atom_energy_sigma) * num_atoms
    return {
        keys.FORCES: forces,
        reference_key(keys.FORCES): reference_forces,
        keys.ATOMIC_FORCE_STD: force_sigma,
        keys.ATOMIC_FORCE_STD_EPISTEMIC: force_sigma / math.sqrt(2.0),
        keys.ATOMIC_FORCE_STD_ALEATORIC: force_sigma / math.sqrt(2.0),
        keys.FORCE_COV_EPISTEMIC: 0.5 * force_sigma[:, None, None] ** 2 * np.eye(3),
        keys.FORCE_COV_ALEATORIC: 0.5 * force_sigma[:, None, None] ** 2 * np.eye(3),
        keys.ENERGY: energy,
        reference_key(keys.ENERGY): reference_energy,
        keys.ENERGY_VAR_EPISTEMIC: 0.3 * energy_sigma**2,
        keys.ENERGY_VAR_ALEATORIC: 0.7 * energy_sigma**2,
        keys.ATOMIC_ENERGY_STD: np.full(n_atoms, 0.01),
        keys.NUM_ATOMS: num_atoms,
        keys.BATCH: np.repeat(np.arange(n_structures), num_atoms),
    }


def force_error_and_sigma(prediction):
    error = prediction[keys.FORCES] - prediction[reference_key(keys.FORCES)]
    return error, np.broadcast_to(prediction[keys.ATOMIC_FORCE_STD][:, None], error.shape)


def energy_error_and_sigma(prediction):
    error = prediction[keys.ENERGY] - prediction[reference_key(keys.ENERGY)]
    return error, np.sqrt(prediction[keys.ENERGY_VAR_EPISTEMIC] + prediction[keys.ENERGY_VAR_ALEATORIC])


def test_scalar_fit_is_the_closed_form_and_lowers_the_nll():
    prediction = synthetic_prediction(0, lambda sigma: 2.5 * sigma)  # σ's 2.5 times too small
    calibration = fit_calibration(prediction, "scalar")
    assert set(calibration) == {keys.META_FORCE_STD_SCALE, keys.META_ENERGY_STD_SCALE}
    force_error, force_sigma = force_error_and_sigma(prediction)
    energy_error, energy_sigma = energy_error_and_sigma(prediction)
    assert calibration[keys.META_FORCE_STD_SCALE] == pytest.approx(math.sqrt(np.mean((force_error / force_sigma) ** 2)))
    assert calibration[keys.META_ENERGY_STD_SCALE] == pytest.approx(
        math.sqrt(np.mean((energy_error / energy_sigma) ** 2)))
    assert calibration[keys.META_FORCE_STD_SCALE] == pytest.approx(2.5, rel=0.03)
    assert calibration[keys.META_ENERGY_STD_SCALE] == pytest.approx(2.5, rel=0.1)

    calibrated = calibrate_prediction(prediction, calibration)
    for split in (force_error_and_sigma, energy_error_and_sigma):
        error, sigma_before = split(prediction)
        _, sigma_after = split(calibrated)
        nll_after = gaussian_nll(error, sigma_after)
        assert nll_after < gaussian_nll(error, sigma_before) - 0.3
        # the closed form is the optimum: scaling further in either direction is worse
        assert nll_after < gaussian_nll(error, 1.1 * sigma_after)
        assert nll_after < gaussian_nll(error, sigma_after / 1.1)


def test_isotonic_fit_lowers_miscalibration_on_held_out_data():
    # non-linear mis-specification: overconfident at large σ, underconfident in between
    def true_sigma_forces(sigma):
        return 4.0 * sigma**2 + 0.2 * sigma + 0.01

    def true_sigma(sigma):  # per-atom energy σ
        return 40.0 * sigma**2 + 0.3 * sigma + 0.002

    fit_set = synthetic_prediction(1, true_sigma_forces)
    held_out = synthetic_prediction(2, true_sigma_forces)
    isotonic = fit_calibration(fit_set, "isotonic")
    scalar = fit_calibration(fit_set, "scalar")
    force_map = isotonic[keys.META_FORCE_STD_MAP]
    assert isotonic[keys.META_FORCE_STD_SCALE] == 1.0 and 2 <= len(force_map[SIGMA]) <= 64
    assert np.all(np.diff(force_map[SIGMA]) > 0) and np.all(np.diff(force_map[CALIBRATED]) >= 0)

    error, sigma = force_error_and_sigma(held_out)
    area_before = miscalibration_area(error, sigma)
    area_scalar = miscalibration_area(*force_error_and_sigma(calibrate_prediction(held_out, scalar)))
    area_isotonic = miscalibration_area(*force_error_and_sigma(calibrate_prediction(held_out, isotonic)))
    # over- and underconfident ranges partly cancel in the pooled curve, so the area starts small
    assert area_before > 0.03
    assert area_isotonic < 0.25 * min(area_before, area_scalar)
    # per σ bin the mis-specification is plain: ENCE falls by a factor of several
    ence_scalar = ence(*force_error_and_sigma(calibrate_prediction(held_out, scalar)))
    ence_isotonic = ence(*force_error_and_sigma(calibrate_prediction(held_out, isotonic)))
    assert ence(error, sigma) > 0.3 and ence_scalar > 0.3
    assert ence_isotonic < 0.1
    # the map recovers the true σ where data is dense
    probe = np.array([0.05, 0.1, 0.2])
    np.testing.assert_allclose(calibrated_std(probe, 1.0, force_map), true_sigma_forces(probe), rtol=0.15)

    energy_fit = synthetic_prediction(3, true_sigma, n_structures=3000)
    energy_held_out = synthetic_prediction(4, true_sigma, n_structures=3000)
    calibration = fit_calibration(energy_fit, "isotonic")
    error, sigma = energy_error_and_sigma(energy_held_out)
    _, sigma_after = energy_error_and_sigma(calibrate_prediction(energy_held_out, calibration))
    assert miscalibration_area(error, sigma) > 0.03 and ence(error, sigma) > 0.2
    assert miscalibration_area(error, sigma_after) < 0.5 * miscalibration_area(error, sigma)
    assert ence(error, sigma_after) < 0.1


def test_isotonic_map_keeps_the_order_of_the_raw_sigmas():
    # the calibrated σ's of fix halt and BALD must rank atoms and structures as the model did:
    # no two different raw σ's may share a calibrated value (isotonic regression alone has
    # flat blocks that would tie them), and σ's beyond the fitted range keep growing
    fit_set = synthetic_prediction(7, lambda sigma: 3.0 * sigma**1.5 + 0.01)
    held_out = synthetic_prediction(8, lambda sigma: 3.0 * sigma**1.5 + 0.01)
    calibration = fit_calibration(fit_set, "isotonic")
    for part in (keys.META_FORCE_STD_MAP, keys.META_ENERGY_STD_MAP):
        assert np.all(np.diff(calibration[part][CALIBRATED]) > 0), part
    raw = held_out[keys.ATOMIC_FORCE_STD]
    calibrated = calibrate_prediction(held_out, calibration)[keys.ATOMIC_FORCE_STD]
    order = np.argsort(raw, kind="stable")
    assert np.all(np.diff(calibrated[order]) > 0)
    assert np.unique(calibrated).size == np.unique(raw).size
    _, raw_energy = energy_error_and_sigma(held_out)
    _, calibrated_energy = energy_error_and_sigma(calibrate_prediction(held_out, calibration))
    energy_order = np.argsort(raw_energy / held_out[keys.NUM_ATOMS], kind="stable")
    assert np.all(np.diff((calibrated_energy / held_out[keys.NUM_ATOMS])[energy_order]) > 0)
    far = np.array([2.0, 4.0, 8.0]) * float(raw.max())  # out of distribution
    assert np.all(np.diff(calibrated_std(far, 1.0, calibration[keys.META_FORCE_STD_MAP])) > 0)


def test_uncertainty_metrics_of_a_prediction():
    from bayesrace.uq import uncertainty_metrics

    prediction = synthetic_prediction(6, lambda sigma: 2.0 * sigma, n_structures=30)
    metrics = uncertainty_metrics(prediction)
    force_error, force_sigma = force_error_and_sigma(prediction)
    energy_error, energy_sigma = energy_error_and_sigma(prediction)
    assert metrics["forces_nll"] == pytest.approx(gaussian_nll(force_error, force_sigma))
    assert metrics["forces_ence"] == pytest.approx(ence(force_error, force_sigma))
    assert metrics["energy_miscalibration_area"] == pytest.approx(miscalibration_area(energy_error, energy_sigma))
    assert metrics["forces_sharpness_eV_per_A"] == pytest.approx(
        math.sqrt(np.mean(prediction[keys.ATOMIC_FORCE_STD] ** 2)))
    assert metrics["energy_sharpness_meV_per_atom"] == pytest.approx(
        1000 * math.sqrt(np.mean((energy_sigma / prediction[keys.NUM_ATOMS]) ** 2)))


def test_fit_refuses_zero_sigma_and_missing_references():
    prediction = synthetic_prediction(5, lambda sigma: sigma, n_structures=20)
    prediction[keys.ATOMIC_FORCE_STD][3] = 0.0
    with pytest.raises(CalibrationError, match="predicts no uncertainty"):
        fit_calibration(prediction, "isotonic")
    unlabelled = {k: v for k, v in prediction.items() if not k.startswith("reference_")}
    with pytest.raises(CalibrationError, match="no reference"):
        fit_calibration(unlabelled, "scalar")
    with pytest.raises(CalibrationError, match="method"):
        fit_calibration(prediction, "platt")


def test_extrapolation_threshold_is_factor_times_quantile_of_structure_maxima():
    prediction = {
        keys.ATOMIC_FORCE_STD: np.array([0.1, 0.3, 0.2, 0.5, 0.4, 0.05]),
        keys.BATCH: np.array([0, 0, 1, 1, 1, 2]),
    }
    # largest per structure: 0.3, 0.5, 0.05; the median of those is 0.3
    assert extrapolation_threshold(prediction, quantile=0.5, factor=2.0) == pytest.approx(0.6)
    assert extrapolation_threshold(prediction, quantile=1.0, factor=1.5) == pytest.approx(0.75)
    with pytest.raises(CalibrationError):
        extrapolation_threshold(prediction, quantile=0.0)


def test_relative_force_sigma_divides_by_the_force_plus_one_eV_per_A():
    """σ_epi,i / (|F_i| + 1 eV/Å) per atom, its per-structure maximum as an OOD score, and the
    threshold by the usual rule on those maxima (compute bayesrace/atom column 6, c_ug[8])."""
    from bayesrace.uq import ood_scores, relative_extrapolation_threshold, relative_force_std

    assert keys.RELATIVE_FORCE_LEVEL == 1.0
    prediction = {
        keys.FORCES: np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 9.0]]),
        keys.ATOMIC_FORCE_STD_EPISTEMIC: np.array([0.6, 0.2, 0.3, 1.0]),
        keys.ATOMIC_FORCE_STD: np.array([0.7, 0.3, 0.4, 1.1]),
        keys.ENERGY_VAR_EPISTEMIC: np.array([1e-4, 1e-4]),
        keys.ENERGY_VAR_ALEATORIC: np.array([1e-4, 1e-4]),
        keys.NUM_ATOMS: np.array([2, 2]),
        keys.BATCH: np.array([0, 0, 1, 1]),
    }
    np.testing.assert_allclose(relative_force_std(prediction), [0.1, 0.2, 0.15, 0.1])
    # the largest absolute σ (structure 1: atom 3) is not the largest relative one (atom 2)
    np.testing.assert_allclose(ood_scores(prediction)["max_relative_force_sigma_epistemic"], [0.2, 0.15])
    assert relative_extrapolation_threshold(prediction, quantile=1.0, factor=1.5) == pytest.approx(0.3)


# -- posterior, file and CLI -------------------------------------------------------------


def test_posterior_forward_applies_its_calibration():
    from conftest import batch_of

    from bayesrace.bayes import Posterior

    posterior = Posterior([tiny_model(seed=1), tiny_model(seed=2)]).eval()
    molecules = [random_molecule(4, seed=0), random_molecule(3, seed=1)]
    batch = batch_of(molecules, posterior.type_names, posterior.cutoff)
    uncalibrated = {name: value.detach() for name, value in posterior(batch).items()}
    posterior.calibration = CALIBRATION
    calibrated = posterior(batch)
    expected = calibrate_prediction(uncalibrated, CALIBRATION, batch[keys.NUM_ATOMS], batch[keys.BATCH])
    assert not torch.allclose(calibrated[keys.ATOMIC_FORCE_STD], uncalibrated[keys.ATOMIC_FORCE_STD])
    for name, value in expected.items():
        torch.testing.assert_close(calibrated[name].detach(), value)
    with pytest.raises(CalibrationError, match="calibration.force_std_scale"):
        posterior.calibration = {keys.META_FORCE_STD_SCALE: -1.0}


def write_labelled_set(path, n_frames, seed):
    """Random H/C/N molecules labelled by another tiny model (a cheap, smooth 'reference')."""
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    from bayesrace.data import Frame
    from bayesrace.uq import predict_frames
    from bayesrace.bayes import Posterior

    molecules = [random_molecule(3 + k % 4, seed=seed + k) for k in range(n_frames)]
    frames = [Frame(a.numbers.astype(np.int64), a.positions.copy(), np.zeros((3, 3)), np.zeros(3, dtype=bool))
              for a in molecules]
    reference = predict_frames(Posterior([tiny_model(seed=99)]), frames)
    offsets = np.cumsum([0] + [len(a) for a in molecules])
    for k, atoms in enumerate(molecules):
        atoms.calc = SinglePointCalculator(atoms, energy=float(reference[keys.ENERGY][k]),
                                           forces=reference[keys.FORCES][offsets[k]:offsets[k + 1]])
    ase.io.write(path, molecules, format="extxyz")
    return path


def test_calibrate_command_writes_a_calibrated_posterior(tmp_path, capsys):
    from bayesrace import cli
    from bayesrace.data import read_frames
    from bayesrace.uq import predict_frames
    from bayesrace.bayes import load_posterior, save_posterior

    posterior_path = tmp_path / "posterior.pt"
    save_posterior(posterior_path, [tiny_model(seed=1), tiny_model(seed=2)], data_sha256="abc")
    valid = write_labelled_set(tmp_path / "valid.xyz", n_frames=12, seed=10)
    out = tmp_path / "calibrated.pt"

    status = cli.main(["calibrate", str(posterior_path), str(valid), "--out", str(out), "--method", "isotonic",
                       "--quiet"])
    printed = capsys.readouterr().out
    assert status == 0
    for text in ("isotonic calibration fitted", "12 structures", "forces: scale 1, map of", "energy: scale 1",
                 "extrapolation threshold atomic_force_std", "forces miscalibration area", "energy ENCE", str(out)):
        assert text in printed

    original = load_posterior(posterior_path)
    calibrated = load_posterior(out)
    assert original.calibration == {} and original.thresholds == {}
    assert calibrated.record_info["data_sha256"] == "abc"
    calibration = calibrated.calibration
    assert keys.META_FORCE_STD_MAP in calibration and keys.META_ENERGY_STD_MAP in calibration
    for a, b in zip(original.parameters(), calibrated.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    # the loaded posterior predicts what calibrate_prediction makes of the uncalibrated prediction
    frames = read_frames(valid)
    raw = predict_frames(original, frames)
    expected = calibrate_prediction(raw, calibration)
    predicted = predict_frames(calibrated, frames)
    for name in (keys.ATOMIC_FORCE_STD, keys.FORCE_COV_ALEATORIC, keys.ENERGY_VAR_EPISTEMIC, keys.ATOMIC_ENERGY_STD):
        np.testing.assert_allclose(predicted[name], expected[name], rtol=1e-10)
    # default threshold: 1.5 × the 0.99 quantile of each structure's largest calibrated σ_F
    largest = [expected[keys.ATOMIC_FORCE_STD][expected[keys.BATCH] == b].max() for b in range(len(frames))]
    assert calibrated.thresholds[keys.ATOMIC_FORCE_STD] == pytest.approx(1.5 * np.quantile(largest, 0.99))
    # and the same rule on the epistemic scores: the largest epistemic σ_F, the epistemic energy σ per atom
    largest = [expected[keys.ATOMIC_FORCE_STD_EPISTEMIC][expected[keys.BATCH] == b].max() for b in range(len(frames))]
    assert calibrated.thresholds[keys.ATOMIC_FORCE_STD_EPISTEMIC] == pytest.approx(1.5 * np.quantile(largest, 0.99))
    per_atom = np.sqrt(expected[keys.ENERGY_VAR_EPISTEMIC]) / expected[keys.NUM_ATOMS]
    assert calibrated.thresholds[keys.ENERGY_STD_EPISTEMIC_PER_ATOM] == pytest.approx(1.5 * np.quantile(per_atom, 0.99))
    assert "extrapolation threshold energy_std_epistemic_per_atom" in printed

    # scalar, overwriting the file in place
    assert cli.main(["calibrate", str(out), str(valid), "--method", "scalar", "--quiet"]) == 0
    rescaled = load_posterior(out).calibration
    assert set(rescaled) == {keys.META_FORCE_STD_SCALE, keys.META_ENERGY_STD_SCALE}
    error = raw[keys.FORCES] - raw[reference_key(keys.FORCES)]
    assert rescaled[keys.META_FORCE_STD_SCALE] == pytest.approx(
        math.sqrt(np.mean((error / raw[keys.ATOMIC_FORCE_STD][:, None]) ** 2)))


def test_calibrate_command_reports_user_errors(tmp_path, capsys):
    from bayesrace import cli
    from bayesrace.bayes import save_posterior

    posterior_path = tmp_path / "posterior.pt"
    save_posterior(posterior_path, [tiny_model(seed=1)])
    unlabelled = tmp_path / "unlabelled.xyz"
    import ase.io

    ase.io.write(unlabelled, [random_molecule(3, seed=0)], format="extxyz")
    assert cli.main(["calibrate", str(posterior_path), str(unlabelled), "--quiet"]) == 2
    assert "no reference energies or forces" in capsys.readouterr().err
    assert cli.main(["calibrate", str(posterior_path), str(tmp_path / "missing.xyz"), "--quiet"]) == 2
