"""Training losses on a batch: MSE, the conventional NLL, and NLL_JEF.

NLL_JEF (docs/design.md), with per-structure energy variance σ_E² and per-atom force
covariance Σ_i from the model's heads:

    λ_E·mean_b[(E−Ê)²/σ_E²] + mean_b[log σ_E²] + λ_F·mean_i[ΔF_iᵀ Σ_i⁻¹ ΔF_i] + mean_i[log det Σ_i]

With λ_E = λ_F = 1 this is twice the mean Gaussian negative log-likelihood of energies
plus twice that of the force vectors, less the constants log 2π (energies) and
3·log 2π (forces). Whether Σ_i is the invariant Cholesky form or the equivariant one is
the model's choice (``model.covariance``); ``nll_jef_equivariant`` requires the latter.
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, List

import torch

from .. import keys

Batch = Dict[str, torch.Tensor]


def _energy_error(pred: Batch, batch: Batch) -> torch.Tensor:
    return pred[keys.ENERGY] - batch[keys.ENERGY]


def _force_error(pred: Batch, batch: Batch) -> torch.Tensor:
    return pred[keys.FORCES] - batch[keys.FORCES]


def squared_or_huber(error: torch.Tensor, delta: float) -> torch.Tensor:
    """error² up to |error| = δ, then 2δ|error| − δ² (the same value and slope at δ); δ = 0:
    error² everywhere."""
    if delta <= 0:
        return error.pow(2)
    # torch's Huber is half of that: ½e² inside, δ(|e| − ½δ) outside
    return 2.0 * torch.nn.functional.huber_loss(error, torch.zeros_like(error), reduction="none", delta=delta)


def mse_loss(pred: Batch, batch: Batch, energy_weight: float, force_weight: float,
             force_huber: float = 0.0) -> torch.Tensor:
    """λ_E·mean_b[((E−Ê)/N_b)²] + λ_F·mean_i[|ΔF_i|²/3] (energy per atom, so sizes mix). With
    ``force_huber`` δ > 0 a force component's term grows only linearly beyond δ: an atom the
    model is 20 eV/Å off (a fresh on-the-fly frame with a 0.5 Å contact) then pulls like a few
    ordinary atoms, not like ten thousand of them."""
    per_atom = _energy_error(pred, batch) / batch[keys.NUM_ATOMS].to(pred[keys.ENERGY].dtype)
    force_term = squared_or_huber(_force_error(pred, batch), force_huber).mean()
    return energy_weight * per_atom.pow(2).mean() + force_weight * force_term


def heteroscedastic_nll_loss(pred: Batch, batch: Batch, energy_weight: float, force_weight: float) -> torch.Tensor:
    """The conventional NLL: Gaussian energies with the predicted σ_E², forces by MSE."""
    variance = pred[keys.ENERGY_VARIANCE]
    energy_term = energy_weight * (_energy_error(pred, batch).pow(2) / variance).mean() + torch.log(variance).mean()
    return energy_term + force_weight * _force_error(pred, batch).pow(2).mean()


def force_mahalanobis_and_logdet(error: torch.Tensor, covariance: torch.Tensor):
    """ΔᵀΣ⁻¹Δ and log det Σ per atom, through the Cholesky factor of Σ."""
    factor = torch.linalg.cholesky(covariance)
    whitened = torch.linalg.solve_triangular(factor, error.unsqueeze(-1), upper=False).squeeze(-1)
    mahalanobis = whitened.pow(2).sum(dim=-1)
    logdet = 2.0 * torch.log(torch.diagonal(factor, dim1=-2, dim2=-1)).sum(dim=-1)
    return mahalanobis, logdet


def nll_jef_loss(pred: Batch, batch: Batch, energy_weight: float, force_weight: float) -> torch.Tensor:
    variance = pred[keys.ENERGY_VARIANCE]
    energy_term = energy_weight * (_energy_error(pred, batch).pow(2) / variance).mean() + torch.log(variance).mean()
    mahalanobis, logdet = force_mahalanobis_and_logdet(_force_error(pred, batch), pred[keys.FORCE_COVARIANCE])
    return energy_term + force_weight * mahalanobis.mean() + logdet.mean()


LOSSES: Dict[str, Callable[[Batch, Batch, float, float], torch.Tensor]] = {
    "mse": mse_loss,
    "nll": heteroscedastic_nll_loss,
    "nll_jef": nll_jef_loss,
    "nll_jef_equivariant": nll_jef_loss,
}


# the aleatoric heads each loss trains (the others are meaningless after training)
TRAINED_HEADS: Dict[str, List[str]] = {
    "mse": [],
    "nll": ["energy"],
    "nll_jef": ["energy", "forces"],
    "nll_jef_equivariant": ["energy", "forces"],
}


MEAN_LOSSES = ("nll", "mse", "frozen")


def _with_fixed_means(nll: Callable[[Batch, Batch, float, float], torch.Tensor]):
    """``nll`` on detached energies and forces: the heads phase of ``loss.means: frozen``, where
    only the variance heads learn (the means' MSE phase is over)."""

    def loss(pred: Batch, batch: Batch, energy_weight: float, force_weight: float) -> torch.Tensor:
        detached = dict(pred)
        detached[keys.ENERGY] = pred[keys.ENERGY].detach()
        detached[keys.FORCES] = pred[keys.FORCES].detach()
        return nll(detached, batch, energy_weight, force_weight)

    return loss


def _with_mse_means(nll: Callable[[Batch, Batch, float, float], torch.Tensor], force_huber: float):
    """MSE for the predicted energies and forces, plus ``nll`` evaluated on them detached: the
    means learn exactly as an MSE model's do, and the variance heads (and, through them, the
    shared layers) learn the distribution of the means' residuals. The joint NLL weights every
    residual by its predicted 1/σ², which lets the means neglect what they predict as noisy."""

    nll_of_fixed_means = _with_fixed_means(nll)

    def loss(pred: Batch, batch: Batch, energy_weight: float, force_weight: float) -> torch.Tensor:
        mse = mse_loss(pred, batch, energy_weight, force_weight, force_huber)
        return mse + nll_of_fixed_means(pred, batch, energy_weight, force_weight)

    return loss


def loss_function(name: str, means: str = "nll",
                  force_huber: float = 0.0) -> Callable[[Batch, Batch, float, float], torch.Tensor]:
    """The loss ``name``; with ``means="mse"`` (``loss.means``) an NLL loss trains the means by
    MSE and only the variance heads by the NLL (``_with_mse_means``); with ``"frozen"`` it is
    the NLL of detached means (the heads phase; the phase before it uses "mse").
    ``force_huber`` (``loss.force_huber``, eV/Å) bends the force term of ``mse_loss``."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; expected one of {sorted(LOSSES)}")
    if means not in MEAN_LOSSES:
        raise ValueError(f"unknown loss.means {means!r}; expected one of {list(MEAN_LOSSES)}")
    if name == "mse":
        return functools.partial(mse_loss, force_huber=force_huber)
    if means == "mse":
        return _with_mse_means(LOSSES[name], force_huber)
    if means == "frozen":
        return _with_fixed_means(LOSSES[name])
    return LOSSES[name]
