import math

import numpy as np
import pytest

from scipy import stats

from bayesrace.uq import (
    CALIBRATION_LEVELS,
    auroc,
    calibration_curve,
    coverage,
    ence,
    error_summary,
    gaussian_nll,
    mae,
    miscalibration_area,
    rmse,
    roc_curve,
    sharpness,
    spearman,
)


def test_mae_rmse_and_summary_on_known_values():
    error = np.array([1.0, -2.0, 2.0, -1.0])
    assert mae(error) == pytest.approx(1.5)
    assert rmse(error) == pytest.approx(math.sqrt(2.5))
    summary = error_summary(np.array([2.0, 0.0, 5.0]), np.array([1.0, 1.0, 2.0]))
    assert summary == pytest.approx({"mae": 5.0 / 3.0, "rmse": math.sqrt(11.0 / 3.0), "mean": 1.0, "max_abs": 3.0})
    assert isinstance(mae(error), float)


def test_gaussian_nll_of_exact_value():
    # one point: 0.5 log 2π + log σ + 0.5 (e/σ)²
    assert gaussian_nll([1.0], [2.0]) == pytest.approx(0.5 * math.log(2 * math.pi) + math.log(2.0) + 0.125)
    # scalar sigma broadcasts
    assert gaussian_nll([1.0, -1.0], 2.0) == pytest.approx(gaussian_nll([1.0], [2.0]))
    with pytest.raises(ValueError):
        gaussian_nll([1.0], [0.0])


def test_gaussian_nll_of_calibrated_samples():
    rng = np.random.default_rng(0)
    sigma = 0.3
    error = rng.normal(0.0, sigma, size=200_000)
    expected = 0.5 * math.log(2 * math.pi * sigma**2) + 0.5
    assert gaussian_nll(error, sigma) == pytest.approx(expected, abs=5e-3)
    # an overconfident σ is penalised
    assert gaussian_nll(error, sigma / 3) > expected + 1.0


def test_coverage_matches_nominal_for_calibrated_errors():
    rng = np.random.default_rng(1)
    sigma = rng.uniform(0.1, 2.0, size=20_000)
    error = rng.normal(0.0, sigma)
    result = coverage(error, sigma)
    assert set(result) == {0.68, 0.95, 0.99}
    for level, fraction in result.items():
        assert fraction == pytest.approx(level, abs=0.01)
    # twice too small σ covers far less
    assert coverage(error, sigma / 2, levels=(0.95,))[0.95] < 0.75
    with pytest.raises(ValueError):
        coverage(error, sigma, levels=(1.0,))


def test_spearman():
    sigma = np.linspace(0.1, 1.0, 50)
    assert spearman(sigma**3, sigma) == pytest.approx(1.0)
    assert spearman(1.0 / sigma, sigma) == pytest.approx(-1.0)
    rng = np.random.default_rng(2)
    assert abs(spearman(rng.uniform(size=5000), rng.uniform(size=5000))) < 0.05
    assert math.isnan(spearman(sigma, np.zeros_like(sigma)))  # constant σ has no ranking
    with pytest.raises(ValueError):
        spearman(sigma, sigma[:-1])


def heteroscedastic_errors(n=200_000, seed=3):
    """σ varying over two decades and errors drawn with exactly that σ."""
    rng = np.random.default_rng(seed)
    sigma = np.exp(rng.uniform(np.log(0.01), np.log(1.0), size=n))
    return rng.normal(0.0, sigma), sigma


def analytic_area(k):
    """Miscalibration area when every predicted σ is k times the true one: observed(p) = 2Φ(k z_p) − 1."""
    z = stats.norm.ppf(0.5 + 0.5 * CALIBRATION_LEVELS)
    return float(np.mean(np.abs(2.0 * stats.norm.cdf(k * z) - 1.0 - CALIBRATION_LEVELS)))


