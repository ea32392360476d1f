"""Last-layer Laplace approximation of a trained RACE member, for energies and forces.

The last-layer weights w and the Jacobians J_E = ∂E/∂w, J_F = ∂F/∂w (exact: E and F are
linear in w) come from ``_last_layer``; every other weight (the aleatoric heads included)
stays at its trained value.

With the model's own aleatoric noise (per-structure σ²_E,b, per-atom force covariance Σ_i)
the generalised Gauss-Newton matrix is

    H = Σ_b J_E,bᵀ J_E,b / σ²_E,b + Σ_i J_F,iᵀ Σ_i⁻¹ J_F,i        [eV⁻² · eV² = 1/w²]

An untrained head (``model.trained_heads`` lacks it) is replaced by a homoscedastic noise
fitted to the residuals, in the form the MSE loss implies: energies ΔE_b/N_b ~ N(0, s_E²),
i.e. σ²_E,b = N_b² s_E² with s_E² = mean_b (ΔE_b/N_b)², and force components ~ N(0, s_F²)
with s_F² = mean of the squared force-component residuals.

With the prior N(0, α⁻¹ I) on w the Laplace log marginal likelihood is

    log Z(α) = log p(D|w*) − ½ α ‖w*‖² + (P/2) log α − ½ log det(H + α I)

(the 2π's of prior and Laplace normaliser cancel). It is maximised where
α ‖w*‖² = γ(α) = Σ_k λ_k / (λ_k + α) (λ_k the eigenvalues of H), MacKay's fixed point;
γ(α) − α‖w*‖² decreases strictly in α, so the root is unique and found by bracketing.
The posterior is N(w*, Σ_w) with Σ_w = (H + α I)⁻¹, and the epistemic predictive
covariances J Σ_w Jᵀ are exact because E and F are linear in w.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .. import keys
from ..data import Graph, iterate_batches
from ..model import RACE
from ._last_layer import (
    get_last_layer_weights,
    last_layer_jacobians,
    last_layer_mask,
    model_dtype,
    set_last_layer_weights,
)

_MIN_NOISE_VARIANCE = 1e-12  # eV², keeps a perfectly fitted set from dividing by zero


# --------------------------------------------------------------------------------------
# the fitted posterior


@dataclasses.dataclass
class LastLayerLaplace:
    """N(w*, (H + α I)⁻¹) over the last-layer weights of one RACE member (float64 tensors)."""

    mean: torch.Tensor  # [P] w*
    hessian: torch.Tensor  # [P, P] GGN H of the data term
    prior_precision: float  # α
    log_marginal_likelihood: float  # log Z(α), nats
    log_likelihood: float  # log p(D|w*), nats (energies and force components)
    n_structures: int
    n_atoms: int
    energy_noise: str  # "heads" or "homoscedastic"
    force_noise: str
    energy_noise_variance_per_atom: Optional[float] = None  # s_E², (eV/atom)², homoscedastic only
    force_noise_variance: Optional[float] = None  # s_F², (eV/Å)², homoscedastic only

    def __post_init__(self):
        self.mean = torch.as_tensor(self.mean, dtype=torch.float64).reshape(-1)
        self.hessian = torch.as_tensor(self.hessian, dtype=torch.float64)
        if self.hessian.shape != (self.n_parameters, self.n_parameters):
            raise ValueError(f"laplace: hessian shape {tuple(self.hessian.shape)} for {self.n_parameters} weights")
        if not self.prior_precision > 0:
            raise ValueError(f"laplace: prior_precision must be positive, got {self.prior_precision}")

    @property
    def n_parameters(self) -> int:
        return int(self.mean.numel())

    @property
    def precision(self) -> torch.Tensor:
        """H + α I [P, P]."""
        return self.hessian + self.prior_precision * torch.eye(self.n_parameters, dtype=torch.float64)

    @property
    def covariance(self) -> torch.Tensor:
        """Σ_w = (H + α I)⁻¹ [P, P], through the eigenbasis of H (symmetric by construction)."""
        eigenvalues, eigenvectors = _eigh_psd(self.hessian)
        return (eigenvectors / (eigenvalues + self.prior_precision)) @ eigenvectors.T

    def covariance_factor(self) -> torch.Tensor:
        """L [P, P] with L Lᵀ = Σ_w, so w* + L z with z ~ N(0, I) samples the posterior."""
        eigenvalues, eigenvectors = _eigh_psd(self.hessian)
        return eigenvectors / torch.sqrt(eigenvalues + self.prior_precision)

    def summary(self) -> Dict[str, object]:
        """Plain Python data (JSON-serialisable); ``from_summary`` rebuilds the object."""
        eigenvalues, _ = _eigh_psd(self.hessian)
        return {
            "n_parameters": self.n_parameters,
            "n_structures": int(self.n_structures),
            "n_atoms": int(self.n_atoms),
            "prior_precision": float(self.prior_precision),
            "log_marginal_likelihood": float(self.log_marginal_likelihood),
            "log_likelihood": float(self.log_likelihood),
            "effective_parameters": float(
                (eigenvalues / (eigenvalues + self.prior_precision)).sum()
            ),  # γ
            "energy_noise": self.energy_noise,
            "force_noise": self.force_noise,
            "energy_noise_variance_per_atom": self.energy_noise_variance_per_atom,
            "force_noise_variance": self.force_noise_variance,
            "mean": self.mean.tolist(),
            "hessian": self.hessian.tolist(),
        }

    @classmethod
    def from_summary(cls, summary: Dict[str, object]) -> "LastLayerLaplace":
        return cls(
            mean=torch.tensor(summary["mean"], dtype=torch.float64),
            hessian=torch.tensor(summary["hessian"], dtype=torch.float64),
            prior_precision=float(summary["prior_precision"]),
            log_marginal_likelihood=float(summary["log_marginal_likelihood"]),
            log_likelihood=float(summary["log_likelihood"]),
            n_structures=int(summary["n_structures"]),
            n_atoms=int(summary["n_atoms"]),
            energy_noise=str(summary["energy_noise"]),
            force_noise=str(summary["force_noise"]),
            energy_noise_variance_per_atom=summary.get("energy_noise_variance_per_atom"),
            force_noise_variance=summary.get("force_noise_variance"),
        )


def _eigh_psd(matrix: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of a symmetric PSD matrix; round-off negatives clipped to 0."""
    eigenvalues, eigenvectors = torch.linalg.eigh(0.5 * (matrix + matrix.T))
    return eigenvalues.clamp(min=0.0), eigenvectors


