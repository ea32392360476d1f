"""Calibration by parts (method ``split``): one map for the epistemic σ, one for the aleatoric σ.

Why: a single map on the total σ, fitted in distribution, rescales every σ alike. When the
aleatoric heads are too wide in distribution it shrinks the total, and with it the
epistemic part that carries novelty: out-of-distribution σ's come out too small. Here the
two parts get their own strictly increasing maps, fitted jointly by maximum likelihood,

    v_k = (b·e_k)² + (α·a₀·(a_k/a₀)^p)²,   NLL = ½ Σ_k [d_k·log v_k + y_k / v_k],

where e_k, a_k are the raw epistemic and aleatoric σ's of sample k (per atom for forces,
per atom of a structure for energies), y_k its squared error summed over its d_k
components and a₀ the median a. The epistemic factor is floored at b ≥ 1: in-distribution
data says little about how large the members' spread should be out of distribution, so it
may widen the epistemic σ but never narrows it. Whether the power p is fitted or fixed at 1
(scales only) is chosen by the NLL on held-out halves of the data.

The maps use the knot format of ``bayes._calibration_maps``: the epistemic map is one knot
(a scale), the aleatoric power law is sampled at ``SPLIT_MAP_KNOTS`` log-spaced knots over
the fitted σ range and, like every map, is proportional beyond it.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np

from .. import keys
from ..bayes import CalibrationError, validate_std_map

SPLIT_MAP_KNOTS = 24
POWER_BOUNDS = (0.2, 5.0)
SCALE_LOG_BOUNDS = (-12.0, 12.0)  # natural-log bounds of α and b
HELD_OUT_SEED = 0


def _nll(params: np.ndarray, free_power: bool, e, a, a0, y, d) -> float:
    log_alpha, log_b = params[0], params[1]
    power = params[2] if free_power else 1.0
    variance = (np.exp(log_b) * e) ** 2 + (np.exp(log_alpha) * a0 * (a / a0) ** power) ** 2
    variance = np.maximum(variance, 1e-300)
    return float(0.5 * np.sum(d * np.log(variance) + y / variance))


def _fit(free_power: bool, e, a, a0, y, d) -> np.ndarray:
    from scipy.optimize import minimize

    start = np.array([0.0, 0.0, 1.0]) if free_power else np.array([0.0, 0.0])
    bounds = [SCALE_LOG_BOUNDS, (0.0, SCALE_LOG_BOUNDS[1])] + ([POWER_BOUNDS] if free_power else [])
    result = minimize(_nll, start, args=(free_power, e, a, a0, y, d), method="L-BFGS-B", bounds=bounds)
    return result.x


def _held_out_nll(free_power: bool, e, a, a0, y, d) -> float:
    """Two-fold: fit on one half, NLL on the other, both ways (seeded halves)."""
    order = np.random.default_rng(HELD_OUT_SEED).permutation(e.size)
    halves = (order[: e.size // 2], order[e.size // 2:])
    total = 0.0
    for fit_on, test_on in (halves, halves[::-1]):
        params = _fit(free_power, e[fit_on], a[fit_on], a0, y[fit_on], d[fit_on])
        total += _nll(params, free_power, e[test_on], a[test_on], a0, y[test_on], d[test_on])
    return total


def fit_split_maps(
    squared_error: np.ndarray, sigma_epistemic: np.ndarray, sigma_aleatoric: np.ndarray, components: int,
    what: str,
) -> Tuple[Optional[Dict[str, list]], Optional[Dict[str, list]], Dict[str, float]]:
    """(epistemic map, aleatoric map, fitted parameters) from paired 1-D arrays: the squared
    error summed over ``components`` components and the two raw σ's of each sample. A part
    that is zero everywhere (one member; members without variance heads) gets no map."""
    y = np.asarray(squared_error, dtype=np.float64).ravel()
    e = np.asarray(sigma_epistemic, dtype=np.float64).ravel()
    a = np.asarray(sigma_aleatoric, dtype=np.float64).ravel()
    if not (y.size == e.size == a.size) or y.size < 4:
        raise CalibrationError(f"cannot calibrate {what} by parts: need at least 4 samples with both σ's")
    if not (np.all(np.isfinite(e)) and np.all(np.isfinite(a)) and np.all(e >= 0) and np.all(a >= 0)):
        raise CalibrationError(f"cannot calibrate {what} by parts: some σ's are negative, NaN or infinite")
    has_epistemic, has_aleatoric = bool(np.any(e > 0)), bool(np.any(a > 0))
    if np.any(~((e > 0) | (a > 0))):
        raise CalibrationError(f"cannot calibrate {what} by parts: some samples have neither an epistemic nor an "
                               "aleatoric σ (the posterior predicts no uncertainty there)")
    d = np.full(y.size, float(components))
    a0 = float(np.median(a[a > 0])) if has_aleatoric else 1.0
    if not has_aleatoric:
        a = np.zeros_like(a)
    if not has_epistemic:
        e = np.zeros_like(e)
    candidates = (False, True) if has_aleatoric else (False,)
    held_out = {free: _held_out_nll(free, e, a, a0, y, d) for free in candidates}
    free_power = min(held_out, key=held_out.get)
    params = _fit(free_power, e, a, a0, y, d)
    alpha, b = float(np.exp(params[0])), float(np.exp(params[1]))
    power = float(params[2]) if free_power else 1.0
    fitted = {"aleatoric_scale": alpha, "aleatoric_power": power, "epistemic_scale": b,
              "held_out_nll_power_free": held_out.get(True, float("nan")),
              "held_out_nll_power_1": held_out[False]}
    epistemic_map = None
    if has_epistemic:
        e0 = float(np.median(e[e > 0]))
        epistemic_map = validate_std_map({keys.META_MAP_SIGMA: [e0], keys.META_MAP_CALIBRATED: [b * e0]},
                                         f"fitted {what} epistemic map")
    aleatoric_map = None
    if has_aleatoric:
        low, high = np.quantile(a[a > 0], [0.005, 0.995])
        x = np.geomspace(low, high, SPLIT_MAP_KNOTS) if high > low else np.array([low])
        aleatoric_map = validate_std_map(
            {keys.META_MAP_SIGMA: x, keys.META_MAP_CALIBRATED: alpha * a0 * (x / a0) ** power},
            f"fitted {what} aleatoric map")
    return epistemic_map, aleatoric_map, fitted
