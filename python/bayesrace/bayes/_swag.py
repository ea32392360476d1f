"""SWAG moments (Maddox et al. 2019): the Gaussian over weights that posterior kind swag
samples its members from; ``train`` collects the snapshots during its SWAG phase."""

from __future__ import annotations

import math
from typing import Dict

import torch


class SwagCollector:
    """SWAG moments (Maddox et al. 2019) of weight snapshots θ_1..θ_n, flat vectors over
    ``model.parameters()`` (``parameters_to_vector``):

        θ̄_n = (1/n) Σ_t θ_t,   s_n = (1/n) Σ_t θ_t²,   diag = max(s_n − θ̄_n², 0),
        D = [θ_t − θ̄_t] for the last K snapshots (θ̄_t: the mean including θ_t), K = ``rank``.

    The approximate posterior is N(θ̄, diag/2 + D Dᵀ/(2(K−1))); a sample is
    θ = θ̄ + sqrt(diag/2) ⊙ z₁ + D z₂ / sqrt(2(K−1)), z₁ ~ N(0, I_P), z₂ ~ N(0, I_K).
    With fewer than two deviation columns only the diagonal part is used.
    """

    def __init__(self, n_parameters: int, rank: int, dtype: torch.dtype = torch.float64):
        if rank < 1:
            raise ValueError(f"SWAG rank must be >= 1, got {rank}")
        self.rank = int(rank)
        self.count = 0
        self.mean = torch.zeros(n_parameters, dtype=dtype)
        self.sq_mean = torch.zeros(n_parameters, dtype=dtype)
        self.deviations = torch.zeros((0, n_parameters), dtype=dtype)  # [K, P], oldest first

    @torch.no_grad()
    def collect(self, weights: torch.Tensor) -> None:
        weights = weights.detach().to(self.mean.dtype).reshape(-1)
        if weights.shape != self.mean.shape:
            raise ValueError(f"SWAG snapshot has {weights.numel()} entries, expected {self.mean.numel()}")
        self.count += 1
        self.mean += (weights - self.mean) / self.count
        self.sq_mean += (weights * weights - self.sq_mean) / self.count
        deviation = (weights - self.mean).unsqueeze(0)
        self.deviations = torch.cat([self.deviations, deviation])[-self.rank:]

    @property
    def diagonal_variance(self) -> torch.Tensor:
        return torch.clamp(self.sq_mean - self.mean.pow(2), min=0.0)

    def covariance(self) -> torch.Tensor:
        """The dense P×P covariance diag/2 + DᵀD/(2(K−1)) (for tests on small P)."""
        covariance = torch.diag(self.diagonal_variance / 2.0)
        k = self.deviations.shape[0]
        if k >= 2:
            covariance = covariance + self.deviations.T @ self.deviations / (2.0 * (k - 1))
        return covariance

    @torch.no_grad()
    def sample(self, generator: torch.Generator) -> torch.Tensor:
        if self.count == 0:
            raise RuntimeError("SWAG has collected no snapshots to sample around")
        z_diagonal = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype)
        sample = self.mean + torch.sqrt(self.diagonal_variance / 2.0) * z_diagonal
        k = self.deviations.shape[0]
        if k >= 2:
            z_low_rank = torch.randn(k, generator=generator, dtype=self.mean.dtype)
            sample = sample + (self.deviations.T @ z_low_rank) / math.sqrt(2.0 * (k - 1))
        return sample

    def state_dict(self) -> Dict:
        return dict(rank=self.rank, count=self.count, mean=self.mean.clone(), sq_mean=self.sq_mean.clone(),
                    deviations=self.deviations.clone())

    @classmethod
    def from_state_dict(cls, state: Dict) -> "SwagCollector":
        collector = cls(state["mean"].numel(), state["rank"], state["mean"].dtype)
        collector.count = int(state["count"])
        collector.mean = state["mean"].clone()
        collector.sq_mean = state["sq_mean"].clone()
        collector.deviations = state["deviations"].clone()
        return collector
