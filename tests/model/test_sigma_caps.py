"""σ caps (issue 13, physical limits): the aleatoric σ's stay finite far outside the data,
change nothing below the cap, bend smoothly above it, and keep the covariance equivariant."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bayesrace import keys
from bayesrace.model import model_config_from_record
from bayesrace.model._radial import capped_log_variance
from conftest import batch_of, random_molecule, tiny_model


def test_cap_is_the_identity_below_and_bends_smoothly_toward_e_times_the_cap():
    cap = 2.0
    log_var = torch.linspace(-20.0, 2.0 * math.log(cap), 200, dtype=torch.float64)
    assert torch.equal(capped_log_variance(log_var, cap), log_var)  # bit for bit below the cap
    huge = torch.tensor([2 * math.log(cap) + 1.0, 60.0, 1e4], dtype=torch.float64)
    sigma = torch.exp(0.5 * capped_log_variance(huge, cap))
    limit = math.e * cap
    assert cap < float(sigma[0]) < limit and torch.all(sigma <= limit * (1 + 1e-14))
    assert float(sigma[-1]) == pytest.approx(limit, rel=1e-14)  # the limit
    # C²: first and second derivatives continuous at the start of the bend
    start = 2.0 * math.log(cap)
    x = torch.tensor([start - 1e-4, start, start + 1e-4], dtype=torch.float64, requires_grad=True)
    (first,) = torch.autograd.grad(capped_log_variance(x, cap).sum(), x, create_graph=True)
    (second,) = torch.autograd.grad(first.sum(), x)
    np.testing.assert_allclose(first.detach().numpy(), 1.0, atol=1e-8)
    np.testing.assert_allclose(second.numpy(), 0.0, atol=1e-3)
    assert torch.equal(capped_log_variance(huge, 0.0), huge)  # 0: off


def test_caps_change_nothing_in_distribution_and_bound_sigma_at_short_contacts():
    capped, plain = tiny_model(seed=1), tiny_model(seed=1, force_sigma_cap=0.0, energy_sigma_cap=0.0)
    atoms = random_molecule(8, seed=2)
    a, b = (m(batch_of([atoms], ["H", "C", "N"], m.cutoff)) for m in (capped, plain))
    for name in (keys.FORCE_COVARIANCE, keys.ENERGY_VARIANCE, keys.FORCES, keys.ENERGY):
        assert torch.equal(a[name], b[name]), name
    # heads as large as a 0.4 Å contact made them (σ ~ 1e27): readouts of 30 before the exp
    species = torch.tensor([0, 1, 2])
    readouts = torch.full((capped.n_layers, 3, 8), 30.0, dtype=torch.float64)
    (_, log_var_a, cov_a), (_, log_var_b, cov_b) = (m.combine_readouts(readouts, species) for m in (capped, plain))
    force_sigma = lambda cov: torch.sqrt(torch.diagonal(cov, dim1=-2, dim2=-1).sum(-1) / 3)  # noqa: E731
    assert float(force_sigma(cov_b).max()) > 1e12  # what it was without caps
    assert float(force_sigma(cov_a).max()) <= math.e * capped.force_sigma_cap * (1 + 1e-12)
    assert float(force_sigma(cov_a).min()) > capped.force_sigma_cap  # still says "unknown"
    assert float(torch.exp(0.5 * log_var_b).max()) > 1e5
    assert capped.energy_sigma_cap < float(torch.exp(0.5 * log_var_a).max()) <= math.e * capped.energy_sigma_cap * 1.001
    assert torch.all(torch.linalg.eigvalsh(cov_a) > 0)  # still positive definite


@pytest.mark.parametrize("covariance", ["equivariant", "cholesky"])
def test_capped_covariance_keeps_its_symmetry(covariance):
    """A cap far below every σ puts every atom on the bent branch: Σ(Rx) = R Σ(x) Rᵀ still for
    the equivariant head, Σ(Rx) = Σ(x) for the invariant (Cholesky) one."""
    model = tiny_model(seed=3, covariance=covariance, force_sigma_cap=1e-3, energy_sigma_cap=1e-3)
    atoms = random_molecule(7, seed=4)
    rotation = torch.tensor(np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0], dtype=torch.float64)
    out = model(batch_of([atoms], ["H", "C", "N"], model.cutoff))
    turned = atoms.copy()
    turned.positions = atoms.positions @ rotation.numpy().T
    out_turned = model(batch_of([turned], ["H", "C", "N"], model.cutoff))
    want = rotation @ out[keys.FORCE_COVARIANCE] @ rotation.T if covariance == "equivariant" else out[keys.FORCE_COVARIANCE]
    np.testing.assert_allclose(out_turned[keys.FORCE_COVARIANCE].detach().numpy(), want.detach().numpy(),
                               rtol=1e-10, atol=1e-14)
    sigma = torch.sqrt(torch.diagonal(out[keys.FORCE_COVARIANCE], dim1=-2, dim2=-1).sum(-1) / 3)
    assert float(sigma.max()) <= math.e * 1e-3


def test_models_saved_before_the_caps_load_without_them():
    config = model_config_from_record({"n_layers": 2, "channels": 8, "l_max": 1, "avg_num_neighbors": 3.0})
    assert config.force_sigma_cap == 0.0 and config.energy_sigma_cap == 0.0