def laplace_log_marginal_likelihood(
    log_likelihood: float, eigenvalues: torch.Tensor, mean_norm_squared: float, prior_precision: float
) -> float:
    """log p(D|w*) − ½α‖w*‖² + (P/2) log α − ½ Σ_k log(λ_k + α)."""
    alpha = float(prior_precision)
    eigenvalues = eigenvalues.to(torch.float64)
    return float(
        log_likelihood
        - 0.5 * alpha * mean_norm_squared
        + 0.5 * eigenvalues.numel() * math.log(alpha)
        - 0.5 * torch.log(eigenvalues + alpha).sum()
    )


def optimal_prior_precision(eigenvalues: torch.Tensor, mean_norm_squared: float) -> float:
    """The α maximising the Laplace evidence: the root of γ(α) − α‖w*‖² (strictly decreasing)."""
    from scipy.optimize import brentq

    lam = eigenvalues.to(torch.float64).clamp(min=0.0).numpy()
    if mean_norm_squared <= 0:
        raise ValueError("laplace: the last-layer weights are all zero; the evidence has no finite optimum in α")
    if not (lam > 0).any():
        raise ValueError("laplace: the data carry no information on the last-layer weights (H = 0)")

    def slope(log_alpha: float) -> float:  # d log Z / d log α, times 2
        alpha = math.exp(log_alpha)
        return float((lam / (lam + alpha)).sum() - alpha * mean_norm_squared)

    # γ ≤ P bounds the root above by P/‖w‖²; below, expand until the slope is positive
    high = math.log(lam.size / mean_norm_squared) + 1.0
    low = high - 10.0
    while slope(low) <= 0.0:
        low -= 10.0
        if low < -800.0:
            raise ValueError("laplace: could not bracket the optimal prior precision")
    return float(math.exp(brentq(slope, low, high, xtol=1e-12, rtol=1e-12)))


def fit_last_layer_laplace(
    model: RACE,
    graphs: Sequence[Graph],
    batch_size: int = 8,
    prior_precision: Optional[float] = None,
    progress: bool = False,
) -> LastLayerLaplace:
    """Fits the last-layer Laplace posterior of ``model`` on labelled ``graphs``.

    ``prior_precision`` None: α maximises the Laplace marginal likelihood; otherwise it
    is used as given. The model is evaluated in eval mode and left as it was.
    """
    if not graphs:
        raise ValueError("fit_last_layer_laplace: no training structures given")
    missing = [g.source or f"structure {k}" for k, g in enumerate(graphs) if g.energy is None or g.forces is None]
    if missing:
        raise ValueError(f"fit_last_layer_laplace: {missing[0]} has no energy or forces label (needs both)")
    if prior_precision is not None and not prior_precision > 0:
        raise ValueError(f"fit_last_layer_laplace: prior_precision must be positive, got {prior_precision}")
    was_training = model.training
    model.eval()
    try:
        return _fit(model, graphs, batch_size, prior_precision, progress)
    finally:
        model.train(was_training)


