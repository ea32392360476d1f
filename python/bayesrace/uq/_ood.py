"""Out-of-distribution scores per structure, and how well they separate two sets (AUROC)."""

from __future__ import annotations

from typing import Dict, Mapping, Sequence

import numpy as np

from .. import keys
from ..bayes import relative_force_std
from ._metrics import auroc
from ._predict import energy_std

# per-structure OOD scores (larger = more likely out of distribution): name -> (label, unit)
OOD_SCORES: Dict[str, tuple] = {
    "energy_sigma_meV_per_atom": ("σ_E / N", "meV/atom"),
    "max_atomic_force_sigma_eV_per_A": ("max_i σ_F,i", "eV/Å"),
    "mean_atomic_force_sigma_eV_per_A": ("mean_i σ_F,i", "eV/Å"),
    # the epistemic parts alone: the aleatoric heads follow the force magnitude, so relaxed
    # but unfamiliar geometries (a torsion scan) can have a small total σ and a large epistemic one
    "energy_sigma_epistemic_meV_per_atom": ("σ_E,epi / N", "meV/atom"),
    "max_atomic_force_sigma_epistemic_eV_per_A": ("max_i σ_F,i,epi", "eV/Å"),
    # relative to the force (keys.RELATIVE_FORCE_LEVEL): hot but known geometries have larger
    # forces and proportionally larger σ's; this tells them from novel ones
    "max_relative_force_sigma_epistemic": ("max_i σ_F,i,epi/(‖F_i‖+L)", "1"),
    # distance of the atoms' features to the training atoms' (bayes._feature_density): only
    # where the posterior has a feature density; one network suffices
    "max_feature_distance": ("max_i d_i (features)", "1"),
    "mean_feature_distance": ("mean_i d_i (features)", "1"),
}


# the scores with a stored extrapolation threshold (bayesrace calibrate) -> their compute bayesrace column
THRESHOLD_SCORES: Dict[str, str] = {
    "max_atomic_force_sigma_eV_per_A": "c_ug[1]",
    "max_atomic_force_sigma_epistemic_eV_per_A": "c_ug[6]",
    "energy_sigma_epistemic_meV_per_atom": "c_ug[7]",  # LAMMPS: eV/atom
    "max_relative_force_sigma_epistemic": "c_ug[8]",
    "max_feature_distance": "c_ug[9]",
}


def present_scores(scores: Mapping[str, np.ndarray]) -> list:
    """The names of ``OOD_SCORES`` in a set's ``ood_scores`` (the feature distances need a density)."""
    return [name for name in OOD_SCORES if name in scores]


def extrapolation_rule(per_structure: np.ndarray, quantile: float = 0.99, factor: float = 1.5) -> float:
    """The default extrapolation threshold of a per-structure score: ``factor`` × its ``quantile``
    over the structures (of a validation set). The margin is there because MD visits far more
    configurations than a validation set holds; a threshold at the set's own extremes trips on
    ordinary fluctuations. ``bayesrace calibrate`` and ``flagged_fractions`` both use it."""
    return float(factor * np.quantile(per_structure, quantile))


def ood_scores(prediction: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Per-structure scores [B] of ``OOD_SCORES`` from the σ's in ``prediction`` (calibrated
    or not, as given): energy σ per atom 1000·σ_E,b / N_b (meV/atom), and the largest and
    the mean atomic force σ_F,i over the atoms of structure b (eV/Å); and the epistemic
    energy σ per atom and largest epistemic atomic force σ, absolute and relative to the force."""
    num_atoms = prediction[keys.NUM_ATOMS].astype(np.int64)
    batch = prediction[keys.BATCH].astype(np.int64)

    def largest_per_structure(values: np.ndarray) -> np.ndarray:
        largest = np.full(num_atoms.shape[0], -np.inf)
        np.maximum.at(largest, batch, values.astype(np.float64))
        return largest

    def mean_per_structure(values: np.ndarray) -> np.ndarray:
        return np.bincount(batch, weights=values.astype(np.float64), minlength=num_atoms.shape[0]) / num_atoms

    sigma_forces = prediction[keys.ATOMIC_FORCE_STD].astype(np.float64)
    distances = {}
    if keys.ATOMIC_FEATURE_DISTANCE in prediction:
        distances = {"max_feature_distance": largest_per_structure(prediction[keys.ATOMIC_FEATURE_DISTANCE]),
                     "mean_feature_distance": mean_per_structure(prediction[keys.ATOMIC_FEATURE_DISTANCE])}
    return {
        "energy_sigma_meV_per_atom": 1000.0 * energy_std(prediction) / num_atoms,
        "max_atomic_force_sigma_eV_per_A": largest_per_structure(sigma_forces),
        "mean_atomic_force_sigma_eV_per_A": mean_per_structure(sigma_forces),
        "energy_sigma_epistemic_meV_per_atom": 1000.0 * energy_std(prediction, "epistemic") / num_atoms,
        "max_atomic_force_sigma_epistemic_eV_per_A": largest_per_structure(
            prediction[keys.ATOMIC_FORCE_STD_EPISTEMIC]),
        "max_relative_force_sigma_epistemic": largest_per_structure(relative_force_std(prediction)),
        **distances,
    }


def ood_aurocs(
    scores: Mapping[str, Mapping[str, np.ndarray]], in_distribution: str, out_of_distribution: Sequence[str]
) -> Dict[str, Dict[str, float]]:
    """``{ood set: {score: AUROC}}``: the probability that a structure of the OOD set scores
    higher than one of ``in_distribution`` (ties count half); 0.5 = no separation, 1 = perfect."""
    return {
        name: {score: auroc(scores[in_distribution][score], scores[name][score])
               for score in present_scores(scores[in_distribution])}
        for name in out_of_distribution
    }


def flagged_fractions(scores: Mapping[str, Mapping[str, np.ndarray]], threshold_set: str, quantile: float = 0.99,
                      factor: float = 1.5) -> Dict[str, object]:
    """The thresholds ``bayesrace calibrate`` would store — ``extrapolation_rule`` of each
    ``THRESHOLD_SCORES`` score over ``threshold_set`` — and the fraction of each set's structures
    above them: ``{"thresholds": {score: τ}, "fraction": {set: {score: fraction}}}``. A score that
    is 0 on the whole threshold set (one member: no epistemic part) gets no threshold."""
    thresholds = {name: extrapolation_rule(scores[threshold_set][name], quantile, factor)
                  for name in THRESHOLD_SCORES if name in scores[threshold_set]}
    thresholds = {name: value for name, value in thresholds.items() if value > 0.0}
    return {
        "thresholds": thresholds,
        "fraction": {set_name: {name: float(np.mean(values[name] > tau)) for name, tau in thresholds.items()}
                     for set_name, values in scores.items()},
    }
