"""Radial pieces of RACE: the Bessel basis with its smooth envelope, and the gate that makes
an atom without neighbours fall back to its reference energy."""

from __future__ import annotations

import contextlib
import math

import torch

# κ of the isolation gate (below): with the default basis a bonded atom (a few neighbours at
# 1-2 Å, cutoff 5 Å) has Σ_j b₁(r_ij) ≈ 1-3, so g ≈ 0.98-1; two atoms 4 Å apart give g ≈ 0.005
ISOLATION_GATE_STRENGTH = 2.0


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class BesselBasis(torch.nn.Module):
    """sqrt(2/rc) sin(nπr/rc)/r times the polynomial envelope: zero with its first p
    derivatives at the cutoff, so energies and forces are smooth as atoms cross it."""

    def __init__(self, cutoff: float, n_radial: int, p: int):
        super().__init__()
        self.cutoff = float(cutoff)
        self.p = float(p)
        self.register_buffer("frequencies", math.pi * torch.arange(1, n_radial + 1) / cutoff)
        self.prefactor = math.sqrt(2.0 / cutoff)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        p = self.p
        d = r / self.cutoff
        envelope = (
            1.0
            - (p + 1.0) * (p + 2.0) / 2.0 * torch.pow(d, p)
            + p * (p + 2.0) * torch.pow(d, p + 1.0)
            - p * (p + 1.0) / 2.0 * torch.pow(d, p + 2.0)
        )
        envelope = envelope * (d < 1.0).to(r.dtype)
        bessel = self.prefactor * torch.sin(self.frequencies * r.unsqueeze(-1)) / r.unsqueeze(-1)
        return bessel * envelope.unsqueeze(-1)


def isolation_gate(radial: torch.Tensor, centre: torch.Tensor, n_centres: int,
                   strength: float = ISOLATION_GATE_STRENGTH) -> torch.Tensor:
    """g_i = 1 − exp(−κ Σ_j b₁(r_ij)) for the first ``n_centres`` atoms, b₁ the first radial basis
    function (sin(πr/r_c)/r times the envelope: positive inside the cutoff, zero with its
    derivatives at it). g is 0 exactly for an atom with no neighbour and rises smoothly to 1 as
    neighbours come in; the learned part of an atomic energy is multiplied by it, so an isolated
    atom has exactly its reference energy. ``radial`` is [..., E, n_radial]; g is [..., n_centres]."""
    first = radial[..., 0]
    shape = list(first.shape[:-1]) + [n_centres]
    summed = torch.zeros(shape, dtype=radial.dtype, device=radial.device).index_add(first.dim() - 1, centre, first)
    return 1.0 - torch.exp(-strength * summed)


def capped_log_variance(log_variance: torch.Tensor, sigma_cap: float) -> torch.Tensor:
    """log v unchanged while σ = sqrt(v) ≤ ``sigma_cap``, above it bent smoothly (C²) toward
    σ = e·sigma_cap: log v → L + 2·tanh((log v − L)/2), L = 2·log(sigma_cap). A cap ≤ 0 is off.
    Why: far outside the training data (atoms 0.4 Å apart) the exponentiated heads reach
    σ ~ 1e27; a σ of e·cap says "unknown" as clearly and stays finite in every sum."""
    if sigma_cap <= 0.0:
        return log_variance
    start = 2.0 * math.log(sigma_cap)
    over = (log_variance - start).clamp(min=0.0)
    return torch.where(log_variance > start, start + 2.0 * torch.tanh(0.5 * over), log_variance)
