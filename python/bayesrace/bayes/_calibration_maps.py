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

Calibration by parts (``fit_calibration(method="split")``): a quantity may instead carry one
map per part, ``force_epistemic_std_map`` / ``force_aleatoric_std_map`` (and the same for
``energy``), never together with its total map. Each part is then mapped on its own raw σ
(forces: σ_epi,i = sqrt(tr Σ_epi/3), σ_ale,i likewise; energy: sqrt(var)/N_b per part),
its σ's × r_part, its covariance or variance × r_part², and the totals are recomputed as
sqrt(c_epi² + c_ale²); ATOMIC_ENERGY_STD (the members' spread) follows the epistemic ratio.
Each part keeps its own order; in-distribution data that shrinks the aleatoric part leaves
the epistemic part, which carries novelty, as its own map says.

The empty dict ``IDENTITY`` is the uncalibrated posterior. Units: eV, Å.
"""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Dict, Mapping, Optional, Union

import numpy as np
import torch

from .. import keys

IDENTITY: Mapping[str, object] = MappingProxyType({})
"""The calibration that changes nothing (read-only; copy it with ``dict(IDENTITY)``)."""

METHODS = ("scalar", "isotonic", "split")
MAX_MAP_KNOTS = 64
# isotonic map values are floored at this fraction of the smallest knot σ: a block of
# near-zero validation errors must not turn into a zero (infinitely confident) σ
MAP_VALUE_FLOOR_FRACTION = 1e-3

_SCALE_FIELDS = (keys.META_FORCE_STD_SCALE, keys.META_ENERGY_STD_SCALE)
# quantity -> (total map, epistemic map, aleatoric map)
_PART_MAP_FIELDS = {
    "force": (keys.META_FORCE_STD_MAP, keys.META_FORCE_EPISTEMIC_STD_MAP, keys.META_FORCE_ALEATORIC_STD_MAP),
    "energy": (keys.META_ENERGY_STD_MAP, keys.META_ENERGY_EPISTEMIC_STD_MAP, keys.META_ENERGY_ALEATORIC_STD_MAP),
}
_ALL_MAP_FIELDS = tuple(name for fields in _PART_MAP_FIELDS.values() for name in fields)
# extrapolation thresholds: of the max atomic force σ (required in a deployable), and optionally
# of the max epistemic force σ, of the epistemic energy σ per atom and of the max relative
# epistemic force σ (compute bayesrace 1, 6, 7, 8)
_THRESHOLD_FIELDS = (keys.ATOMIC_FORCE_STD, keys.ATOMIC_FORCE_STD_EPISTEMIC, keys.ENERGY_STD_EPISTEMIC_PER_ATOM,
                     keys.ATOMIC_FORCE_STD_RELATIVE, keys.ATOMIC_FEATURE_DISTANCE)

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
    unknown = set(calibration) - set(_SCALE_FIELDS + _ALL_MAP_FIELDS)
    if unknown:
        raise CalibrationError(
            f"{field} has unknown field(s) {sorted(unknown)}; expected some of {list(_SCALE_FIELDS + _ALL_MAP_FIELDS)}"
        )
    checked: Dict[str, object] = {}
    for name in _SCALE_FIELDS:
        if name in calibration:
            checked[name] = _positive_float(calibration[name], f"{field}.{name}")
    for name in _ALL_MAP_FIELDS:
        if calibration.get(name) is not None:
            checked[name] = validate_std_map(calibration[name], f"{field}.{name}")
    for total, *parts in _PART_MAP_FIELDS.values():
        if total in checked and any(part in checked for part in parts):
            raise CalibrationError(f"{field} has both '{total}' and a map by parts ({', '.join(parts)}); "
                                   "a quantity is calibrated either as a total or by parts")
    return checked


def validate_thresholds(thresholds, field: str = keys.META_THRESHOLDS) -> Dict[str, float]:
    """A checked copy of ``{atomic_force_std: X, ...}`` (each > 0; fields ``_THRESHOLD_FIELDS``);
    ``None`` gives ``{}``."""
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


def _std_of_covariance(covariance: torch.Tensor) -> torch.Tensor:
    """sqrt(tr Σ / 3) of each [3, 3] covariance."""
    return torch.sqrt(torch.diagonal(covariance, dim1=-2, dim2=-1).sum(dim=-1) / 3.0)


def _uncalibrated_force_std(prediction: Mapping[str, torch.Tensor]) -> Optional[torch.Tensor]:
    if keys.ATOMIC_FORCE_STD in prediction:
        return prediction[keys.ATOMIC_FORCE_STD]
    covariances = [prediction[name] for name in _FORCE_COV_FIELDS if name in prediction]
    if not covariances:
        return None
    return _std_of_covariance(sum(covariances))


def _part_force_std(prediction: Mapping[str, torch.Tensor], std_name: str, cov_name: str) -> Optional[torch.Tensor]:
    """One part's raw force σ per atom: its std field, else sqrt(tr Σ / 3) of its covariance."""
    if std_name in prediction:
        return prediction[std_name]
    if cov_name in prediction:
        return _std_of_covariance(prediction[cov_name])
    return None


def _total_std(parts) -> torch.Tensor:
    """sqrt(Σ (r·σ)²) over the (σ, r) parts that exist."""
    return torch.sqrt(sum((sigma * ratio) ** 2 for sigma, ratio in parts if sigma is not None))


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

    force_scale = float(calibration.get(keys.META_FORCE_STD_SCALE, 1.0))
    force_total, force_epi, force_ale = (calibration.get(name) for name in _PART_MAP_FIELDS["force"])
    if force_epi or force_ale:
        sigma_epi = _part_force_std(tensors, keys.ATOMIC_FORCE_STD_EPISTEMIC, keys.FORCE_COV_EPISTEMIC)
        sigma_ale = _part_force_std(tensors, keys.ATOMIC_FORCE_STD_ALEATORIC, keys.FORCE_COV_ALEATORIC)
        if sigma_epi is None and sigma_ale is None and _uncalibrated_force_std(tensors) is not None:
            raise CalibrationError("calibrate_prediction: a calibration by parts needs the epistemic and aleatoric "
                                   "force σ's (or covariances), the prediction has only the total")
        ratios = [None if sigma is None else force_scale * _map_and_ratio(sigma, part)[1]
                  for sigma, part in ((sigma_epi, force_epi), (sigma_ale, force_ale))]
        if keys.ATOMIC_FORCE_STD in tensors:
            store(keys.ATOMIC_FORCE_STD, _total_std(((sigma_epi, ratios[0]), (sigma_ale, ratios[1]))))
    else:
        force_std = _uncalibrated_force_std(tensors)
        ratio = None if force_std is None else force_scale * _map_and_ratio(force_std, force_total)[1]
        ratios = [ratio, ratio]
        if ratio is not None and keys.ATOMIC_FORCE_STD in tensors:
            store(keys.ATOMIC_FORCE_STD, tensors[keys.ATOMIC_FORCE_STD] * ratio)
    for ratio, std_name, cov_name in zip(ratios, _FORCE_STD_FIELDS[1:], _FORCE_COV_FIELDS):
        if ratio is None:
            continue
        if std_name in tensors:
            store(std_name, tensors[std_name] * ratio)
        if cov_name in tensors:
            store(cov_name, tensors[cov_name] * (ratio * ratio)[:, None, None])

    energy_scale = float(calibration.get(keys.META_ENERGY_STD_SCALE, 1.0))
    energy_total, energy_epi, energy_ale = (calibration.get(name) for name in _PART_MAP_FIELDS["energy"])
    variances = {name: tensors[name] for name in _ENERGY_VAR_FIELDS if name in tensors}
    if variances:
        if num_atoms is None:
            if keys.NUM_ATOMS not in tensors:
                raise CalibrationError(f"calibrate_prediction: energy σ's need num_atoms (or '{keys.NUM_ATOMS}')")
            num_atoms = tensors[keys.NUM_ATOMS]
        first = next(iter(variances.values()))
        count = _as_tensor(num_atoms).to(device=first.device, dtype=first.dtype)
        if energy_epi or energy_ale:
            ratio_of = {name: energy_scale * _map_and_ratio(torch.sqrt(variances[name]) / count, part)[1]
                        for name, part in zip(_ENERGY_VAR_FIELDS, (energy_epi, energy_ale)) if name in variances}
        else:
            per_atom_sigma = torch.sqrt(sum(variances.values())) / count
            total_ratio = energy_scale * _map_and_ratio(per_atom_sigma, energy_total)[1]
            ratio_of = {name: total_ratio for name in variances}
        for name, ratio in ratio_of.items():
            store(name, variances[name] * ratio * ratio)
        if keys.ENERGY_STD in tensors:
            if energy_epi or energy_ale:
                store(keys.ENERGY_STD, torch.sqrt(sum(variances[name] * ratio_of[name] ** 2 for name in ratio_of)))
            else:
                store(keys.ENERGY_STD, tensors[keys.ENERGY_STD] * total_ratio)
        # the members' spread of atomic energies is epistemic
        atomic_ratio = ratio_of.get(keys.ENERGY_VAR_EPISTEMIC, next(iter(ratio_of.values())))
        if keys.ATOMIC_ENERGY_STD in tensors:
            if batch is None:
                if keys.BATCH not in tensors:
                    raise CalibrationError(f"calibrate_prediction: atomic energy σ's need batch (or '{keys.BATCH}')")
                batch = tensors[keys.BATCH]
            structure_of_atom = _as_tensor(batch).to(device=atomic_ratio.device, dtype=torch.long)
            store(keys.ATOMIC_ENERGY_STD, tensors[keys.ATOMIC_ENERGY_STD] * atomic_ratio[structure_of_atom])
    return result
