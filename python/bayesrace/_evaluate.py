"""Prediction over labelled data sets, error and uncertainty metrics, and a report.

``predict_frames`` runs a posterior over frames and returns numpy arrays named by
``bayesrace.keys`` (references from the frames under ``reference_key(...)``).
``evaluate_sets`` does that for several named sets (for instance an in-distribution
test set and out-of-distribution ones) and computes, per set, the numbers listed in
``METRIC_UNITS``; with a ``report_dir`` it writes ``metrics.json``, parity plots, an
error-versus-σ plot, the predictions of every set (``predictions_<set>.npz``) and
``report.md``.

Conventions: force errors and σ's are per Cartesian component (a per-atom force σ is
sqrt(tr Σ_i / 3)); "per atom" energy numbers divide each structure's value by its number
of atoms; the energy σ is sqrt(epistemic + aleatoric variance).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from . import keys
from ._data import Frame, TypeMap, frames_to_graphs, iterate_batches, read_frames
from ._metrics import COVERAGE_LEVELS, coverage, gaussian_nll, mae, rmse, spearman
from ._posterior import Posterior

REFERENCE_PREFIX = "reference_"

# fields of the posterior's prediction gathered by predict_frames, by how batches join
_PER_STRUCTURE_FIELDS = (keys.ENERGY, keys.ENERGY_VAR_EPISTEMIC, keys.ENERGY_VAR_ALEATORIC)
_PER_ATOM_FIELDS = (
    keys.FORCES,
    keys.FORCE_COV_EPISTEMIC,
    keys.FORCE_COV_ALEATORIC,
    keys.ATOMIC_FORCE_STD,
    keys.ATOMIC_FORCE_STD_EPISTEMIC,
    keys.ATOMIC_FORCE_STD_ALEATORIC,
    keys.ATOMIC_ENERGY,
    keys.ATOMIC_ENERGY_STD,
)
_PER_MEMBER_FIELDS = (keys.MEMBER_ENERGY, keys.MEMBER_FORCES)  # [M, ...]: joined along axis 1

# every number evaluate_sets reports for a set, with its unit ("" for dimensionless)
METRIC_UNITS: Dict[str, str] = {
    "n_structures": "",
    "n_atoms": "",
    "energy_mae_eV": "eV",
    "energy_rmse_eV": "eV",
    "energy_mae_meV_per_atom": "meV/atom",
    "energy_rmse_meV_per_atom": "meV/atom",
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
    **{f"energy_coverage_{round(100 * p)}": "" for p in COVERAGE_LEVELS},
    **{f"forces_coverage_{round(100 * p)}": "" for p in COVERAGE_LEVELS},
}


def reference_key(field: str) -> str:
    """Name under which ``predict_frames`` stores the reference value of ``field``."""
    return REFERENCE_PREFIX + field


def energy_std(prediction: Mapping[str, np.ndarray], part: str = "total") -> np.ndarray:
    """Per-structure energy σ (eV): ``part`` is "total", "epistemic" or "aleatoric"."""
    epistemic = prediction[keys.ENERGY_VAR_EPISTEMIC]
    aleatoric = prediction[keys.ENERGY_VAR_ALEATORIC]
    variances = {"total": epistemic + aleatoric, "epistemic": epistemic, "aleatoric": aleatoric}
    if part not in variances:
        raise ValueError(f"energy_std: part must be one of {sorted(variances)}, got {part!r}")
    return np.sqrt(variances[part])


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()


def predict_frames(
    posterior: Posterior,
    frames: Sequence[Frame],
    batch_size: int = 16,
    dtype: torch.dtype = torch.float64,
    progress: bool = False,
    progress_label: str = "predict",
) -> Dict[str, np.ndarray]:
    """Posterior predictions for ``frames``, concatenated over batches, as numpy arrays.

    Per structure [B]: ENERGY, ENERGY_VAR_EPISTEMIC, ENERGY_VAR_ALEATORIC, NUM_ATOMS.
    Per atom [N, ...]: FORCES, FORCE_COV_EPISTEMIC, FORCE_COV_ALEATORIC, ATOMIC_FORCE_STD
    (and _EPISTEMIC, _ALEATORIC), ATOMIC_ENERGY, ATOMIC_ENERGY_STD, ATOMIC_NUMBERS and
    BATCH (index of the atom's frame). Per member: MEMBER_ENERGY [M, B], MEMBER_FORCES
    [M, N, 3]. ``reference_key(keys.ENERGY)`` [B] and ``reference_key(keys.FORCES)``
    [N, 3] are present when every frame carries that label.
    """
    if not frames:
        raise ValueError("predict_frames: no frames")
    parameter = next(posterior.parameters())
    if parameter.dtype != dtype:
        raise ValueError(
            f"predict_frames: the posterior is {parameter.dtype} but dtype is {dtype}; "
            "pass the posterior's dtype or convert it with posterior.to(dtype)"
        )
    device = parameter.device
    from tqdm.auto import tqdm

    graphs = frames_to_graphs(frames, TypeMap(posterior.type_names), posterior.cutoff)
    chunks: Dict[str, List[np.ndarray]] = defaultdict(list)
    was_training = posterior.training
    posterior.eval()
    try:
        batches = iterate_batches(graphs, batch_size, shuffle=False, dtype=dtype)
        n_batches = math.ceil(len(graphs) / batch_size)
        structures_before = 0
        for batch in tqdm(batches, total=n_batches, desc=progress_label, unit="batch", disable=not progress):
            batch = {name: value.to(device) for name, value in batch.items()}
            # forces come from autograd, so no torch.no_grad; every output is detached
            out = posterior(batch)
            for field in _PER_STRUCTURE_FIELDS + _PER_ATOM_FIELDS + _PER_MEMBER_FIELDS:
                chunks[field].append(_to_numpy(out[field]))
            chunks[keys.NUM_ATOMS].append(_to_numpy(batch[keys.NUM_ATOMS]))
            chunks[keys.ATOMIC_NUMBERS].append(_to_numpy(batch[keys.ATOMIC_NUMBERS]))
            chunks[keys.BATCH].append(_to_numpy(batch[keys.BATCH]) + structures_before)
            structures_before += int(batch[keys.NUM_ATOMS].shape[0])
    finally:
        posterior.train(was_training)

    prediction = {
        field: np.concatenate(parts, axis=1 if field in _PER_MEMBER_FIELDS else 0) for field, parts in chunks.items()
    }
    if all(frame.energy is not None for frame in frames):
        prediction[reference_key(keys.ENERGY)] = np.array([frame.energy for frame in frames], dtype=np.float64)
    if all(frame.forces is not None for frame in frames):
        prediction[reference_key(keys.FORCES)] = np.concatenate([frame.forces for frame in frames]).astype(np.float64)
    return prediction


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

    reference_energy = prediction.get(reference_key(keys.ENERGY))
    if reference_energy is not None:
        error = prediction[keys.ENERGY] - reference_energy
        metrics["energy_mae_eV"] = mae(error)
        metrics["energy_rmse_eV"] = rmse(error)
        metrics["energy_mae_meV_per_atom"] = 1000.0 * mae(error / num_atoms)
        metrics["energy_rmse_meV_per_atom"] = 1000.0 * rmse(error / num_atoms)
        metrics["spearman_energy"] = spearman(np.abs(error), sigma_energy["total"])
        _add_likelihood_metrics(metrics, "energy", error, sigma_energy["total"])

    reference_forces = prediction.get(reference_key(keys.FORCES))
    if reference_forces is not None:
        error = prediction[keys.FORCES] - reference_forces
        sigma = prediction[keys.ATOMIC_FORCE_STD]
        metrics["forces_mae_eV_per_A"] = mae(error)
        metrics["forces_rmse_eV_per_A"] = rmse(error)
        metrics["spearman_forces"] = spearman(np.linalg.norm(error, axis=1), sigma)
        _add_likelihood_metrics(metrics, "forces", error, sigma[:, None])
    return {name: metrics[name] for name in METRIC_UNITS if name in metrics}


def _add_likelihood_metrics(metrics: dict, name: str, error: np.ndarray, sigma: np.ndarray) -> None:
    """NLL and interval coverage; left out where a σ is zero (one member trained without
    variance heads predicts no uncertainty at all, so there is no likelihood to report)."""
    if np.any(np.asarray(sigma) <= 0):
        return
    metrics[f"{name}_nll"] = gaussian_nll(error, sigma)
    for level, fraction in coverage(error, sigma).items():
        metrics[f"{name}_coverage_{round(100 * level)}"] = fraction


# --------------------------------------------------------------------------------------
# several sets and the report


def evaluate_sets(
    posterior: Posterior,
    sets: Mapping[str, Union[str, os.PathLike, Sequence[Frame]]],
    report_dir: Optional[Union[str, os.PathLike]] = None,
    energy_key: str = "energy",
    forces_key: str = "forces",
    progress: bool = True,
    batch_size: int = 16,
) -> Dict[str, Dict[str, float]]:
    """Metrics per named set: ``{set name: {metric name (see METRIC_UNITS): value}}``.

    A set is a structure file (read with ``read_frames``; labels are optional, so an
    unlabelled trajectory still gets its σ's) or a list of frames. Sets keep their
    order; the report treats the first one as the in-distribution reference. With
    ``report_dir`` the files described in the module docstring are written there.
    """
    if not sets:
        raise ValueError("evaluate_sets: no sets given")
    dtype = next(posterior.parameters()).dtype
    predictions: Dict[str, Dict[str, np.ndarray]] = {}
    results: Dict[str, Dict[str, float]] = {}
    for name, source in sets.items():
        if isinstance(source, (str, os.PathLike)):
            frames = read_frames(
                source, energy_key=energy_key, forces_key=forces_key, require_energy=False, require_forces=False
            )
        else:
            frames = list(source)
        predictions[name] = predict_frames(
            posterior, frames, batch_size=batch_size, dtype=dtype, progress=progress, progress_label=f"predict {name}"
        )
        results[name] = set_metrics(predictions[name])
    if report_dir is not None:
        write_report(results, predictions, report_dir)
    return results


def _json_number(value):
    # JSON has no NaN; a missing correlation (constant σ) becomes null
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "set"


def write_report(
    results: Mapping[str, Mapping[str, float]],
    predictions: Mapping[str, Mapping[str, np.ndarray]],
    report_dir: Union[str, os.PathLike],
) -> None:
    """metrics.json, parity_energy.png, parity_forces.png, error_vs_sigma.png, report.md, predictions_<set>.npz."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    serialisable = {name: {k: _json_number(v) for k, v in metrics.items()} for name, metrics in results.items()}
    (report_dir / "metrics.json").write_text(json.dumps(serialisable, indent=2) + "\n")
    for name, prediction in predictions.items():
        np.savez_compressed(report_dir / f"predictions_{_file_stem(name)}.npz", **prediction)
    _plot_parity(results, predictions, report_dir / "parity_energy.png", _energy_parity, "energies")
    _plot_parity(results, predictions, report_dir / "parity_forces.png", _force_parity, "forces")
    _plot_error_vs_sigma(predictions, report_dir / "error_vs_sigma.png")
    (report_dir / "report.md").write_text(format_markdown(results))


# -- plots (matplotlib's object API with the Agg canvas: no pyplot, no global backend) ----

_MAX_POINTS = 20000  # per set and plot; more only slows drawing


def _subsample(count: int, seed: int = 0) -> np.ndarray:
    if count <= _MAX_POINTS:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, _MAX_POINTS, replace=False))


