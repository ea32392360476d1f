"""The numbers of one set's predictions: errors, σ's, likelihood and calibration metrics.

``set_metrics`` turns one set's predictions (``predict_frames``) into the numbers listed in
``METRIC_UNITS``. Conventions: force errors and σ's are per Cartesian component (a
per-atom force σ is sqrt(tr Σ_i / 3)); "per atom" energy numbers divide each structure's
value by its number of atoms; the energy σ is sqrt(epistemic + aleatoric variance).
"""

from __future__ import annotations

from typing import Dict, Mapping

import numpy as np

from .. import keys
from ._metrics import (
    COVERAGE_LEVELS,
    coverage,
    ence,
    gaussian_nll,
    mae,
    miscalibration_area,
    rmse,
    sharpness,
    spearman,
)
from ._predict import energy_std, reference_key

ENCE_BINS = 10

# every number evaluate_sets reports for a set, with its unit ("" for dimensionless)
METRIC_UNITS: Dict[str, str] = {
    "n_structures": "",
    "n_atoms": "",
    "energy_mae_eV": "eV",
    "energy_rmse_eV": "eV",
    "energy_mae_meV_per_atom": "meV/atom",
    "energy_rmse_meV_per_atom": "meV/atom",
    # the signed mean of (E_pred − E_ref)/N: a shift of the energy zero (which MD does not feel
    # but absolute energies do) shows here and not in the force errors
    "energy_mean_error_meV_per_atom": "meV/atom",
    "forces_mae_eV_per_A": "eV/Å",
    "forces_rmse_eV_per_A": "eV/Å",
    **{
        f"energy_sigma{part}_{stat}_meV_per_atom": "meV/atom"
        for part in ("", "_epistemic", "_aleatoric")
        for stat in ("mean", "median")
    },
    **{
        f"forces_sigma{part}_{stat}_eV_per_A": "eV/Å"
        for part in ("", "_epistemic", "_aleatoric")
        for stat in ("mean", "median")
    },
    "spearman_energy": "",  # rank correlation of |ΔE| and σ_E over structures
    "spearman_forces": "",  # of |ΔF_i| and σ_F,i over atoms
    "energy_nll": "",  # Gaussian NLL per structure, errors in eV
    "forces_nll": "",  # per force component, errors in eV/Å, σ = σ_F,i
    # calibration (scale-free): mean |observed − expected| coverage over levels 0.01..0.99
    "energy_miscalibration_area": "",  # over structures (ΔE_b, σ_E,b)
    "forces_miscalibration_area": "",  # over force components (ΔF_i,a, σ_F,i)
    "energy_ence": "",  # expected normalised calibration error, ≤ 10 equal-count σ bins
    "forces_ence": "",
    # sharpness: RMS predicted σ, sqrt(mean σ²) (smaller is sharper; only useful when calibrated)
    "energy_sharpness_meV_per_atom": "meV/atom",  # of σ_E,b / N_b over structures
    "forces_sharpness_eV_per_A": "eV/Å",  # of σ_F,i over atoms
    **{f"energy_coverage_{round(100 * p)}": "" for p in COVERAGE_LEVELS},
    **{f"forces_coverage_{round(100 * p)}": "" for p in COVERAGE_LEVELS},
}


def set_metrics(prediction: Mapping[str, np.ndarray]) -> Dict[str, float]:
    """The numbers of ``METRIC_UNITS`` for one set; error metrics only where references exist."""
    num_atoms = prediction[keys.NUM_ATOMS].astype(np.float64)
    metrics: Dict[str, float] = {"n_structures": int(num_atoms.shape[0]), "n_atoms": int(num_atoms.sum())}

    sigma_energy = {part: energy_std(prediction, part) for part in ("total", "epistemic", "aleatoric")}
    for part, suffix in (("total", ""), ("epistemic", "_epistemic"), ("aleatoric", "_aleatoric")):
        per_atom = 1000.0 * sigma_energy[part] / num_atoms
        metrics[f"energy_sigma{suffix}_mean_meV_per_atom"] = float(np.mean(per_atom))
        metrics[f"energy_sigma{suffix}_median_meV_per_atom"] = float(np.median(per_atom))
    sigma_forces = {
        "": prediction[keys.ATOMIC_FORCE_STD],
        "_epistemic": prediction[keys.ATOMIC_FORCE_STD_EPISTEMIC],
        "_aleatoric": prediction[keys.ATOMIC_FORCE_STD_ALEATORIC],
    }
    for suffix, sigma in sigma_forces.items():
        metrics[f"forces_sigma{suffix}_mean_eV_per_A"] = float(np.mean(sigma))
        metrics[f"forces_sigma{suffix}_median_eV_per_A"] = float(np.median(sigma))
    metrics["energy_sharpness_meV_per_atom"] = 1000.0 * sharpness(sigma_energy["total"] / num_atoms)
    metrics["forces_sharpness_eV_per_A"] = sharpness(sigma_forces[""])

    reference_energy = prediction.get(reference_key(keys.ENERGY))
    if reference_energy is not None:
        error = prediction[keys.ENERGY] - reference_energy
        metrics["energy_mae_eV"] = mae(error)
        metrics["energy_rmse_eV"] = rmse(error)
        metrics["energy_mae_meV_per_atom"] = 1000.0 * mae(error / num_atoms)
        metrics["energy_rmse_meV_per_atom"] = 1000.0 * rmse(error / num_atoms)
        metrics["energy_mean_error_meV_per_atom"] = 1000.0 * float(np.mean(error / num_atoms))
        metrics["spearman_energy"] = spearman(np.abs(error), sigma_energy["total"])
        _add_likelihood_metrics(metrics, "energy", error, sigma_energy["total"])

    reference_forces = prediction.get(reference_key(keys.FORCES))
    if reference_forces is not None:
        error = prediction[keys.FORCES] - reference_forces
        sigma = prediction[keys.ATOMIC_FORCE_STD]
        metrics["forces_mae_eV_per_A"] = mae(error)
        metrics["forces_rmse_eV_per_A"] = rmse(error)
        metrics["spearman_forces"] = spearman(np.linalg.norm(error, axis=1), sigma)
        _add_likelihood_metrics(metrics, "forces", error, np.broadcast_to(sigma[:, None], error.shape))
    return {name: metrics[name] for name in METRIC_UNITS if name in metrics}


def _add_likelihood_metrics(metrics: dict, name: str, error: np.ndarray, sigma: np.ndarray) -> None:
    """NLL, interval coverage, miscalibration area and ENCE (``sigma`` has ``error``'s shape);
    left out where a σ is zero (one member trained without variance heads predicts no
    uncertainty at all, so there is no likelihood to report)."""
    if np.any(np.asarray(sigma) <= 0):
        return
    metrics[f"{name}_nll"] = gaussian_nll(error, sigma)
    for level, fraction in coverage(error, sigma).items():
        metrics[f"{name}_coverage_{round(100 * level)}"] = fraction
    metrics[f"{name}_miscalibration_area"] = miscalibration_area(error, sigma)
    # equal-count bins need elements to fill them: a 5-structure set gets 5 bins of one
    metrics[f"{name}_ence"] = ence(error, sigma, n_bins=min(ENCE_BINS, int(np.size(error))))
