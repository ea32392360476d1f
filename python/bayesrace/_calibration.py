"""Recalibration of predicted σ's: the map, its application, fitting and the CLI's work.

A calibration is a dict (stored in the posterior record under ``"calibration"`` and
copied into the deployable's metadata under ``keys.META_CALIBRATION``)::

    {force_std_scale: s_F, energy_std_scale: s_E,            # floats > 0, default 1
     force_std_map: {sigma: [x_1..x_K], calibrated: [y_1..y_K]},   # optional
     energy_std_map: {...}}                                          # optional

A map g has knots x strictly increasing and > 0, values y non-decreasing and > 0, K ≥ 1;
g is linear through the knots on [x_1, x_K] and proportional outside
(g(σ) = σ·y_1/x_1 below, σ·y_K/x_K above), so σ's beyond the fitted range keep growing
instead of being capped. Without a map g is the identity. The calibrated σ is
c(σ) = s·g(σ) and the ratio r(σ) = c(σ)/σ (r(0) = s·y_1/x_1 with a map, s without).

Applied to a posterior's prediction (``calibrate_prediction``):

- forces, per atom i with σ_i its uncalibrated ATOMIC_FORCE_STD and r_i = r_F(σ_i):
  the three ATOMIC_FORCE_STD fields × r_i, the two force covariances × r_i²;
- energy, per structure b of N_b atoms with the per-atom energy σ
  σ_pa = sqrt(ENERGY_VAR_EPISTEMIC + ENERGY_VAR_ALEATORIC) / N_b and r_b = r_E(σ_pa):
  both energy variances × r_b², ATOMIC_ENERGY_STD of b's atoms (and ENERGY_STD) × r_b.

The empty dict ``IDENTITY`` is the uncalibrated posterior. Units: eV, Å.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import MappingProxyType
from typing import Dict, Mapping, Optional, Union

import numpy as np
import torch

from . import keys

IDENTITY: Mapping[str, object] = MappingProxyType({})
"""The calibration that changes nothing (read-only; copy it with ``dict(IDENTITY)``)."""

METHODS = ("scalar", "isotonic")
MAX_MAP_KNOTS = 64
# isotonic map values are floored at this fraction of the smallest knot σ: a block of
# near-zero validation errors must not turn into a zero (infinitely confident) σ
MAP_VALUE_FLOOR_FRACTION = 1e-3

_SCALE_FIELDS = (keys.META_FORCE_STD_SCALE, keys.META_ENERGY_STD_SCALE)
_MAP_FIELDS = (keys.META_FORCE_STD_MAP, keys.META_ENERGY_STD_MAP)
_THRESHOLD_FIELDS = (keys.ATOMIC_FORCE_STD,)

Array = Union[np.ndarray, torch.Tensor]


class CalibrationError(ValueError):
    """An invalid calibration or data that cannot be calibrated; the message names the field."""


# -- validation ------------------------------------------------------------------------------


def _positive_float(value, field: str) -> float:
    if isinstance(value, bool):
        raise CalibrationError(f"{field} must be a number > 0, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise CalibrationError(f"{field} must be a number > 0, got {value!r}") from None
    if not (math.isfinite(number) and number > 0.0):
        raise CalibrationError(f"{field} must be a finite number > 0, got {value!r}")
    return number


def validate_std_map(std_map, field: str = "calibration.std_map") -> Dict[str, list]:
    """The map as ``{sigma: [floats], calibrated: [floats]}``; raises naming ``field`` if invalid."""
    if not isinstance(std_map, Mapping):
        raise CalibrationError(f"{field} must be an object with '{keys.META_MAP_SIGMA}' and "
                               f"'{keys.META_MAP_CALIBRATED}', got {type(std_map).__name__}")
    expected = {keys.META_MAP_SIGMA, keys.META_MAP_CALIBRATED}
    unknown = set(std_map) - expected
    if unknown:
        raise CalibrationError(f"{field} has unknown field(s) {sorted(unknown)}; expected {sorted(expected)}")
    columns = {}
    for name in (keys.META_MAP_SIGMA, keys.META_MAP_CALIBRATED):
        if name not in std_map:
            raise CalibrationError(f"{field}.{name} is missing")
        try:
            values = np.asarray(std_map[name], dtype=np.float64)
        except (TypeError, ValueError):
            raise CalibrationError(f"{field}.{name} must be a list of numbers") from None
        if values.ndim != 1 or values.size == 0:
            raise CalibrationError(f"{field}.{name} must be a non-empty list of numbers")
        if not np.all(np.isfinite(values)) or np.any(values <= 0.0):
            raise CalibrationError(f"{field}.{name} must hold finite numbers > 0")
        columns[name] = values
    sigma, calibrated = columns[keys.META_MAP_SIGMA], columns[keys.META_MAP_CALIBRATED]
    if sigma.size != calibrated.size:
        raise CalibrationError(
            f"{field}: {sigma.size} knots in '{keys.META_MAP_SIGMA}' but {calibrated.size} values in "
            f"'{keys.META_MAP_CALIBRATED}'"
        )
    if np.any(np.diff(sigma) <= 0.0):
        raise CalibrationError(f"{field}.{keys.META_MAP_SIGMA} must be strictly increasing")
    if np.any(np.diff(calibrated) < 0.0):
        raise CalibrationError(f"{field}.{keys.META_MAP_CALIBRATED} must be non-decreasing")
    return {keys.META_MAP_SIGMA: sigma.tolist(), keys.META_MAP_CALIBRATED: calibrated.tolist()}


def validate_calibration(calibration, field: str = keys.META_CALIBRATION) -> Dict[str, object]:
    """A checked plain-dict copy of ``calibration`` (``None`` or ``{}``: the identity, ``{}``).

    Only the fields present are kept (scales as floats, maps as lists of floats); any
    problem raises ``CalibrationError`` naming the field, e.g.
    "calibration.force_std_map.sigma must be strictly increasing".
    """
    if calibration is None:
        return {}
    if not isinstance(calibration, Mapping):
        raise CalibrationError(f"{field} must be an object, got {type(calibration).__name__}")
    unknown = set(calibration) - set(_SCALE_FIELDS + _MAP_FIELDS)
    if unknown:
        raise CalibrationError(
            f"{field} has unknown field(s) {sorted(unknown)}; expected some of {list(_SCALE_FIELDS + _MAP_FIELDS)}"
        )
    checked: Dict[str, object] = {}
    for name in _SCALE_FIELDS:
        if name in calibration:
            checked[name] = _positive_float(calibration[name], f"{field}.{name}")
    for name in _MAP_FIELDS:
        if calibration.get(name) is not None:
            checked[name] = validate_std_map(calibration[name], f"{field}.{name}")
    return checked


def validate_thresholds(thresholds, field: str = keys.META_THRESHOLDS) -> Dict[str, float]:
    """A checked copy of ``{atomic_force_std: X}`` (X > 0, eV/Å); ``None`` gives ``{}``."""
    if thresholds is None:
        return {}
    if not isinstance(thresholds, Mapping):
        raise CalibrationError(f"{field} must be an object, got {type(thresholds).__name__}")
    unknown = set(thresholds) - set(_THRESHOLD_FIELDS)
    if unknown:
        raise CalibrationError(
            f"{field} has unknown threshold field(s) {sorted(unknown)}; expected {list(_THRESHOLD_FIELDS)}")
    return {name: _positive_float(value, f"{field}.{name}") for name, value in thresholds.items()}


# -- the map ---------------------------------------------------------------------------------


def _as_tensor(values) -> torch.Tensor:
    """A tensor sharing memory with a numpy array where possible (dtype kept; lists and
    Python numbers become float64 or int64)."""
    if isinstance(values, torch.Tensor):
        return values
    array = np.asarray(values)
    if array.dtype.kind not in "fiub":
        array = array.astype(np.float64)
    if not array.flags.writeable or not array.flags.c_contiguous:
        array = np.array(array)  # torch wants its own writable, contiguous buffer
    return torch.from_numpy(array)


def _as_float_tensor(values) -> torch.Tensor:
    tensor = _as_tensor(values)
    return tensor if tensor.is_floating_point() else tensor.to(torch.float64)


def _map_and_ratio(sigma: torch.Tensor, std_map: Optional[Mapping]):
    """(g(σ), g(σ)/σ) with r(0) = y_1/x_1; the identity (σ, 1) without a map."""
    if not std_map:
        return sigma, torch.ones_like(sigma)
    if sigma.dim() == 0:
        mapped, ratio = _map_and_ratio(sigma.reshape(1), std_map)
        return mapped[0], ratio[0]
    knots = torch.as_tensor(std_map[keys.META_MAP_SIGMA], dtype=sigma.dtype, device=sigma.device)
    values = torch.as_tensor(std_map[keys.META_MAP_CALIBRATED], dtype=sigma.dtype, device=sigma.device)
    slope_below = values[0] / knots[0]
    slope_above = values[-1] / knots[-1]
    if knots.numel() == 1:
        return sigma * slope_below, torch.full_like(sigma, float(slope_below))
    # segment k joins knots k-1 and k; σ outside [x_1, x_K] is handled by the proportional branches
    upper = torch.searchsorted(knots, sigma.detach().contiguous(), right=True).clamp(1, knots.numel() - 1)
    x0, x1 = knots[upper - 1], knots[upper]
    y0, y1 = values[upper - 1], values[upper]
    inside = y0 + (sigma - x0) * (y1 - y0) / (x1 - x0)
    below = sigma < knots[0]
    above = sigma > knots[-1]
    mapped = torch.where(below, sigma * slope_below, torch.where(above, sigma * slope_above, inside))
    # inside the knots σ ≥ x_1 > 0, so the clamp only keeps the unused branch finite
    ratio_inside = inside / sigma.clamp(min=float(knots[0]))
    ratio = torch.where(below, slope_below.expand_as(sigma),
                        torch.where(above, slope_above.expand_as(sigma), ratio_inside))
    return mapped, ratio


def calibrated_std(sigma: Array, scale: float = 1.0, std_map: Optional[Mapping] = None) -> Array:
    """c(σ) = s·g(σ) (same units as σ); numpy in, numpy out; torch in, torch out."""
    mapped, _ = _map_and_ratio(_as_float_tensor(sigma), std_map)
    result = float(scale) * mapped
    return result if isinstance(sigma, torch.Tensor) else result.numpy()


def std_ratio(sigma: Array, scale: float = 1.0, std_map: Optional[Mapping] = None) -> Array:
    """r(σ) = c(σ)/σ, dimensionless; r(0) = s·y_1/x_1 with a map, s without."""
    _, ratio = _map_and_ratio(_as_float_tensor(sigma), std_map)
    result = float(scale) * ratio
    return result if isinstance(sigma, torch.Tensor) else result.numpy()


# -- application to a prediction -------------------------------------------------------------

_FORCE_STD_FIELDS = (keys.ATOMIC_FORCE_STD, keys.ATOMIC_FORCE_STD_EPISTEMIC, keys.ATOMIC_FORCE_STD_ALEATORIC)
_FORCE_COV_FIELDS = (keys.FORCE_COV_EPISTEMIC, keys.FORCE_COV_ALEATORIC)
_ENERGY_VAR_FIELDS = (keys.ENERGY_VAR_EPISTEMIC, keys.ENERGY_VAR_ALEATORIC)


class _LazyTensors(Mapping):
    """Read-only view of a prediction whose values are converted to tensors on access."""

    def __init__(self, prediction: Mapping[str, Array]):
        self._prediction = prediction
        self._cache: Dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._cache:
            self._cache[name] = _as_tensor(self._prediction[name])
        return self._cache[name]

    def __iter__(self):
        return iter(self._prediction)

    def __len__(self) -> int:
        return len(self._prediction)

    def __contains__(self, name) -> bool:
        return name in self._prediction


def _uncalibrated_force_std(prediction: Mapping[str, torch.Tensor]) -> Optional[torch.Tensor]:
    if keys.ATOMIC_FORCE_STD in prediction:
        return prediction[keys.ATOMIC_FORCE_STD]
    covariances = [prediction[name] for name in _FORCE_COV_FIELDS if name in prediction]
    if not covariances:
        return None
    total = sum(covariances)
    return torch.sqrt(torch.diagonal(total, dim1=-2, dim2=-1).sum(dim=-1) / 3.0)


def calibrate_prediction(
    prediction: Mapping[str, Array],
    calibration: Optional[Mapping] = None,
    num_atoms: Optional[Array] = None,
    batch: Optional[Array] = None,
) -> Dict[str, Array]:
    """A new dict with the calibrated σ's, variances and covariances (module docstring);
    every other field is passed through unchanged.

    ``num_atoms`` [B] and ``batch`` [N] default to the prediction's own NUM_ATOMS and
    BATCH. Values may be numpy arrays (evaluation) or torch tensors (``Posterior``);
    each field comes back as the type it went in as. Fields that are absent are skipped.
    """
    calibration = validate_calibration(calibration)
    result: Dict[str, Array] = dict(prediction)
    if not calibration:
        return result
    # only the fields that change are converted (numpy arrays share memory with their tensor)
    tensors = _LazyTensors(prediction)

    def store(name: str, value: torch.Tensor) -> None:
        result[name] = value if isinstance(prediction[name], torch.Tensor) else value.numpy()

    force_scale = calibration.get(keys.META_FORCE_STD_SCALE, 1.0)
    force_map = calibration.get(keys.META_FORCE_STD_MAP)
    force_std = _uncalibrated_force_std(tensors)
    if force_std is not None:
        ratio = float(force_scale) * _map_and_ratio(force_std, force_map)[1]
        for name in _FORCE_STD_FIELDS:
            if name in tensors:
                store(name, tensors[name] * ratio)
        for name in _FORCE_COV_FIELDS:
            if name in tensors:
                store(name, tensors[name] * (ratio * ratio)[:, None, None])

    energy_scale = calibration.get(keys.META_ENERGY_STD_SCALE, 1.0)
    energy_map = calibration.get(keys.META_ENERGY_STD_MAP)
    variances = [tensors[name] for name in _ENERGY_VAR_FIELDS if name in tensors]
    if variances:
        if num_atoms is None:
            if keys.NUM_ATOMS not in tensors:
                raise CalibrationError(f"calibrate_prediction: energy σ's need num_atoms (or '{keys.NUM_ATOMS}')")
            num_atoms = tensors[keys.NUM_ATOMS]
        count = _as_tensor(num_atoms).to(device=variances[0].device, dtype=variances[0].dtype)
        per_atom_sigma = torch.sqrt(sum(variances)) / count
        ratio = float(energy_scale) * _map_and_ratio(per_atom_sigma, energy_map)[1]
        for name in _ENERGY_VAR_FIELDS:
            if name in tensors:
                store(name, tensors[name] * ratio * ratio)
        if keys.ENERGY_STD in tensors:
            store(keys.ENERGY_STD, tensors[keys.ENERGY_STD] * ratio)
        if keys.ATOMIC_ENERGY_STD in tensors:
            if batch is None:
                if keys.BATCH not in tensors:
                    raise CalibrationError(f"calibrate_prediction: atomic energy σ's need batch (or '{keys.BATCH}')")
                batch = tensors[keys.BATCH]
            structure_of_atom = _as_tensor(batch).to(device=ratio.device, dtype=torch.long)
            store(keys.ATOMIC_ENERGY_STD, tensors[keys.ATOMIC_ENERGY_STD] * ratio[structure_of_atom])
    return result


# -- fitting on a validation set -------------------------------------------------------------


def _references(prediction: Mapping[str, np.ndarray]):
    from ._evaluate import reference_key

    return prediction.get(reference_key(keys.ENERGY)), prediction.get(reference_key(keys.FORCES))


def _require_positive_sigma(sigma: np.ndarray, what: str) -> None:
    if np.any(~(sigma > 0.0)):
        raise CalibrationError(
            f"cannot calibrate: some predicted {what} σ's are zero (or NaN); the posterior predicts no "
            "uncertainty there (e.g. one member trained with MSE, without variance heads)"
        )


def fit_std_map(sigma: np.ndarray, squared_error: np.ndarray, max_knots: int = MAX_MAP_KNOTS) -> Dict[str, list]:
    """Isotonic map g(x) = sqrt(iso(x)) where iso is the increasing least-squares fit of
    the squared errors on σ (both arrays 1-D, paired); at most ``max_knots`` knots."""
    from sklearn.isotonic import IsotonicRegression

    sigma = np.asarray(sigma, dtype=np.float64).ravel()
    squared_error = np.asarray(squared_error, dtype=np.float64).ravel()
    iso = IsotonicRegression(increasing=True, out_of_bounds="clip").fit(sigma, squared_error)
    # the fitted function is linear between its thresholds, which sklearn already
    # de-duplicates in x and prunes to the ends of each flat block
    x = np.asarray(iso.X_thresholds_, dtype=np.float64)
    y = np.asarray(iso.y_thresholds_, dtype=np.float64)
    x, first = np.unique(x, return_index=True)
    y = y[first]
    if x.size > max_knots:
        chosen = np.unique(np.round(np.linspace(0, x.size - 1, max_knots)).astype(np.int64))
        x, y = x[chosen], y[chosen]
    calibrated = np.sqrt(np.maximum(y, 0.0))
    calibrated = np.maximum(calibrated, MAP_VALUE_FLOOR_FRACTION * x[0])
    calibrated = np.maximum.accumulate(calibrated)  # guard against round-off dips
    return validate_std_map({keys.META_MAP_SIGMA: x, keys.META_MAP_CALIBRATED: calibrated}, "fitted std map")


def fit_calibration(prediction: Mapping[str, np.ndarray], method: str = "isotonic") -> Dict[str, object]:
    """A calibration fitted on uncalibrated predictions with references (``predict_frames``).

    ``scalar``: the NLL-optimal scales s² = mean((e/σ)²), over force components
    (e = ΔF_i,a, σ = σ_F,i) and over structures (e = ΔE_b, σ = σ_E,b); no maps.
    ``isotonic``: scales 1 and maps fitted by increasing isotonic regression of the squared
    error on σ: forces x = σ_F,i, y = |ΔF_i|²/3; energies x = σ_E,b/N_b, y = (ΔE_b/N_b)².
    Only the parts with references are fitted (the other stays the identity); with neither
    reference, or a σ of zero, it raises ``CalibrationError``.
    """
    from ._evaluate import energy_std

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
        else:
            calibration[keys.META_FORCE_STD_SCALE] = 1.0
            calibration[keys.META_FORCE_STD_MAP] = fit_std_map(sigma, np.sum(error**2, axis=1) / 3.0)
    if reference_energy is not None:
        error = np.asarray(prediction[keys.ENERGY], dtype=np.float64) - reference_energy
        sigma = energy_std(prediction)
        _require_positive_sigma(sigma, "energy")
        if method == "scalar":
            calibration[keys.META_ENERGY_STD_SCALE] = float(np.sqrt(np.mean((error / sigma) ** 2)))
        else:
            num_atoms = np.asarray(prediction[keys.NUM_ATOMS], dtype=np.float64)
            calibration[keys.META_ENERGY_STD_SCALE] = 1.0
            calibration[keys.META_ENERGY_STD_MAP] = fit_std_map(sigma / num_atoms, (error / num_atoms) ** 2)
    return validate_calibration(calibration)


def _check_threshold_settings(quantile: float, factor: float) -> None:
    if not 0.0 < quantile <= 1.0:
        raise CalibrationError(f"threshold quantile must lie in (0, 1], got {quantile}")
    if not (math.isfinite(factor) and factor > 0.0):
        raise CalibrationError(f"threshold factor must be a finite number > 0, got {factor}")


def extrapolation_threshold(prediction_calibrated: Mapping[str, np.ndarray], quantile: float = 0.99,
                            factor: float = 1.5) -> float:
    """``factor`` × the ``quantile`` over structures of each structure's largest calibrated
    ATOMIC_FORCE_STD (eV/Å). The margin is there because MD visits far more configurations
    than a validation set holds; a threshold at the set's own extremes trips on ordinary
    fluctuations."""
    _check_threshold_settings(quantile, factor)
    sigma = np.asarray(prediction_calibrated[keys.ATOMIC_FORCE_STD], dtype=np.float64)
    structure = np.asarray(prediction_calibrated[keys.BATCH], dtype=np.int64)
    if sigma.size == 0:
        raise CalibrationError("extrapolation_threshold: no atoms")
    largest = np.full(int(structure.max()) + 1, -np.inf)
    np.maximum.at(largest, structure, sigma)
    largest = largest[np.isfinite(largest)]  # structures without atoms have no σ
    return float(factor * np.quantile(largest, quantile))


def uncertainty_metrics(prediction: Mapping[str, np.ndarray]) -> Dict[str, float]:
    """NLL, miscalibration area and ENCE (≤ 10 bins) for forces (per component, σ = σ_F,i,
    eV/Å) and energies (per structure, eV), where references exist and every σ is positive,
    and the sharpness of σ_F,i (eV/Å) and of σ_E,b/N_b (meV/atom). Named as in
    ``_evaluate.METRIC_UNITS``."""
    from ._evaluate import energy_std
    from ._metrics import ence, gaussian_nll, miscalibration_area, sharpness

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
        metrics[f"{name}_ence"] = ence(error, sigma, n_bins=min(10, error.size))
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
) -> Dict[str, object]:
    """Fit a calibration on ``valid_file`` and write the posterior with it to ``out_path``.

    Predicts ``valid_file`` uncalibrated (any calibration the file had is ignored and
    replaced), fits ``method``, sets the default extrapolation threshold
    (``extrapolation_threshold`` of the calibrated predictions) and writes a copy of the
    record with ``calibration`` and ``thresholds`` set (atomically; ``out_path`` None or
    equal to ``posterior_path`` overwrites). Returns ``{calibration, thresholds, threshold,
    n_structures, n_atoms, metrics_before, metrics_after, out_path}``; the metrics are
    ``uncertainty_metrics`` and ``_evaluate.set_metrics`` of the uncalibrated and the
    calibrated predictions.
    """
    from ._data import read_frames
    from ._evaluate import predict_frames, set_metrics
    from ._posterior import load_posterior, update_posterior_file

    if method not in METHODS:
        raise CalibrationError(f"calibration method must be one of {list(METHODS)}, got {method!r}")
    _check_threshold_settings(threshold_quantile, threshold_factor)  # before the costly prediction
    out_path = Path(posterior_path if out_path is None else out_path)
    posterior = load_posterior(posterior_path, dtype=torch.float64)
    posterior.calibration = {}  # fit on what the members predict, not on an earlier calibration
    frames = read_frames(valid_file, energy_key=energy_key, forces_key=forces_key,
                         require_energy=False, require_forces=False)
    prediction = predict_frames(posterior, frames, dtype=torch.float64, progress=progress,
                                progress_label="predict validation set")
    calibration = fit_calibration(prediction, method)
    calibrated = calibrate_prediction(prediction, calibration)
    threshold = extrapolation_threshold(calibrated, threshold_quantile, threshold_factor)
    thresholds = {keys.ATOMIC_FORCE_STD: threshold}
    update_posterior_file(posterior_path, out_path, calibration=calibration, thresholds=thresholds)
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


def describe_calibration(calibration: Mapping) -> str:
    """One line per part: the scale and, with a map, its knot count and range (for the CLI)."""
    lines = []
    for label, scale_field, map_field, unit in (
        ("forces", keys.META_FORCE_STD_SCALE, keys.META_FORCE_STD_MAP, "eV/Å"),
        ("energy", keys.META_ENERGY_STD_SCALE, keys.META_ENERGY_STD_MAP, "eV/atom"),
    ):
        if scale_field not in calibration and map_field not in calibration:
            lines.append(f"{label}: not calibrated (no references)")
            continue
        text = f"{label}: scale {calibration.get(scale_field, 1.0):.4g}"
        std_map = calibration.get(map_field)
        if std_map:
            x, y = std_map[keys.META_MAP_SIGMA], std_map[keys.META_MAP_CALIBRATED]
            text += (f", map of {len(x)} knots: σ {x[0]:.3g} … {x[-1]:.3g} {unit} → "
                     f"{y[0]:.3g} … {y[-1]:.3g} {unit} (ratio {y[0] / x[0]:.3g} … {y[-1] / x[-1]:.3g})")
        lines.append(text)
    return "\n".join(lines)
