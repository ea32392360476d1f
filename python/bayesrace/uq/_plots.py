"""The plots of the evaluation report (``PLOT_FILES``), drawn through ``bayesrace._figures``.

Parity of energies and forces per set; per-atom force error |ΔF_i|/√3 against σ_F,i
(median and 5–95 % band per σ bin); calibration curves (observed vs expected coverage of
central Gaussian intervals); histograms of the OOD scores of every set; ROC curves of each
OOD set against the first.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from .. import keys
from .._figures import colour, new_figure, save_figure
from ._metrics import auroc, calibration_curve, roc_curve
from ._ood import OOD_SCORES, ood_scores, present_scores
from ._predict import energy_std, reference_key

PLOT_FILES = (
    "parity_energy.png",
    "parity_forces.png",
    "error_vs_sigma.png",
    "calibration_curves.png",
    "ood_scores.png",
    "ood_roc.png",
)
_DPI = 120


def write_plots(
    evaluation: Mapping[str, object],
    predictions: Mapping[str, Mapping[str, np.ndarray]],
    report_dir: Union[str, os.PathLike],
    recalibrated_predictions: Optional[Mapping[str, Mapping[str, np.ndarray]]] = None,
) -> None:
    """Draw every plot of ``PLOT_FILES`` into ``report_dir`` (see ``write_report``). The OOD
    plots use the recalibrated σ's when there are any (those are what a deployed calibrated
    model reports)."""
    report_dir = Path(report_dir)
    results = evaluation["sets"]
    _plot_parity(results, predictions, report_dir / "parity_energy.png", _energy_parity, "energies")
    _plot_parity(results, predictions, report_dir / "parity_forces.png", _force_parity, "forces")
    versions = {"as predicted" if recalibrated_predictions is None or evaluation.get("calibration") is None
                else "uncalibrated": predictions}
    if recalibrated_predictions is not None:
        versions["recalibrated"] = recalibrated_predictions
    _plot_error_vs_sigma(versions, report_dir / "error_vs_sigma.png")
    _plot_calibration_curves(versions, report_dir / "calibration_curves.png")
    final = recalibrated_predictions if recalibrated_predictions is not None else predictions
    final_label = "recalibrated" if recalibrated_predictions is not None else "as predicted"
    scores = {name: ood_scores(prediction) for name, prediction in final.items()}
    ood = evaluation["ood"]
    _plot_ood_histograms(scores, report_dir / "ood_scores.png", final_label)
    _plot_roc(scores, ood["in_distribution"], list(ood["auroc"]), report_dir / "ood_roc.png", final_label)


_MAX_POINTS = 20000  # per set and plot; more only slows drawing


def _subsample(count: int, seed: int = 0) -> np.ndarray:
    if count <= _MAX_POINTS:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, _MAX_POINTS, replace=False))


def _parity_panel(axis, reference, predicted, set_colour, label, title, unit):
    axis.scatter(reference, predicted, s=4, alpha=0.6, color=set_colour, label=label, rasterized=True)
    low = float(min(reference.min(), predicted.min()))
    high = float(max(reference.max(), predicted.max()))
    pad = 0.05 * (high - low) if high > low else 1.0
    axis.plot([low - pad, high + pad], [low - pad, high + pad], color="0.4", linewidth=0.8)
    axis.set_xlim(low - pad, high + pad)
    axis.set_ylim(low - pad, high + pad)
    axis.set_xlabel(f"reference [{unit}]")
    axis.set_ylabel(f"predicted [{unit}]")
    axis.set_title(title)
    axis.legend(loc="upper left", fontsize=8)


def _no_data_note(axis, text: str) -> None:
    axis.text(0.5, 0.5, text, ha="center", va="center", transform=axis.transAxes)
    axis.set_axis_off()


def _energy_parity(prediction, metrics):
    reference = prediction.get(reference_key(keys.ENERGY))
    if reference is None:
        return None
    num_atoms = prediction[keys.NUM_ATOMS]
    label = f"RMSE {metrics['energy_rmse_meV_per_atom']:.4g} meV/atom"
    return reference / num_atoms, prediction[keys.ENERGY] / num_atoms, label, "energy per atom", "eV/atom"


def _force_parity(prediction, metrics):
    reference = prediction.get(reference_key(keys.FORCES))
    if reference is None:
        return None
    chosen = _subsample(reference.size)
    label = f"RMSE {metrics['forces_rmse_eV_per_A']:.4g} eV/Å"
    return (reference.ravel()[chosen], prediction[keys.FORCES].ravel()[chosen], label,
            "force components", "eV/Å")


def _plot_parity(results, predictions, path: Path, panel_data, missing: str) -> None:
    """One parity panel per set; ``panel_data`` picks (reference, predicted, label, title, unit)."""
    names = list(predictions)
    figure, axes = new_figure(len(names))
    for index, (axis, name) in enumerate(zip(axes, names)):
        data = panel_data(predictions[name], results[name])
        if data is None:
            _no_data_note(axis, f"{name}: no reference {missing}")
            continue
        reference, predicted, label, title, unit = data
        _parity_panel(axis, reference, predicted, colour(index), label, f"{name}: {title}", unit)
    save_figure(figure, path, dpi=_DPI)


_ERROR_FLOOR = 1e-6  # eV/Å: zero errors have no place on a log axis


def _atomic_force_errors(prediction) -> Optional[tuple]:
    """(|ΔF_i|/√3, σ_F,i) per atom: the RMS component error on the scale of σ_F,i."""
    reference = prediction.get(reference_key(keys.FORCES))
    if reference is None:
        return None
    error = np.linalg.norm(prediction[keys.FORCES] - reference, axis=1) / math.sqrt(3.0)
    return error, prediction[keys.ATOMIC_FORCE_STD]


def binned_error_quantiles(error: np.ndarray, sigma: np.ndarray, n_bins: int = 12, min_per_bin: int = 10,
                           quantiles=(0.05, 0.5, 0.95)) -> Dict[str, np.ndarray]:
    """Quantiles of ``error`` in equal-count bins of ``sigma``: ``{"sigma": median σ per bin,
    "q05"/"q50"/"q95": error quantiles}`` (keys named by percent), at most ``n_bins`` bins of
    at least ``min_per_bin`` elements (one bin for fewer)."""
    order = np.argsort(sigma, kind="stable")
    n_bins = max(1, min(n_bins, sigma.size // min_per_bin))
    bins = [b for b in np.array_split(order, n_bins) if b.size]
    out = {"sigma": np.array([np.median(sigma[b]) for b in bins])}
    for q in quantiles:
        out[f"q{round(100 * q):02d}"] = np.array([np.quantile(error[b], q) for b in bins])
    return out


def _plot_error_vs_sigma(versions: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]], path: Path) -> None:
    """One panel per version (as predicted / recalibrated): per set, faint points and the
    median and 5–95 % band of |ΔF_i|/√3 in σ bins; a calibrated model follows the diagonal
    in RMS (for Gaussian errors the median of |ΔF_i|/√3 is ≈ 0.89 σ)."""
    figure, axes = new_figure(len(versions))
    for axis, (version, predictions) in zip(axes, versions.items()):
        drawn = []
        for index, (name, prediction) in enumerate(predictions.items()):
            pair = _atomic_force_errors(prediction)
            if pair is None:
                continue
            error, sigma = pair
            error = np.maximum(error, _ERROR_FLOOR)
            chosen = _subsample(error.size)
            set_colour = colour(index)
            axis.scatter(sigma[chosen], error[chosen], s=2, alpha=0.15, color=set_colour, rasterized=True)
            bands = binned_error_quantiles(error, sigma)
            axis.fill_between(bands["sigma"], bands["q05"], bands["q95"], color=set_colour, alpha=0.25,
                              linewidth=0)
            axis.plot(bands["sigma"], bands["q50"], "o-", color=set_colour, markersize=3, linewidth=1.2,
                      label=f"{name}: median, 5–95 %")
            drawn.append((sigma, error))
        if not drawn:
            _no_data_note(axis, "no set has reference forces")
            continue
        low = min(min(s.min(), e.min()) for s, e in drawn)
        high = max(max(s.max(), e.max()) for s, e in drawn)
        axis.plot([low, high], [low, high], color="0.3", linewidth=0.8, linestyle="--", label="error = σ")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("predicted σ_F,i [eV/Å]")
        axis.set_ylabel("|ΔF_i| / √3 [eV/Å]")
        axis.set_title(f"force error vs σ ({version})")
        axis.legend(fontsize=7)
    save_figure(figure, path, dpi=_DPI)


def _calibration_inputs(prediction, quantity: str) -> Optional[tuple]:
    """(error, σ) of the energies (per structure) or forces (per component), or None."""
    if quantity == "energy":
        reference = prediction.get(reference_key(keys.ENERGY))
        if reference is None:
            return None
        return prediction[keys.ENERGY] - reference, energy_std(prediction)
    reference = prediction.get(reference_key(keys.FORCES))
    if reference is None:
        return None
    error = prediction[keys.FORCES] - reference
    return error, np.broadcast_to(prediction[keys.ATOMIC_FORCE_STD][:, None], error.shape)


def _plot_calibration_curves(versions, path: Path) -> None:
    """Observed vs expected coverage of central Gaussian intervals, energies and forces;
    solid = first version (as predicted / uncalibrated), dashed = recalibrated."""
    figure, axes = new_figure(2)
    styles = ["-", "--", ":"]
    for axis, quantity, title in zip(axes, ("energy", "forces"), ("energies (per structure)",
                                                                  "forces (per component)")):
        drawn = False
        for style, (version, predictions) in zip(styles, versions.items()):
            for index, (name, prediction) in enumerate(predictions.items()):
                pair = _calibration_inputs(prediction, quantity)
                if pair is None or np.any(pair[1] <= 0):
                    continue
                expected, observed = calibration_curve(*pair)
                axis.plot(expected, observed, style, color=colour(index), linewidth=1.2,
                          label=f"{name} ({version})")
                drawn = True
        if not drawn:
            _no_data_note(axis, f"no set has reference {quantity} and σ > 0")
            continue
        axis.plot([0, 1], [0, 1], color="0.4", linewidth=0.8)
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1)
        axis.set_xlabel("expected coverage (nominal level)")
        axis.set_ylabel("observed coverage")
        axis.set_title(f"calibration: {title}")
        axis.legend(fontsize=7, loc="upper left")
    save_figure(figure, path, dpi=_DPI)


def _histogram_bins(values: List[np.ndarray], count: int = 30) -> tuple:
    """(bin edges, log axis?): logarithmic when the positive values span more than a decade."""
    joined = np.concatenate(values)
    low, high = float(joined.min()), float(joined.max())
    if high <= low:
        pad = 0.1 * abs(low) if low != 0 else 1.0
        low, high = low - pad, high + pad
    if low > 0 and high / low > 10.0:
        return np.geomspace(low, high, count + 1), True
    return np.linspace(low, high, count + 1), False


def _plot_ood_histograms(scores: Mapping[str, Mapping[str, np.ndarray]], path: Path, version: str) -> None:
    """One panel per OOD score: step histograms of every set's per-structure score."""
    shown = present_scores(next(iter(scores.values())))
    figure, axes = new_figure(len(shown))
    for axis, score in zip(axes, shown):
        label, unit = OOD_SCORES[score]
        bins, logarithmic = _histogram_bins([scores[name][score] for name in scores])
        for index, name in enumerate(scores):
            axis.hist(scores[name][score], bins=bins, histtype="step", color=colour(index), linewidth=1.4,
                      label=f"{name} ({len(scores[name][score])})")
        if logarithmic:
            axis.set_xscale("log")
        axis.set_xlabel(f"{label} [{unit}]")
        axis.set_ylabel("structures")
        axis.set_title(f"OOD score {label} ({version})")
        axis.legend(fontsize=7)
    save_figure(figure, path, dpi=_DPI)


def _plot_roc(scores, in_distribution: str, ood_names: Sequence[str], path: Path, version: str) -> None:
    """One panel per OOD score: ROC curve of each OOD set against ``in_distribution``."""
    shown = present_scores(scores[in_distribution])
    figure, axes = new_figure(len(shown))
    names = list(scores)
    for axis, score in zip(axes, shown):
        label = OOD_SCORES[score][0]
        if not ood_names:
            _no_data_note(axis, "ROC needs a second (OOD) set")
            continue
        for name in ood_names:
            fpr, tpr = roc_curve(scores[in_distribution][score], scores[name][score])
            value = auroc(scores[in_distribution][score], scores[name][score])
            axis.plot(fpr, tpr, color=colour(names.index(name)), linewidth=1.4,
                      label=f"{name}: AUROC {value:.3f}")
        axis.plot([0, 1], [0, 1], color="0.4", linewidth=0.8, linestyle="--")
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1.01)
        axis.set_xlabel(f"false positive rate ({in_distribution})")
        axis.set_ylabel("true positive rate")
        axis.set_title(f"ROC, score {label} ({version})")
        axis.legend(fontsize=7, loc="lower right")
    save_figure(figure, path, dpi=_DPI)
