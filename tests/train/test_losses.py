"""Losses against independent log-densities from torch.distributions."""

from __future__ import annotations

import math


import torch

from bayesrace import keys
from bayesrace.train import loss_function


def random_prediction(n_structures=5, n_atoms=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n_atoms, 3, 3, generator=g, dtype=torch.float64)
    covariance = a @ a.transpose(1, 2) + 0.1 * torch.eye(3, dtype=torch.float64)
    pred = {
        keys.ENERGY: torch.randn(n_structures, generator=g, dtype=torch.float64),
        keys.ENERGY_VARIANCE: torch.rand(n_structures, generator=g, dtype=torch.float64) + 0.1,
        keys.FORCES: torch.randn(n_atoms, 3, generator=g, dtype=torch.float64),
        keys.FORCE_COVARIANCE: covariance,
    }
    batch = {
        keys.ENERGY: torch.randn(n_structures, generator=g, dtype=torch.float64),
        keys.FORCES: torch.randn(n_atoms, 3, generator=g, dtype=torch.float64),
        keys.NUM_ATOMS: torch.tensor([3, 4, 2, 5, 3]),
    }
    return pred, batch


def test_nll_jef_equals_gaussian_log_densities():
    pred, batch = random_prediction()
    energy_nll = -torch.distributions.Normal(pred[keys.ENERGY], pred[keys.ENERGY_VARIANCE].sqrt()).log_prob(
        batch[keys.ENERGY]
    )
    force_nll = -torch.distributions.MultivariateNormal(pred[keys.FORCES], pred[keys.FORCE_COVARIANCE]).log_prob(
        batch[keys.FORCES]
    )
    # NLL_JEF (λ=1) = 2·mean NLL_E − log 2π + 2·mean NLL_F − 3·log 2π (documented constants)
    expected = 2 * energy_nll.mean() - math.log(2 * math.pi) + 2 * force_nll.mean() - 3 * math.log(2 * math.pi)
    assert torch.allclose(loss_function("nll_jef")(pred, batch, 1.0, 1.0), expected, rtol=1e-12)


def test_loss_weights_act_on_the_quadratic_terms():
    pred, batch = random_prediction(seed=1)
    nll = loss_function("nll_jef")
    base = nll(pred, batch, 1.0, 1.0)
    energy_quadratic = ((pred[keys.ENERGY] - batch[keys.ENERGY]) ** 2 / pred[keys.ENERGY_VARIANCE]).mean()
    assert torch.allclose(nll(pred, batch, 3.0, 1.0) - base, 2 * energy_quadratic, rtol=1e-12)


def test_conventional_nll_and_mse():
    pred, batch = random_prediction(seed=2)
    energy_nll = -torch.distributions.Normal(pred[keys.ENERGY], pred[keys.ENERGY_VARIANCE].sqrt()).log_prob(
        batch[keys.ENERGY]
    )
    force_mse = ((pred[keys.FORCES] - batch[keys.FORCES]) ** 2).mean()
    expected = 2 * energy_nll.mean() - math.log(2 * math.pi) + 0.5 * force_mse
    assert torch.allclose(loss_function("nll")(pred, batch, 1.0, 0.5), expected, rtol=1e-12)
    per_atom = (pred[keys.ENERGY] - batch[keys.ENERGY]) / batch[keys.NUM_ATOMS]
    assert torch.allclose(loss_function("mse")(pred, batch, 2.0, 1.0), 2 * (per_atom**2).mean() + force_mse)


def test_force_huber_is_squared_below_delta_and_linear_beyond():
    from bayesrace.train._losses import squared_or_huber

    error = torch.tensor([0.0, 0.5, -1.0, 3.0, -20.0], dtype=torch.float64)
    # known answers for δ = 1: r² inside, 2|r| − 1 outside; δ = 0 is r² everywhere
    assert torch.equal(squared_or_huber(error, 1.0), torch.tensor([0.0, 0.25, 1.0, 5.0, 39.0], dtype=torch.float64))
    assert torch.equal(squared_or_huber(error, 0.0), error.pow(2))
    pred, batch = random_prediction(seed=4)
    per_atom = (pred[keys.ENERGY] - batch[keys.ENERGY]) / batch[keys.NUM_ATOMS]
    force_error = pred[keys.FORCES] - batch[keys.FORCES]
    delta = float(force_error.abs().median())  # half the components in each regime
    expected = (per_atom**2).mean() + squared_or_huber(force_error, delta).mean()
    assert torch.allclose(loss_function("mse", force_huber=delta)(pred, batch, 1.0, 1.0), expected, rtol=1e-12)
    assert loss_function("mse", force_huber=delta)(pred, batch, 1.0, 1.0) < loss_function("mse")(pred, batch, 1.0, 1.0)
    # the MSE part of means "mse" is bent; the heads phase's NLL (means "frozen") is not
    bent = loss_function("nll_jef", "mse", delta)(pred, batch, 1.0, 1.0) - loss_function("nll_jef", "mse")(pred, batch, 1.0, 1.0)
    assert torch.allclose(bent, (squared_or_huber(force_error, delta) - force_error.pow(2)).mean(), rtol=1e-10)
    assert torch.equal(loss_function("nll_jef", "frozen", delta)(pred, batch, 1.0, 1.0),
                       loss_function("nll_jef", "frozen")(pred, batch, 1.0, 1.0))


def test_unknown_loss_lists_choices():
    import pytest

    with pytest.raises(ValueError, match="nll_jef"):
        loss_function("nll-jef")



def test_mse_means_train_the_means_by_mse_and_the_heads_by_the_nll():
    import pytest

    pred, batch = random_prediction(seed=3)
    leaves = {name: value.clone().requires_grad_(True) for name, value in pred.items()}
    combined = loss_function("nll_jef", means="mse")(leaves, batch, 1.0, 2.0)
    nll = loss_function("nll_jef")(pred, batch, 1.0, 2.0)
    mse = loss_function("mse")(pred, batch, 1.0, 2.0)
    # its value is the sum of both; its gradient on the means is MSE's, on the variances the NLL's
    assert torch.allclose(combined, mse + nll, rtol=1e-12)
    combined.backward()
    expected = {name: value.clone().requires_grad_(True) for name, value in pred.items()}
    loss_function("mse")(expected, batch, 1.0, 2.0).backward()
    for name in (keys.ENERGY, keys.FORCES):
        assert torch.allclose(leaves[name].grad, expected[name].grad, rtol=1e-12), name
    variances = {name: value.clone().requires_grad_(True) for name, value in pred.items()}
    loss_function("nll_jef")(variances, batch, 1.0, 2.0).backward()
    for name in (keys.ENERGY_VARIANCE, keys.FORCE_COVARIANCE):
        assert torch.allclose(leaves[name].grad, variances[name].grad, rtol=1e-12), name
    # the MSE kind is unchanged by the option, and unknown values name the choices
    assert torch.allclose(loss_function("mse", means="mse")(pred, batch, 1.0, 2.0), mse)
    with pytest.raises(ValueError, match="loss.means"):
        loss_function("nll_jef", means="joint")
