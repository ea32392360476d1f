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


# -- calibration of predicted σ's -----------------------------------------------------------

CALIBRATION_LEVELS = np.linspace(0.01, 0.99, 99)
"""Nominal levels of the calibration curve: 0.01, 0.02, ..., 0.99."""


def _error_and_sigma(error, sigma, name: str):
    error = _as_array(error)
    sigma = np.broadcast_to(_as_array(sigma), error.shape)
    if error.size == 0:
        raise ValueError(f"{name}: no errors given")
    if np.any(~(sigma > 0)):
        raise ValueError(f"{name}: every sigma must be positive (and not NaN)")
    return error, sigma


def calibration_curve(error, sigma, levels=None):
    """(expected, observed) fractions of errors inside central Gaussian intervals.

    For each nominal level p (default ``CALIBRATION_LEVELS``) the interval is
    |e| ≤ z_p·σ with z_p = Φ⁻¹(0.5 + p/2); ``observed`` is the fraction of elements inside
    it and ``expected`` = p. A calibrated Gaussian predictor lies on the diagonal; an
    overconfident one (σ too small) below it.
    """
    from scipy import stats

    error, sigma = _error_and_sigma(error, sigma, "calibration_curve")
    expected = CALIBRATION_LEVELS.copy() if levels is None else _as_array(levels).ravel()
    if np.any((expected <= 0.0) | (expected >= 1.0)):
        raise ValueError("calibration_curve: levels must lie strictly between 0 and 1")
    z = stats.norm.ppf(0.5 + 0.5 * expected)
    normalised = np.sort((np.abs(error) / sigma).ravel())
    # number of |e|/σ ≤ z_p for every level at once (side="right" counts ties as inside)
    observed = np.searchsorted(normalised, z, side="right") / normalised.size
    return expected, observed.astype(np.float64)


def miscalibration_area(error, sigma) -> float:
    """Area between the calibration curve and the diagonal, in [0, 0.5].

    Convention: the mean of |observed(p) − p| over the 99 levels p = 0.01 … 0.99 of
    ``CALIBRATION_LEVELS`` (a Riemann sum of ∫₀¹ |observed(p) − p| dp). 0 for perfectly
    calibrated σ's; when every predicted σ is k times the true one it approaches
    mean_p |2Φ(k·z_p) − 1 − p|.
    """
    expected, observed = calibration_curve(error, sigma)
    return float(np.mean(np.abs(observed - expected)))


def ence(error, sigma, n_bins: int = 10) -> float:
    """Expected normalised calibration error (Levi et al., 2022).

    Elements are sorted by σ and split into ``n_bins`` bins of (nearly) equal count; per bin
    RMV_b = sqrt(mean σ²) and RMSE_b = sqrt(mean e²), and
    ENCE = mean_b |RMV_b − RMSE_b| / RMV_b. 0 when σ matches the error in every bin;
    when every predicted σ is k times the true one it approaches |k − 1| / k.
    """
    error, sigma = _error_and_sigma(error, sigma, "ence")
    error = error.ravel()
    sigma = np.ascontiguousarray(sigma).ravel()
    if n_bins < 1 or n_bins > error.size:
        raise ValueError(f"ence: n_bins must lie between 1 and the number of elements ({error.size}), got {n_bins}")
    order = np.argsort(sigma, kind="stable")
    terms = []
    for chosen in np.array_split(order, n_bins):
        rmv = math.sqrt(float(np.mean(sigma[chosen] ** 2)))
        bin_rmse = math.sqrt(float(np.mean(error[chosen] ** 2)))
        terms.append(abs(rmv - bin_rmse) / rmv)
    return float(np.mean(terms))


def sharpness(sigma) -> float:
    """Root mean square of the predicted σ's, sqrt(mean σ²) (smaller = sharper)."""
    sigma = _as_array(sigma)
    if sigma.size == 0:
        raise ValueError("sharpness: no sigmas given")
    return float(np.sqrt(np.mean(np.square(sigma))))


# -- out-of-distribution detection -------------------------------------------------------


def _labelled_scores(scores_in, scores_out):
    scores_in = _as_array(scores_in).ravel()
    scores_out = _as_array(scores_out).ravel()
    if scores_in.size == 0 or scores_out.size == 0:
        raise ValueError(
            f"OOD detection needs scores of both kinds: got {scores_in.size} in-distribution "
            f"and {scores_out.size} out-of-distribution"
        )
    scores = np.concatenate([scores_in, scores_out])
    if not np.all(np.isfinite(scores)):
        raise ValueError("OOD detection: every score must be finite")
    labels = np.concatenate([np.zeros(scores_in.size), np.ones(scores_out.size)])
    return labels, scores


def auroc(scores_in, scores_out) -> float:
    """Area under the ROC curve for telling out-of-distribution from in-distribution.

    In-distribution elements are the negatives (label 0), out-of-distribution ones the
    positives (label 1); a larger score means "more out-of-distribution". Equals the
    probability that a random OOD score exceeds a random ID score (ties count 1/2):
    1 separates perfectly, 0.5 is chance.
    """
    from sklearn.metrics import roc_auc_score

    labels, scores = _labelled_scores(scores_in, scores_out)
    return float(roc_auc_score(labels, scores))


def roc_curve(scores_in, scores_out):
    """(false positive rate, true positive rate) over all thresholds; labels as in ``auroc``."""
    from sklearn import metrics

    labels, scores = _labelled_scores(scores_in, scores_out)
    fpr, tpr, _ = metrics.roc_curve(labels, scores)
    return fpr.astype(np.float64), tpr.astype(np.float64)