def _new_figure(n_panels: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_panels = max(n_panels, 1)
    figure = Figure(figsize=(4.2 * n_panels, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, n_panels, squeeze=False)[0]
    return figure, axes


def _colour(index: int) -> str:
    return f"C{index % 10}"


def _parity_panel(axis, reference, predicted, colour, label, title, unit):
    axis.scatter(reference, predicted, s=4, alpha=0.6, color=colour, label=label, rasterized=True)
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
    figure, axes = _new_figure(len(names))
    for index, (axis, name) in enumerate(zip(axes, names)):
        data = panel_data(predictions[name], results[name])
        if data is None:
            _no_data_note(axis, f"{name}: no reference {missing}")
            continue
        reference, predicted, label, title, unit = data
        _parity_panel(axis, reference, predicted, _colour(index), label, f"{name}: {title}", unit)
    figure.savefig(path, dpi=120)


def _plot_error_vs_sigma(predictions, path: Path) -> None:
    figure, axes = _new_figure(1)
    axis = axes[0]
    plotted = []
    for index, (name, prediction) in enumerate(predictions.items()):
        reference = prediction.get(reference_key(keys.FORCES))
        if reference is None:
            continue
        # RMS component error of each atom, on the scale of σ_F,i (the diagonal is calibration)
        error = np.linalg.norm(prediction[keys.FORCES] - reference, axis=1) / math.sqrt(3.0)
        sigma = prediction[keys.ATOMIC_FORCE_STD]
        chosen = _subsample(error.size)
        floor = 1e-6  # zero errors have no place on a log axis
        axis.scatter(
            sigma[chosen], np.maximum(error[chosen], floor), s=4, alpha=0.5, color=_colour(index),
            label=name, rasterized=True,
        )
        plotted.append((sigma, np.maximum(error, floor)))
    if not plotted:
        _no_data_note(axis, "no set has reference forces")
    else:
        low = min(min(s.min(), e.min()) for s, e in plotted)
        high = max(max(s.max(), e.max()) for s, e in plotted)
        axis.plot([low, high], [low, high], color="0.4", linewidth=0.8, label="error = σ")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("predicted σ_F per atom [eV/Å]")
        axis.set_ylabel("|ΔF_i| / √3 per atom [eV/Å]")
        axis.set_title("force error vs predicted uncertainty")
        axis.legend(fontsize=8)
    figure.savefig(path, dpi=120)


# -- text --------------------------------------------------------------------------------


def _format_value(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


# columns of the terminal table: (header, metric name)
_TABLE_COLUMNS = (
    ("structures", "n_structures"),
    ("atoms", "n_atoms"),
    ("E MAE [meV/at]", "energy_mae_meV_per_atom"),
    ("E RMSE [meV/at]", "energy_rmse_meV_per_atom"),
    ("F MAE [eV/Å]", "forces_mae_eV_per_A"),
    ("F RMSE [eV/Å]", "forces_rmse_eV_per_A"),
    ("σE [meV/at]", "energy_sigma_mean_meV_per_atom"),
    ("σF [eV/Å]", "forces_sigma_mean_eV_per_A"),
    ("σF epi [eV/Å]", "forces_sigma_epistemic_mean_eV_per_A"),
    ("σF ale [eV/Å]", "forces_sigma_aleatoric_mean_eV_per_A"),
    ("ρ(|ΔF|,σF)", "spearman_forces"),
    ("NLL F", "forces_nll"),
    ("cov95 F", "forces_coverage_95"),
)


def format_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """Fixed-width table, one row per set; σ columns are means, units in the headers."""
    headers = ["set"] + [header for header, _ in _TABLE_COLUMNS]
    rows = [
        [name] + [_format_value(metrics.get(metric)) for _, metric in _TABLE_COLUMNS]
        for name, metrics in results.items()
    ]
    widths = [max(len(row[column]) for row in [headers] + rows) for column in range(len(headers))]

    def line(cells):
        first = cells[0].ljust(widths[0])
        return "  ".join([first] + [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:])])

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(row) for row in rows])


