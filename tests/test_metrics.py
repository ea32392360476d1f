import math

import numpy as np
import pytest

from bayesrace._metrics import coverage, error_summary, gaussian_nll, mae, rmse, spearman


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