def test_calibrated_heteroscedastic_errors_score_as_calibrated():
    error, sigma = heteroscedastic_errors()
    expected_nll = 0.5 * math.log(2 * math.pi) + float(np.mean(np.log(sigma))) + 0.5
    assert gaussian_nll(error, sigma) == pytest.approx(expected_nll, abs=5e-3)
    assert miscalibration_area(error, sigma) < 0.005
    assert ence(error, sigma) < 0.02
    expected, observed = calibration_curve(error, sigma)
    np.testing.assert_allclose(expected, np.arange(1, 100) / 100)
    np.testing.assert_allclose(observed, expected, atol=0.01)


@pytest.mark.parametrize("k", [2.0, 0.5])
def test_scaled_sigma_matches_analytic_miscalibration(k):
    error, sigma = heteroscedastic_errors(seed=4)
    area = miscalibration_area(error, k * sigma)
    assert analytic_area(k) > 0.1  # the case is far from calibrated
    assert area == pytest.approx(analytic_area(k), abs=0.005)
    assert ence(error, k * sigma) == pytest.approx(abs(k - 1.0) / k, rel=0.03)


def test_calibration_curve_counts_by_hand():
    # |e|/σ = 0.1, 0.5, 1.0, 2.0, 3.0; z(0.6827) = 1 includes the tie at 1.0
    error = np.array([0.1, -1.0, 3.0, -4.0, 3.0])
    sigma = np.array([1.0, 2.0, 3.0, 2.0, 1.0])
    level_at_one = 2 * stats.norm.cdf(1.0) - 1
    level_at_two = 2 * stats.norm.cdf(2.0) - 1
    expected, observed = calibration_curve(error, sigma, levels=[0.05, level_at_one, level_at_two, 0.999])
    np.testing.assert_allclose(observed, [0.0, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(expected, [0.05, level_at_one, level_at_two, 0.999])
    with pytest.raises(ValueError):
        calibration_curve(error, np.zeros(5))


def test_ence_by_hand():
    # two bins of two: σ = (1, 1) with errors (2, 0): RMSE √2; σ = (2, 2) with errors (2, −2): RMSE 2
    error = np.array([2.0, 2.0, 0.0, -2.0])
    sigma = np.array([1.0, 2.0, 1.0, 2.0])
    assert ence(error, sigma, n_bins=2) == pytest.approx(0.5 * (abs(1 - math.sqrt(2)) / 1 + 0.0))
    with pytest.raises(ValueError):
        ence(error, sigma, n_bins=5)


def test_sharpness_exact():
    assert sharpness([3.0, 4.0]) == pytest.approx(math.sqrt(12.5))
    assert sharpness(np.full((4, 3), 0.2)) == pytest.approx(0.2)


def brute_force_auroc(scores_in, scores_out):
    wins = 0.0
    for out in scores_out:
        for inside in scores_in:
            wins += 1.0 if out > inside else 0.5 if out == inside else 0.0
    return wins / (len(scores_in) * len(scores_out))


def test_auroc_equals_pairwise_count():
    rng = np.random.default_rng(5)
    scores_in = np.round(rng.normal(0.0, 1.0, size=60), 1)  # rounding makes ties
    scores_out = np.round(rng.normal(0.8, 1.0, size=45), 1)
    assert auroc(scores_in, scores_out) == pytest.approx(brute_force_auroc(scores_in, scores_out), abs=1e-12)
    assert auroc([0.0, 1.0], [2.0, 3.0]) == 1.0
    assert auroc([2.0, 3.0], [0.0, 1.0]) == 0.0
    fpr, tpr = roc_curve(scores_in, scores_out)
    assert fpr[0] == 0.0 and tpr[-1] == 1.0 and fpr[-1] == 1.0
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    # the area under the returned curve is the AUROC
    assert np.trapezoid(tpr, fpr) == pytest.approx(auroc(scores_in, scores_out))
    with pytest.raises(ValueError):
        auroc([], [1.0])