def _fit(model, graphs, batch_size, prior_precision, progress) -> LastLayerLaplace:
    dtype = model_dtype(model)
    mean = get_last_layer_weights(model).to(torch.float64)
    n_parameters = mean.numel()
    heads = set(model.trained_heads)
    zeros = lambda: torch.zeros(n_parameters, n_parameters, dtype=torch.float64)  # noqa: E731
    # both weightings are accumulated, so one pass serves heads and homoscedastic noise
    hessian_energy_heads, hessian_energy_unit = zeros(), zeros()  # Σ JᵀJ/σ²_E,b and Σ JᵀJ/N_b²
    hessian_force_heads, hessian_force_unit = zeros(), zeros()  # Σ JᵀΣ⁻¹J and Σ JᵀJ
    energy_loglik_heads, force_loglik_heads = 0.0, 0.0
    per_atom_energy_sq, log_atoms_sq, force_sq = 0.0, 0.0, 0.0
    n_structures, n_atoms = 0, 0

    from tqdm.auto import tqdm

    batches = iterate_batches(list(graphs), batch_size, shuffle=False, dtype=dtype)
    total = math.ceil(len(graphs) / batch_size)
    for batch in tqdm(batches, total=total, desc="laplace", unit="batch", disable=not progress):
        energy_jacobian, force_jacobian = (j.to(torch.float64) for j in last_layer_jacobians(model, batch))
        pred = model(batch)
        num_atoms = batch[keys.NUM_ATOMS].to(torch.float64)
        energy_error = (pred[keys.ENERGY].detach() - batch[keys.ENERGY]).to(torch.float64)
        force_error = (pred[keys.FORCES].detach() - batch[keys.FORCES]).to(torch.float64)

        per_atom_energy_jacobian = energy_jacobian / num_atoms[:, None]
        hessian_energy_unit += per_atom_energy_jacobian.T @ per_atom_energy_jacobian
        per_atom_energy_sq += float((energy_error / num_atoms).pow(2).sum())
        log_atoms_sq += float(torch.log(num_atoms.pow(2)).sum())
        flat_force_jacobian = force_jacobian.reshape(-1, n_parameters)
        hessian_force_unit += flat_force_jacobian.T @ flat_force_jacobian
        force_sq += float(force_error.pow(2).sum())

        if "energy" in heads:
            variance = pred[keys.ENERGY_VARIANCE].detach().to(torch.float64)
            hessian_energy_heads += (energy_jacobian / variance[:, None]).T @ energy_jacobian
            energy_loglik_heads += float(
                -0.5 * (energy_error.pow(2) / variance + torch.log(2.0 * math.pi * variance)).sum()
            )
        if "forces" in heads:
            covariance = pred[keys.FORCE_COVARIANCE].detach().to(torch.float64)
            factor = torch.linalg.cholesky(covariance)  # Σ_i = L Lᵀ: whiten J and ΔF by L⁻¹
            whitened_jacobian = torch.linalg.solve_triangular(factor, force_jacobian, upper=False)
            whitened_error = torch.linalg.solve_triangular(factor, force_error.unsqueeze(-1), upper=False)
            flat = whitened_jacobian.reshape(-1, n_parameters)
            hessian_force_heads += flat.T @ flat
            logdet = 2.0 * torch.log(torch.diagonal(factor, dim1=-2, dim2=-1)).sum()
            force_loglik_heads += float(
                -0.5 * (whitened_error.pow(2).sum() + logdet + 3 * force_error.shape[0] * math.log(2.0 * math.pi))
            )
        n_structures += int(num_atoms.numel())
        n_atoms += int(force_error.shape[0])

    energy_noise_variance, force_noise_variance = None, None
    if "energy" in heads:
        hessian_energy, energy_loglik, energy_noise = hessian_energy_heads, energy_loglik_heads, "heads"
    else:
        energy_noise_variance = max(per_atom_energy_sq / n_structures, _MIN_NOISE_VARIANCE)
        hessian_energy = hessian_energy_unit / energy_noise_variance
        # Σ_b −½[(ΔE_b/N_b)²/s² + log(2π N_b² s²)]
        energy_loglik = -0.5 * (
            per_atom_energy_sq / energy_noise_variance
            + log_atoms_sq
            + n_structures * math.log(2.0 * math.pi * energy_noise_variance)
        )
        energy_noise = "homoscedastic"
    if "forces" in heads:
        hessian_force, force_loglik, force_noise = hessian_force_heads, force_loglik_heads, "heads"
    else:
        n_components = 3 * n_atoms
        force_noise_variance = max(force_sq / n_components, _MIN_NOISE_VARIANCE)
        hessian_force = hessian_force_unit / force_noise_variance
        force_loglik = -0.5 * (
            force_sq / force_noise_variance + n_components * math.log(2.0 * math.pi * force_noise_variance)
        )
        force_noise = "homoscedastic"

    hessian = hessian_energy + hessian_force
    hessian = 0.5 * (hessian + hessian.T)
    log_likelihood = energy_loglik + force_loglik
    eigenvalues, _ = _eigh_psd(hessian)
    mean_norm_squared = float(mean.pow(2).sum())
    if prior_precision is None:
        alpha = optimal_prior_precision(eigenvalues, mean_norm_squared)
    else:
        alpha = float(prior_precision)
    return LastLayerLaplace(
        mean=mean,
        hessian=hessian,
        prior_precision=alpha,
        log_marginal_likelihood=laplace_log_marginal_likelihood(log_likelihood, eigenvalues, mean_norm_squared, alpha),
        log_likelihood=log_likelihood,
        n_structures=n_structures,
        n_atoms=n_atoms,
        energy_noise=energy_noise,
        force_noise=force_noise,
        energy_noise_variance_per_atom=energy_noise_variance,
        force_noise_variance=force_noise_variance,
    )


