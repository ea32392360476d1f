"""An ensemble of property models: predictions with epistemic and aleatoric variance, metrics,
saving and loading, and an ASE calculator that drives MD on one electronic state.

For every target: mean = mean of member means; epistemic variance = variance of member means;
aleatoric variance = mean of member variances. The S1−S0 gap of a two-state model is predicted
per member and treated the same way (its aleatoric part adds the two states' variances, as if
their noise were independent).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .. import keys
from ..model import ModelConfig
from ..uq import gaussian_nll, miscalibration_area, spearman
from ._model import PropertyRACE
from ._targets import PropertySet, Target, TargetStatistics

FORMAT = "bayesrace-property-ensemble"


class PropertyEnsemble:
    def __init__(self, members: Sequence[PropertyRACE], records: Optional[List[dict]] = None):
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = list(members)
        self.records = records or [{} for _ in members]
        first = self.members[0]
        self.targets: List[Target] = first.targets
        self.type_names: List[str] = first.type_names
        self.cutoff = first.cutoff

    @property
    def scalar_names(self) -> List[str]:
        return [t.name for t in self.targets if t.pooling != "state"]

    @property
    def state_names(self) -> List[str]:
        return [t.name for t in self.targets if t.pooling == "state"]

    def predict(self, data: PropertySet, batch_size: int = 64, forces: bool = True) -> Dict[str, np.ndarray]:
        """Arrays over the structures of ``data``: ``mean``/``var_epistemic``/``var_aleatoric``
        [B, T] for scalar targets; ``energy``/… [B, S], ``forces``/… [N_total, S, 3] for states;
        with two or more states, ``gap`` = E_1 − E_0 and its variances."""
        per_member = [self._predict_member(m, data, batch_size, forces) for m in self.members]
        out: Dict[str, np.ndarray] = {}
        for name, variance in (("mean", "variance"), ("energy", "energy_variance"),
                               ("forces", "force_variance"), ("gap", "gap_variance")):
            if name not in per_member[0]:
                continue
            stacked = np.stack([p[name] for p in per_member])
            out[name] = stacked.mean(axis=0)
            out[f"{name}_var_epistemic"] = stacked.var(axis=0)
            out[f"{name}_var_aleatoric"] = np.stack([p[variance] for p in per_member]).mean(axis=0)
        return out

    @staticmethod
    def _predict_member(model: PropertyRACE, data: PropertySet, batch_size: int, forces: bool) -> Dict[str, np.ndarray]:
        collected: Dict[str, List[np.ndarray]] = {}
        model.eval()
        for start in range(0, len(data), batch_size):
            batch = data.batch(range(start, min(start + batch_size, len(data))), dtype=model.scale.dtype)
            with torch.set_grad_enabled(forces and model.n_states > 0):
                pred = model(batch, compute_forces=forces)
            for name, key in (("mean", keys.PROPERTIES), ("variance", keys.PROPERTY_VARIANCE),
                              ("energy", keys.STATE_ENERGIES), ("energy_variance", keys.STATE_ENERGY_VARIANCE),
                              ("forces", keys.STATE_FORCES), ("force_variance", keys.STATE_FORCE_VARIANCE)):
                if key in pred:
                    collected.setdefault(name, []).append(pred[key].detach().cpu().numpy())
        out = {name: np.concatenate(parts) for name, parts in collected.items()}
        if "force_variance" in out:  # per component, broadcast to the force array's shape
            out["force_variance"] = np.repeat(out["force_variance"][..., None], 3, axis=-1)
        if out.get("energy", np.zeros((0, 0))).shape[-1] >= 2:
            out["gap"] = out["energy"][:, 1] - out["energy"][:, 0]
            out["gap_variance"] = out["energy_variance"][:, 1] + out["energy_variance"][:, 0]
        return out

    # -- persistence ---------------------------------------------------------------------
    def save(self, path) -> None:
        first = self.members[0]
        torch.save({
            "format": FORMAT,
            "model_config": dataclasses.asdict(first.config),
            "type_names": self.type_names,
            "targets": [dataclasses.asdict(t) for t in self.targets],
            "statistics": {"shift": first.shift.tolist(), "scale": first.scale.tolist(),
                           "references": first.references.tolist(), "loss_scale": first.loss_scale.tolist()},
            "members": [m.state_dict() for m in self.members],
            "records": self.records,
        }, path)

    @classmethod
    def load(cls, path) -> "PropertyEnsemble":
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such property ensemble")
        try:
            record = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:  # truncated, not a torch file, ...: say which file and why
            raise ValueError(f"{path}: cannot be read as a bayesrace property ensemble "
                             f"({type(error).__name__}: {error})") from None
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise ValueError(f"{path}: not a bayesrace property ensemble (format {FORMAT!r} expected)")
        config = ModelConfig(**record["model_config"])
        targets = [Target(**t) for t in record["targets"]]
        statistics = TargetStatistics(**record["statistics"])
        members = []
        for state in record["members"]:
            model = PropertyRACE(config, record["type_names"], targets, statistics).to(torch.float64)
            model.load_state_dict(state)
            members.append(model.eval())
        return cls(members, record.get("records"))


def target_metrics(error: np.ndarray, var_epistemic: np.ndarray, var_aleatoric: np.ndarray) -> Dict[str, float]:
    """MAE, RMSE and the uncertainty metrics of one target (σ = √(epistemic + aleatoric))."""
    error = np.asarray(error, dtype=np.float64).ravel()
    sigma = np.sqrt(np.asarray(var_epistemic).ravel() + np.asarray(var_aleatoric).ravel())
    sigma = np.maximum(sigma, 1e-300)
    return {
        "mae": float(np.mean(np.abs(error))),
        "rmse": float(np.sqrt(np.mean(error**2))),
        "spearman": spearman(np.abs(error), sigma),
        "spearman_epistemic": spearman(np.abs(error), np.sqrt(np.asarray(var_epistemic).ravel())),
        "miscalibration_area": miscalibration_area(error, sigma),
        "nll": gaussian_nll(error, sigma),
        "mean_sigma": float(np.mean(sigma)),
    }


def evaluate(ensemble: PropertyEnsemble, data: PropertySet) -> Dict[str, Dict[str, float]]:
    """``target_metrics`` of every scalar target, of every state's energy and forces, and of
    the gap, on ``data``."""
    pred = ensemble.predict(data, forces=bool(ensemble.state_names))
    metrics: Dict[str, Dict[str, float]] = {}
    for k, name in enumerate(ensemble.scalar_names):
        metrics[name] = target_metrics(pred["mean"][:, k] - data.values[:, k],
                                       pred["mean_var_epistemic"][:, k], pred["mean_var_aleatoric"][:, k])
    if ensemble.state_names:
        reference_forces = np.concatenate(data.state_forces)
        for s, name in enumerate(ensemble.state_names):
            metrics[f"{name} energy"] = target_metrics(
                pred["energy"][:, s] - data.state_energies[:, s],
                pred["energy_var_epistemic"][:, s], pred["energy_var_aleatoric"][:, s])
            metrics[f"{name} forces"] = target_metrics(
                pred["forces"][:, s] - reference_forces[:, s],
                pred["forces_var_epistemic"][:, s], pred["forces_var_aleatoric"][:, s])
        if "gap" in pred:
            reference_gap = data.state_energies[:, 1] - data.state_energies[:, 0]
            metrics["gap"] = target_metrics(pred["gap"] - reference_gap, pred["gap_var_epistemic"],
                                            pred["gap_var_aleatoric"])
    return metrics
