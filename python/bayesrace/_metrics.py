"""Error and uncertainty metrics on numpy arrays.

Functions taking ``error`` expect prediction minus reference, any shape; ``sigma`` is the
predicted standard deviation of that error and broadcasts against it. Every function
returns plain Python floats (or a dict of them) so results serialise to JSON directly.
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, Sequence

import numpy as np

COVERAGE_LEVELS = (0.68, 0.95, 0.99)


def _as_array(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)


def mae(error) -> float:
    """Mean absolute error."""
    return float(np.mean(np.abs(_as_array(error))))


def rmse(error) -> float:
    """Root mean squared error."""
    return float(np.sqrt(np.mean(np.square(_as_array(error)))))


def error_summary(pred, ref) -> Dict[str, float]:
    """MAE, RMSE, mean (bias) and largest absolute value of ``pred - ref``."""
    error = _as_array(pred) - _as_array(ref)
    return {
        "mae": mae(error),
        "rmse": rmse(error),
        "mean": float(np.mean(error)),
        "max_abs": float(np.max(np.abs(error))),
    }


def gaussian_nll(error, sigma) -> float:
    """Mean negative log-likelihood of ``error`` under N(0, sigma²), constant included.

    Per element: 0.5·log(2π) + log σ + 0.5·(e/σ)². With the 0.5·log(2π) term the value
    is a proper negative log density (in units of log(1/unit of error)), so it can be
    compared with numbers from other codes that include it; for well-calibrated
    predictions it approaches 0.5·log(2πσ²) + 0.5 on average.
    """
    error = _as_array(error)
    sigma = np.broadcast_to(_as_array(sigma), error.shape)
    if np.any(sigma <= 0):
        raise ValueError("gaussian_nll: every sigma must be positive")
    z = error / sigma
    return float(np.mean(0.5 * math.log(2.0 * math.pi) + np.log(sigma) + 0.5 * z * z))


def spearman(abs_error, sigma) -> float:
    """Spearman rank correlation between absolute errors and predicted σ (NaN if either is constant)."""
    from scipy import stats

    abs_error = _as_array(abs_error).ravel()
    sigma = _as_array(sigma).ravel()
    if abs_error.shape != sigma.shape:
        raise ValueError(f"spearman: {abs_error.shape[0]} errors but {sigma.shape[0]} sigmas")
    if abs_error.size < 2 or np.ptp(abs_error) == 0 or np.ptp(sigma) == 0:
        return float("nan")  # a constant input has no ranking (e.g. epistemic σ of one member)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(stats.spearmanr(abs_error, sigma).statistic)


def coverage(error, sigma, levels: Sequence[float] = COVERAGE_LEVELS) -> Dict[float, float]:
    """Fraction of errors inside the central Gaussian interval of each nominal level.

    For level p the interval is |e| ≤ z·σ with z = Φ⁻¹(0.5 + p/2) (z ≈ 1.0, 1.96, 2.58 for
    0.68, 0.95, 0.99); a calibrated Gaussian predictor covers a fraction p of the errors.
    """
    from scipy import stats

    error = _as_array(error)
    sigma = np.broadcast_to(_as_array(sigma), error.shape)
    result = {}
    for level in levels:
        if not 0.0 < level < 1.0:
            raise ValueError(f"coverage: levels must lie strictly between 0 and 1, got {level}")
        z = float(stats.norm.ppf(0.5 + 0.5 * level))
        result[float(level)] = float(np.mean(np.abs(error) <= z * sigma))
    return result