# --------------------------------------------------------------------------------------
# predictions


def _check_sizes(model: RACE, laplace: LastLayerLaplace) -> None:
    n_model = sum(int(m.sum()) for m in last_layer_mask(model))
    if n_model != laplace.n_parameters:
        raise ValueError(
            f"laplace posterior has {laplace.n_parameters} last-layer weights, the model {n_model}: not fitted to it"
        )


def predictive_covariance(
    model: RACE, laplace: LastLayerLaplace, batch: Dict[str, torch.Tensor]
) -> Dict[str, torch.Tensor]:
    """Epistemic part J Σ_w Jᵀ: ENERGY_VAR_EPISTEMIC [B] (eV²), FORCE_COV_EPISTEMIC [N, 3, 3] (eV²/Å²)
    and ATOMIC_FORCE_STD_EPISTEMIC [N] = sqrt(tr/3) (eV/Å), in the model's dtype."""
    _check_sizes(model, laplace)
    dtype = model_dtype(model)
    energy_jacobian, force_jacobian = (j.to(torch.float64) for j in last_layer_jacobians(model, batch))
    covariance = laplace.covariance
    energy_var = torch.einsum("bp,pq,bq->b", energy_jacobian, covariance, energy_jacobian)
    force_cov = torch.einsum("nap,pq,nbq->nab", force_jacobian, covariance, force_jacobian)
    trace = torch.diagonal(force_cov, dim1=-2, dim2=-1).sum(dim=-1)
    return {
        keys.ENERGY_VAR_EPISTEMIC: energy_var.clamp(min=0.0).to(dtype),
        keys.FORCE_COV_EPISTEMIC: force_cov.to(dtype),
        keys.ATOMIC_FORCE_STD_EPISTEMIC: torch.sqrt(trace.clamp(min=0.0) / 3.0).to(dtype),
    }


def sample_last_layer_weights(laplace: LastLayerLaplace, n_samples: int, seed: int = 0) -> torch.Tensor:
    """[n_samples, P] float64 draws from N(w*, Σ_w) in antithetic pairs w* + L z_k, w* − L z_k
    (z_k ~ N(0, I), L Lᵀ = Σ_w): their mean is w* exactly."""
    if n_samples < 2 or n_samples % 2 != 0:
        raise ValueError(f"laplace: n_samples must be a positive even number (antithetic pairs), got {n_samples}")
    generator = torch.Generator().manual_seed(int(seed))
    standard = torch.randn(n_samples // 2, laplace.n_parameters, generator=generator, dtype=torch.float64)
    deviations = standard @ laplace.covariance_factor().T
    pairs = torch.stack([laplace.mean + deviations, laplace.mean - deviations], dim=1)  # [n/2, 2, P]
    return pairs.reshape(n_samples, laplace.n_parameters)


def sample_members(model: RACE, laplace: LastLayerLaplace, n_samples: int, seed: int = 0) -> List[RACE]:
    """n_samples copies of ``model`` with last-layer weights from ``sample_last_layer_weights``.

    The pairs are antithetic, so the members' mean weights are w* exactly and (E and F
    being linear in w) their mean energies and forces are the MAP's. The aleatoric heads
    and all other weights are the model's.
    """
    if n_samples < 2 or n_samples % 2 != 0:
        raise ValueError(f"laplace: n_samples must be a positive even number (antithetic pairs), got {n_samples}")
    _check_sizes(model, laplace)
    members = []
    for w in sample_last_layer_weights(laplace, n_samples, seed):
        member = copy.deepcopy(model)
        set_last_layer_weights(member, w)
        member.eval()
        members.append(member)
    return members