def format_markdown(results: Mapping[str, Mapping[str, float]]) -> str:
    """report.md: one table per set, then the in-distribution vs out-of-distribution σ's."""
    lines = ["# bayesrace evaluation", ""]
    lines += [
        "Force errors and σ's are per Cartesian component (σ_F,i = sqrt(tr Σ_i / 3)); per-atom",
        "energy numbers divide each structure's value by its number of atoms; NLLs include",
        "the 0.5·log 2π constant. Plots: `parity_energy.png`, `parity_forces.png`, `error_vs_sigma.png`.",
        "",
    ]
    for name, metrics in results.items():
        lines += [f"## {name}", "", "| metric | value | unit |", "|---|---:|---|"]
        for metric, value in metrics.items():
            lines.append(f"| {metric} | {_format_value(value)} | {METRIC_UNITS.get(metric, '')} |")
        lines.append("")

    names = list(results)
    reference_name = names[0]
    reference_sigma = results[reference_name]["forces_sigma_mean_eV_per_A"]
    reference_epistemic = results[reference_name]["forces_sigma_epistemic_mean_eV_per_A"]

    def ratio(value: float, reference: float) -> float:
        return value / reference if reference > 0 else float("nan")

    lines += [
        "## uncertainty: in-distribution vs out-of-distribution",
        "",
        f"Mean predicted σ per set. The first set, `{reference_name}`, is the in-distribution",
        "reference; a useful posterior gives out-of-distribution sets larger σ's (ratio > 1),",
        "mostly through the epistemic part.",
        "",
        "| set | σ_E [meV/atom] | σ_F [eV/Å] | σ_F epistemic [eV/Å] | σ_F aleatoric [eV/Å] "
        "| σ_F / first set | σ_F epistemic / first set | F RMSE [eV/Å] |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, metrics in results.items():
        cells = [
            metrics["energy_sigma_mean_meV_per_atom"],
            metrics["forces_sigma_mean_eV_per_A"],
            metrics["forces_sigma_epistemic_mean_eV_per_A"],
            metrics["forces_sigma_aleatoric_mean_eV_per_A"],
            ratio(metrics["forces_sigma_mean_eV_per_A"], reference_sigma),
            ratio(metrics["forces_sigma_epistemic_mean_eV_per_A"], reference_epistemic),
            metrics.get("forces_rmse_eV_per_A"),
        ]
        lines.append(f"| {name} | " + " | ".join(_format_value(c) for c in cells) + " |")
    lines.append("")
    return "\n".join(lines)
