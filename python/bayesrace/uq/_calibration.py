"""Fitting recalibration maps on a validation set, the extrapolation threshold, and the CLI's work."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Dict, Mapping, Optional, Union

import numpy as np
import torch

from .. import keys
from ..bayes import (
    MAP_VALUE_FLOOR_FRACTION,
    MAX_MAP_KNOTS,
    METHODS,
    CalibrationError,
    calibrate_prediction,
    load_posterior,
    relative_force_std,
    update_posterior_file,
    validate_calibration,
    validate_std_map,
)
from ..data import read_frames
from ._metrics import ence, gaussian_nll, miscalibration_area, sharpness
from ._ood import extrapolation_rule
from ._predict import energy_std, predict_frames, reference_key
from ._set_metrics import ENCE_BINS, set_metrics
from ._split_calibration import fit_split_maps


# -- fitting on a validation set -------------------------------------------------------------


def _references(prediction: Mapping[str, np.ndarray]):
    return prediction.get(reference_key(keys.ENERGY)), prediction.get(reference_key(keys.FORCES))


def _require_positive_sigma(sigma: np.ndarray, what: str) -> None:
    if np.any(~(sigma > 0.0)):
        raise CalibrationError(
            f"cannot calibrate: some predicted {what} σ's are zero (or NaN); the posterior predicts no "
            "uncertainty there (e.g. one member trained with MSE, without variance heads)"
        )


def fit_std_map(sigma: np.ndarray, squared_error: np.ndarray, max_knots: int = MAX_MAP_KNOTS) -> Dict[str, list]:
    """A strictly increasing map g from isotonic regression of the squared errors on σ (both
    arrays 1-D, paired), at most ``max_knots`` knots.

    Isotonic regression is a step function: its flat blocks would give many σ's one
    calibrated value and lose the order the model had (fix halt and BALD would see ties).
    The map's knots are therefore the blocks' centres — mean σ of each block, g = sqrt of its
    fitted mean squared error — and g interpolates between them. Block values strictly
    increase, so g does, and the calibrated σ's keep the raw σ's order. With more blocks
    than ``max_knots``, neighbouring blocks are pooled (counts as weights), which keeps that."""
    from sklearn.isotonic import IsotonicRegression

    sigma = np.asarray(sigma, dtype=np.float64).ravel()
    squared_error = np.asarray(squared_error, dtype=np.float64).ravel()
    order = np.argsort(sigma, kind="stable")
    sigma, squared_error = sigma[order], squared_error[order]
    fitted = IsotonicRegression(increasing=True).fit_transform(sigma, squared_error)
    # blocks: runs of equal fitted value (tied σ's share one value, so never straddle a block)
    starts = np.flatnonzero(np.r_[True, np.diff(fitted) > 0.0])
    counts = np.diff(np.r_[starts, sigma.size])
    sigma_sums = np.add.reduceat(sigma, starts)
    values = fitted[starts]
    if starts.size > max_knots:
        # pool contiguous blocks into max_knots groups of about equal numbers of points
        group = np.minimum((np.cumsum(counts) - counts) * max_knots // sigma.size, max_knots - 1)
        first = np.flatnonzero(np.r_[True, np.diff(group) > 0])
        group_counts = np.add.reduceat(counts, first)
        values = np.add.reduceat(values * counts, first) / group_counts
        sigma_sums, counts = np.add.reduceat(sigma_sums, first), group_counts
    x = sigma_sums / counts
    y = np.maximum(np.sqrt(np.maximum(values, 0.0)), MAP_VALUE_FLOOR_FRACTION * x[0])
    # the floor (and round-off in pooled means) may leave equal neighbours: keep the first of each run
    keep = np.r_[True, (np.diff(y) > 0.0) & (np.diff(x) > 0.0)]
    return validate_std_map({keys.META_MAP_SIGMA: x[keep], keys.META_MAP_CALIBRATED: y[keep]}, "fitted std map")


def _store_parts(calibration: Dict[str, object], epistemic_field: str, epistemic, aleatoric_field: str,
                 aleatoric) -> None:
    for field, std_map in ((epistemic_field, epistemic), (aleatoric_field, aleatoric)):
        if std_map is not None:
            calibration[field] = std_map


def fit_calibration(prediction: Mapping[str, np.ndarray], method: str = "isotonic") -> Dict[str, object]:
    """A calibration fitted on uncalibrated predictions with references (``predict_frames``).

    ``scalar``: the NLL-optimal scales s² = mean((e/σ)²), over force components
    (e = ΔF_i,a, σ = σ_F,i) and over structures (e = ΔE_b, σ = σ_E,b); no maps.
    ``isotonic``: scales 1 and strictly increasing maps (``fit_std_map``) from isotonic
    regression of the squared error on σ: forces x = σ_F,i, y = |ΔF_i|²/3; energies x = σ_E,b/N_b, y = (ΔE_b/N_b)².
    ``split``: scales 1 and one map per part, epistemic and aleatoric (``fit_split_maps``), so
    that in-distribution data does not shrink the epistemic σ's.
    Only the parts with references are fitted (the other stays the identity); with neither
    reference, or a σ of zero, it raises ``CalibrationError``.
    """
    if method not in METHODS:
        raise CalibrationError(f"calibration method must be one of {list(METHODS)}, got {method!r}")
    reference_energy, reference_forces = _references(prediction)
    if reference_energy is None and reference_forces is None:
        raise CalibrationError("cannot calibrate: the predictions carry no reference energies or forces")
    calibration: Dict[str, object] = {}
    if reference_forces is not None:
        error = np.asarray(prediction[keys.FORCES], dtype=np.float64) - reference_forces
        sigma = np.asarray(prediction[keys.ATOMIC_FORCE_STD], dtype=np.float64)
        _require_positive_sigma(sigma, "force")
        if method == "scalar":
            calibration[keys.META_FORCE_STD_SCALE] = float(np.sqrt(np.mean((error / sigma[:, None]) ** 2)))
        elif method == "split":
            calibration[keys.META_FORCE_STD_SCALE] = 1.0
            epistemic, aleatoric, _ = fit_split_maps(
                np.sum(error**2, axis=1), prediction[keys.ATOMIC_FORCE_STD_EPISTEMIC],
                prediction[keys.ATOMIC_FORCE_STD_ALEATORIC], 3, "forces")
            _store_parts(calibration, keys.META_FORCE_EPISTEMIC_STD_MAP, epistemic,
                         keys.META_FORCE_ALEATORIC_STD_MAP, aleatoric)
        else:
            calibration[keys.META_FORCE_STD_SCALE] = 1.0
            calibration[keys.META_FORCE_STD_MAP] = fit_std_map(sigma, np.sum(error**2, axis=1) / 3.0)
    if reference_energy is not None:
        error = np.asarray(prediction[keys.ENERGY], dtype=np.float64) - reference_energy
        sigma = energy_std(prediction)
        _require_positive_sigma(sigma, "energy")
        if method == "scalar":
            calibration[keys.META_ENERGY_STD_SCALE] = float(np.sqrt(np.mean((error / sigma) ** 2)))
        elif method == "split":
            num_atoms = np.asarray(prediction[keys.NUM_ATOMS], dtype=np.float64)
            calibration[keys.META_ENERGY_STD_SCALE] = 1.0
            epistemic, aleatoric, _ = fit_split_maps(
                (error / num_atoms) ** 2, np.sqrt(np.asarray(prediction[keys.ENERGY_VAR_EPISTEMIC])) / num_atoms,
                np.sqrt(np.asarray(prediction[keys.ENERGY_VAR_ALEATORIC])) / num_atoms, 1, "energy")
            _store_parts(calibration, keys.META_ENERGY_EPISTEMIC_STD_MAP, epistemic,
                         keys.META_ENERGY_ALEATORIC_STD_MAP, aleatoric)
        else:
            num_atoms = np.asarray(prediction[keys.NUM_ATOMS], dtype=np.float64)
            calibration[keys.META_ENERGY_STD_SCALE] = 1.0
            calibration[keys.META_ENERGY_STD_MAP] = fit_std_map(sigma / num_atoms, (error / num_atoms) ** 2)
    return validate_calibration(calibration)


def check_threshold_settings(quantile: float, factor: float) -> None:
    """Refuse a quantile outside (0, 1] or a factor that is not a finite number > 0 (cheap: call
    it before a costly prediction)."""
    if not 0.0 < quantile <= 1.0:
        raise CalibrationError(f"threshold quantile must lie in (0, 1], got {quantile}")
    if not (math.isfinite(factor) and factor > 0.0):
        raise CalibrationError(f"threshold factor must be a finite number > 0, got {factor}")


def extrapolation_threshold(prediction_calibrated: Mapping[str, np.ndarray], quantile: float = 0.99,
                            factor: float = 1.5, field: str = keys.ATOMIC_FORCE_STD) -> float:
    """``extrapolation_rule`` (``factor`` × the ``quantile``) over structures of each structure's
    largest calibrated ``field`` (eV/Å; the total force σ, or ATOMIC_FORCE_STD_EPISTEMIC)."""
    check_threshold_settings(quantile, factor)
    sigma = np.asarray(prediction_calibrated[field], dtype=np.float64)
    structure = np.asarray(prediction_calibrated[keys.BATCH], dtype=np.int64)
    if sigma.size == 0:
        raise CalibrationError("extrapolation_threshold: no atoms")
    largest = np.full(int(structure.max()) + 1, -np.inf)
    np.maximum.at(largest, structure, sigma)
    largest = largest[np.isfinite(largest)]  # structures without atoms have no σ
    return extrapolation_rule(largest, quantile, factor)


def energy_extrapolation_threshold(prediction_calibrated: Mapping[str, np.ndarray], quantile: float = 0.99,
                                   factor: float = 1.5) -> float:
    """``extrapolation_rule`` over structures of the calibrated epistemic energy σ per atom, sqrt(Var_m E_m) / N (eV/atom): the score that flags geometries the members disagree
    on as a whole (``compute bayesrace`` column 7)."""
    check_threshold_settings(quantile, factor)
    per_atom = energy_std(prediction_calibrated, "epistemic") / prediction_calibrated[keys.NUM_ATOMS]
    if per_atom.size == 0:
        raise CalibrationError("energy_extrapolation_threshold: no structures")
    return extrapolation_rule(per_atom, quantile, factor)


def relative_extrapolation_threshold(prediction_calibrated: Mapping[str, np.ndarray], quantile: float = 0.99,
                                     factor: float = 1.5) -> float:
    """``extrapolation_threshold`` of the calibrated epistemic force σ relative to the force
    (``relative_force_std``, unit-free; ``compute bayesrace`` column 8)."""
    relative = dict(prediction_calibrated)
    relative[keys.ATOMIC_FORCE_STD_RELATIVE] = relative_force_std(prediction_calibrated)
    return extrapolation_threshold(relative, quantile, factor, keys.ATOMIC_FORCE_STD_RELATIVE)


def uncertainty_metrics(prediction: Mapping[str, np.ndarray]) -> Dict[str, float]:
    """NLL, miscalibration area and ENCE (≤ 10 bins) for forces (per component, σ = σ_F,i,
    eV/Å) and energies (per structure, eV), where references exist and every σ is positive,
    and the sharpness of σ_F,i (eV/Å) and of σ_E,b/N_b (meV/atom). Named as in
    ``METRIC_UNITS``."""
    reference_energy, reference_forces = _references(prediction)
    energy_sigma = energy_std(prediction)
    force_sigma = prediction[keys.ATOMIC_FORCE_STD]
    metrics: Dict[str, float] = {
        "forces_sharpness_eV_per_A": sharpness(force_sigma),
        "energy_sharpness_meV_per_atom": 1000.0 * sharpness(energy_sigma / prediction[keys.NUM_ATOMS]),
    }
    parts = []
    if reference_forces is not None:
        parts.append(("forces", prediction[keys.FORCES] - reference_forces, force_sigma[:, None]))
    if reference_energy is not None:
        parts.append(("energy", prediction[keys.ENERGY] - reference_energy, energy_sigma))
    for name, error, sigma in parts:
        sigma = np.broadcast_to(sigma, error.shape)
        if np.any(~(sigma > 0)):
            continue
        metrics[f"{name}_nll"] = gaussian_nll(error, sigma)
        metrics[f"{name}_miscalibration_area"] = miscalibration_area(error, sigma)
        metrics[f"{name}_ence"] = ence(error, sigma, n_bins=min(ENCE_BINS, error.size))
    return metrics


# -- a posterior file ---------------------------------------------------------------------


def calibrate_posterior_file(
    posterior_path: Union[str, os.PathLike],
    valid_file: Union[str, os.PathLike],
    out_path: Optional[Union[str, os.PathLike]] = None,
    method: str = "isotonic",
    threshold_quantile: float = 0.99,
    threshold_factor: float = 1.5,
    energy_key: str = "energy",
    forces_key: str = "forces",
    progress: bool = False,
    feature_density_from: Optional[Union[str, os.PathLike]] = None,
) -> Dict[str, object]:
    """Fit a calibration on ``valid_file`` and write the posterior with it to ``out_path``.

    ``feature_density_from``: a training file to fit the feature density on first (a posterior
    trained before bayesrace fitted one gains the feature distance without retraining).

    Predicts ``valid_file`` uncalibrated (any calibration the file had is ignored and
    replaced), fits ``method``, sets the default extrapolation threshold
    (``extrapolation_threshold`` of the calibrated predictions) and writes a copy of the
    record with ``calibration`` and ``thresholds`` set (atomically; ``out_path`` None or
    equal to ``posterior_path`` overwrites): the total force σ's (``extrapolation_threshold``)
    and, with more than one member, the epistemic force σ's and the epistemic energy σ per
    atom (``energy_extrapolation_threshold``), and with a feature density the largest feature
    distance of a structure, each by the same quantile and factor. Returns
    ``{calibration, thresholds, threshold, n_structures, n_atoms, metrics_before, metrics_after,
    out_path}``; the metrics are
    ``uncertainty_metrics`` and ``set_metrics`` of the uncalibrated and the
    calibrated predictions.
    """
    if method not in METHODS:
        raise CalibrationError(f"calibration method must be one of {list(METHODS)}, got {method!r}")
    check_threshold_settings(threshold_quantile, threshold_factor)  # before the costly prediction
    out_path = Path(posterior_path if out_path is None else out_path)
    posterior = load_posterior(posterior_path, dtype=torch.float64)
    posterior.calibration = {}  # fit on what the members predict, not on an earlier calibration
    if feature_density_from is not None:
        from ..bayes import fit_feature_density_on_file

        posterior.feature_density = fit_feature_density_on_file(posterior, feature_density_from)
    frames = read_frames(valid_file, energy_key=energy_key, forces_key=forces_key,
                         require_energy=False, require_forces=False)
    prediction = predict_frames(posterior, frames, dtype=torch.float64, progress=progress,
                                progress_label="predict validation set")
    calibration = fit_calibration(prediction, method)
    calibrated = calibrate_prediction(prediction, calibration)
    threshold = extrapolation_threshold(calibrated, threshold_quantile, threshold_factor)
    epistemic = {
        keys.ATOMIC_FORCE_STD_EPISTEMIC: extrapolation_threshold(calibrated, threshold_quantile, threshold_factor,
                                                                 keys.ATOMIC_FORCE_STD_EPISTEMIC),
        keys.ENERGY_STD_EPISTEMIC_PER_ATOM: energy_extrapolation_threshold(calibrated, threshold_quantile,
                                                                           threshold_factor),
        keys.ATOMIC_FORCE_STD_RELATIVE: relative_extrapolation_threshold(calibrated, threshold_quantile,
                                                                         threshold_factor),
    }
    if keys.ATOMIC_FEATURE_DISTANCE in calibrated:  # a posterior with a feature density (any kind)
        epistemic[keys.ATOMIC_FEATURE_DISTANCE] = extrapolation_threshold(
            calibrated, threshold_quantile, threshold_factor, keys.ATOMIC_FEATURE_DISTANCE)
    # one member has no epistemic part: no threshold for it
    thresholds = {keys.ATOMIC_FORCE_STD: threshold, **{k: v for k, v in epistemic.items() if v > 0.0}}
    update_posterior_file(posterior_path, out_path, calibration=calibration, thresholds=thresholds,
                          feature_density=posterior.feature_density if feature_density_from is not None else None)
    return {
        "calibration": calibration,
        "thresholds": thresholds,
        "threshold": threshold,
        "n_structures": int(prediction[keys.NUM_ATOMS].shape[0]),
        "n_atoms": int(prediction[keys.NUM_ATOMS].sum()),
        # set_metrics last: where both compute a number, the evaluation report's value stands
        "metrics_before": {**uncertainty_metrics(prediction), **set_metrics(prediction)},
        "metrics_after": {**uncertainty_metrics(calibrated), **set_metrics(calibrated)},
        "out_path": str(out_path),
    }


def _describe_map(std_map, unit: str) -> str:
    x, y = std_map[keys.META_MAP_SIGMA], std_map[keys.META_MAP_CALIBRATED]
    return (f"map of {len(x)} knots: σ {x[0]:.3g} … {x[-1]:.3g} {unit} → "
            f"{y[0]:.3g} … {y[-1]:.3g} {unit} (ratio {y[0] / x[0]:.3g} … {y[-1] / x[-1]:.3g})")


def describe_calibration(calibration: Mapping) -> str:
    """One line per quantity: the scale and, with maps, each map's knot count and range (for the CLI)."""
    lines = []
    for label, scale_field, map_fields, unit in (
        ("forces", keys.META_FORCE_STD_SCALE, (("", keys.META_FORCE_STD_MAP),
                                                ("epistemic ", keys.META_FORCE_EPISTEMIC_STD_MAP),
                                                ("aleatoric ", keys.META_FORCE_ALEATORIC_STD_MAP)), "eV/Å"),
        ("energy", keys.META_ENERGY_STD_SCALE, (("", keys.META_ENERGY_STD_MAP),
                                                 ("epistemic ", keys.META_ENERGY_EPISTEMIC_STD_MAP),
                                                 ("aleatoric ", keys.META_ENERGY_ALEATORIC_STD_MAP)), "eV/atom"),
    ):
        maps = [(part, calibration[field]) for part, field in map_fields if calibration.get(field)]
        if scale_field not in calibration and not maps:
            lines.append(f"{label}: not calibrated (no references)")
            continue
        text = f"{label}: scale {calibration.get(scale_field, 1.0):.4g}"
        for part, std_map in maps:
            text += f", {part}{_describe_map(std_map, unit)}"
        lines.append(text)
    return "\n".join(lines)
