"""Prediction over labelled data sets, error, calibration and OOD metrics, and a report.

``predict_frames`` runs a posterior over frames and returns numpy arrays named by
``bayesrace.keys`` (references from the frames under ``reference_key(...)``).
``set_metrics`` turns one set's predictions into the numbers listed in ``METRIC_UNITS``.
``evaluate_sets`` does that for several named sets (the first is the in-distribution
reference, the others are scored as out-of-distribution with ``ood_scores`` and AUROC),
optionally refits a calibration on one of them and reports every metric before and after
it, and with a ``report_dir`` writes ``metrics.json``, plots, the predictions of every set
(``predictions_<set>.npz``) and ``report.md`` (see ``write_report``).

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

from .. import keys
from ..data import Frame, TypeMap, frames_to_graphs, iterate_batches, read_frames
from ._metrics import (
    COVERAGE_LEVELS,
    auroc,
    calibration_curve,
    coverage,
    ence,
    gaussian_nll,
    mae,
    miscalibration_area,
    rmse,
    roc_curve,
    sharpness,
    spearman,
)
from ..bayes import Posterior

REFERENCE_PREFIX = "reference_"
ENCE_BINS = 10

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
    metrics["energy_sharpness_meV_per_atom"] = 1000.0 * sharpness(sigma_energy["total"] / num_atoms)
    metrics["forces_sharpness_eV_per_A"] = sharpness(sigma_forces[""])

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


# --------------------------------------------------------------------------------------
# out-of-distribution scores

# per-structure OOD scores (larger = more likely out of distribution): name -> (label, unit)
OOD_SCORES: Dict[str, tuple] = {
    "energy_sigma_meV_per_atom": ("σ_E / N", "meV/atom"),
    "max_atomic_force_sigma_eV_per_A": ("max_i σ_F,i", "eV/Å"),
    "mean_atomic_force_sigma_eV_per_A": ("mean_i σ_F,i", "eV/Å"),
    # the epistemic parts alone: the aleatoric heads follow the force magnitude, so relaxed
    # but unfamiliar geometries (a torsion scan) can have a small total σ and a large epistemic one
    "energy_sigma_epistemic_meV_per_atom": ("σ_E,epi / N", "meV/atom"),
    "max_atomic_force_sigma_epistemic_eV_per_A": ("max_i σ_F,i,epi", "eV/Å"),
}


def ood_scores(prediction: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Per-structure scores [B] of ``OOD_SCORES`` from the σ's in ``prediction`` (calibrated
    or not, as given): energy σ per atom 1000·σ_E,b / N_b (meV/atom), and the largest and
    the mean atomic force σ_F,i over the atoms of structure b (eV/Å); and the epistemic
    energy σ per atom and largest epistemic atomic force σ."""
    num_atoms = prediction[keys.NUM_ATOMS].astype(np.int64)
    batch = prediction[keys.BATCH].astype(np.int64)

    def largest_per_structure(values: np.ndarray) -> np.ndarray:
        largest = np.full(num_atoms.shape[0], -np.inf)
        np.maximum.at(largest, batch, values.astype(np.float64))
        return largest

    sigma_forces = prediction[keys.ATOMIC_FORCE_STD].astype(np.float64)
    mean = np.bincount(batch, weights=sigma_forces, minlength=num_atoms.shape[0]) / num_atoms
    return {
        "energy_sigma_meV_per_atom": 1000.0 * energy_std(prediction) / num_atoms,
        "max_atomic_force_sigma_eV_per_A": largest_per_structure(sigma_forces),
        "mean_atomic_force_sigma_eV_per_A": mean,
        "energy_sigma_epistemic_meV_per_atom": 1000.0 * energy_std(prediction, "epistemic") / num_atoms,
        "max_atomic_force_sigma_epistemic_eV_per_A": largest_per_structure(
            prediction[keys.ATOMIC_FORCE_STD_EPISTEMIC]),
    }


def ood_aurocs(
    scores: Mapping[str, Mapping[str, np.ndarray]], in_distribution: str, out_of_distribution: Sequence[str]
) -> Dict[str, Dict[str, float]]:
    """``{ood set: {score: AUROC}}``: the probability that a structure of the OOD set scores
    higher than one of ``in_distribution`` (ties count half); 0.5 = no separation, 1 = perfect."""
    return {
        name: {score: auroc(scores[in_distribution][score], scores[name][score]) for score in OOD_SCORES}
        for name in out_of_distribution
    }


# --------------------------------------------------------------------------------------
# several sets and the report

CALIBRATION_METHODS = ("isotonic", "scalar")


def _read_set(source, energy_key: str, forces_key: str) -> List[Frame]:
    if isinstance(source, (str, os.PathLike)):
        return read_frames(source, energy_key=energy_key, forces_key=forces_key, require_energy=False,
                           require_forces=False)
    return list(source)


def evaluate_sets(
    posterior: Posterior,
    sets: Mapping[str, Union[str, os.PathLike, Sequence[Frame]]],
    report_dir: Optional[Union[str, os.PathLike]] = None,
    energy_key: str = "energy",
    forces_key: str = "forces",
    progress: bool = True,
    batch_size: int = 16,
    calibrate_on: Optional[str] = None,
    calibration_method: str = "isotonic",
) -> Dict[str, object]:
    """Metrics of a posterior on named sets, before and after an optional recalibration.

    A set is a structure file (read with ``read_frames``; labels are optional, so an
    unlabelled trajectory still gets its σ's and OOD scores) or a list of frames. Sets keep
    their order; the first one is the in-distribution reference of the OOD scores.

    Without ``calibrate_on`` the posterior is evaluated as given (with its own
    ``calibration``, if any). With ``calibrate_on`` = the name of one of the sets (a
    labelled validation set) every set is predicted UNcalibrated, a calibration is fitted
    on that set with ``fit_calibration(prediction, calibration_method)``, and every metric
    is reported again on the recalibrated predictions (``calibrate_prediction``; no second
    prediction). The numbers of the calibration set itself are in-sample; the report flags
    it, and it is left out of the OOD pairs (it is in-distribution by construction).

    Returns (the content of ``metrics.json``)::

        {"units": {metric: unit},
         "sets": {set: {metric: value}},                 # as predicted
         "recalibrated": {set: {metric: value}} | None,  # with the fitted calibration
         "calibration": {"fitted_on", "method", "parameters"} | None,
         "posterior_calibration": the posterior's own calibration ({} = identity),
         "ood": {"in_distribution": set, "scores": {score: unit},
                 "auroc": {ood set: {score: AUROC}},
                 "auroc_recalibrated": {ood set: {score: AUROC}} | None}}

    With ``report_dir`` the files of ``write_report`` are written there.
    """
    from ..bayes import calibrate_prediction
    from ._calibration import fit_calibration

    if not sets:
        raise ValueError("evaluate_sets: no sets given")
    names = list(sets)
    if calibrate_on is not None and calibrate_on not in sets:
        raise ValueError(f"evaluate_sets: calibrate_on={calibrate_on!r} is not one of the sets {names}")
    if calibration_method not in CALIBRATION_METHODS:
        raise ValueError(f"evaluate_sets: calibration_method must be one of {list(CALIBRATION_METHODS)}, "
                         f"got {calibration_method!r}")
    dtype = next(posterior.parameters()).dtype
    own_calibration = dict(getattr(posterior, "calibration", None) or {})

    predictions: Dict[str, Dict[str, np.ndarray]] = {}
    if calibrate_on is not None:
        posterior.calibration = {}  # predict uncalibrated; the fitted calibration replaces the own one
    try:
        for name, source in sets.items():
            predictions[name] = predict_frames(
                posterior, _read_set(source, energy_key, forces_key), batch_size=batch_size, dtype=dtype,
                progress=progress, progress_label=f"predict {name}",
            )
    finally:
        if calibrate_on is not None:
            posterior.calibration = own_calibration

    recalibrated_predictions: Optional[Dict[str, Dict[str, np.ndarray]]] = None
    calibration = None
    if calibrate_on is not None:
        fit_on = predictions[calibrate_on]
        missing = [field for field in (keys.ENERGY, keys.FORCES) if reference_key(field) not in fit_on]
        if missing:
            raise ValueError(f"evaluate_sets: the calibration set {calibrate_on!r} has no reference "
                             f"{' or '.join(missing)} (labels {energy_key!r} / {forces_key!r} in every frame)")
        parameters = fit_calibration(fit_on, calibration_method)
        calibration = {"fitted_on": calibrate_on, "method": calibration_method, "parameters": parameters}
        recalibrated_predictions = {
            name: dict(calibrate_prediction(prediction, parameters, prediction[keys.NUM_ATOMS],
                                            prediction[keys.BATCH]))
            for name, prediction in predictions.items()
        }

    in_distribution = names[0]
    ood_names = [name for name in names[1:] if name != calibrate_on]
    scores = {name: ood_scores(prediction) for name, prediction in predictions.items()}
    recalibrated_scores = None
    if recalibrated_predictions is not None:
        recalibrated_scores = {name: ood_scores(p) for name, p in recalibrated_predictions.items()}
    evaluation = {
        "units": dict(METRIC_UNITS),
        "sets": {name: set_metrics(prediction) for name, prediction in predictions.items()},
        "recalibrated": None if recalibrated_predictions is None else {
            name: set_metrics(prediction) for name, prediction in recalibrated_predictions.items()
        },
        "calibration": calibration,
        "posterior_calibration": own_calibration,
        "ood": {
            "in_distribution": in_distribution,
            "scores": {score: unit for score, (_, unit) in OOD_SCORES.items()},
            "auroc": ood_aurocs(scores, in_distribution, ood_names),
            "auroc_recalibrated": None if recalibrated_scores is None
            else ood_aurocs(recalibrated_scores, in_distribution, ood_names),
        },
    }
    if report_dir is not None:
        write_report(evaluation, predictions, report_dir, recalibrated_predictions)
    return evaluation


def _jsonable(value):
    """Plain JSON data: numpy scalars and arrays become numbers and lists; NaN and ±inf
    (JSON has none; e.g. a missing correlation of a constant σ) become null."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "set"


PLOT_FILES = (
    "parity_energy.png",
    "parity_forces.png",
    "error_vs_sigma.png",
    "calibration_curves.png",
    "ood_scores.png",
    "ood_roc.png",
)


def write_report(
    evaluation: Mapping[str, object],
    predictions: Mapping[str, Mapping[str, np.ndarray]],
    report_dir: Union[str, os.PathLike],
    recalibrated_predictions: Optional[Mapping[str, Mapping[str, np.ndarray]]] = None,
) -> None:
    """Write into ``report_dir``: metrics.json (``evaluation``), report.md, the plots of
    ``PLOT_FILES`` and predictions_<set>.npz (the predictions as made: uncalibrated when a
    calibration was fitted; ``calibrate_prediction`` with metrics.json's
    calibration.parameters reproduces the recalibrated ones).

    Plots: parity of energies and forces per set; per-atom force error |ΔF_i|/√3 against
    σ_F,i (median and 5–95 % band per σ bin; the diagonal is error = σ), before and after
    recalibration; calibration curves (observed vs expected coverage of central Gaussian
    intervals) of energies and forces; histograms of the OOD scores of every set; ROC
    curves of each OOD set against the first. The OOD plots use the recalibrated σ's when
    there are any (those are what a deployed calibrated model reports).
    """
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "metrics.json").write_text(json.dumps(_jsonable(evaluation), indent=2) + "\n")
    for name, prediction in predictions.items():
        np.savez_compressed(report_dir / f"predictions_{_file_stem(name)}.npz", **prediction)
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
    (report_dir / "report.md").write_text(format_markdown(evaluation))


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
    figure, axes = _new_figure(len(versions))
    for axis, (version, predictions) in zip(axes, versions.items()):
        drawn = []
        for index, (name, prediction) in enumerate(predictions.items()):
            pair = _atomic_force_errors(prediction)
            if pair is None:
                continue
            error, sigma = pair
            error = np.maximum(error, _ERROR_FLOOR)
            chosen = _subsample(error.size)
            colour = _colour(index)
            axis.scatter(sigma[chosen], error[chosen], s=2, alpha=0.15, color=colour, rasterized=True)
            bands = binned_error_quantiles(error, sigma)
            axis.fill_between(bands["sigma"], bands["q05"], bands["q95"], color=colour, alpha=0.25, linewidth=0)
            axis.plot(bands["sigma"], bands["q50"], "o-", color=colour, markersize=3, linewidth=1.2,
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
    figure.savefig(path, dpi=120)


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
    figure, axes = _new_figure(2)
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
                axis.plot(expected, observed, style, color=_colour(index), linewidth=1.2,
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
    figure.savefig(path, dpi=120)


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
    figure, axes = _new_figure(len(OOD_SCORES))
    for axis, (score, (label, unit)) in zip(axes, OOD_SCORES.items()):
        bins, logarithmic = _histogram_bins([scores[name][score] for name in scores])
        for index, name in enumerate(scores):
            axis.hist(scores[name][score], bins=bins, histtype="step", color=_colour(index), linewidth=1.4,
                      label=f"{name} ({len(scores[name][score])})")
        if logarithmic:
            axis.set_xscale("log")
        axis.set_xlabel(f"{label} [{unit}]")
        axis.set_ylabel("structures")
        axis.set_title(f"OOD score {label} ({version})")
        axis.legend(fontsize=7)
    figure.savefig(path, dpi=120)


def _plot_roc(scores, in_distribution: str, ood_names: Sequence[str], path: Path, version: str) -> None:
    """One panel per OOD score: ROC curve of each OOD set against ``in_distribution``."""
    figure, axes = _new_figure(len(OOD_SCORES))
    names = list(scores)
    for axis, (score, (label, _)) in zip(axes, OOD_SCORES.items()):
        if not ood_names:
            _no_data_note(axis, "ROC needs a second (OOD) set")
            continue
        for name in ood_names:
            fpr, tpr = roc_curve(scores[in_distribution][score], scores[name][score])
            value = auroc(scores[in_distribution][score], scores[name][score])
            axis.plot(fpr, tpr, color=_colour(names.index(name)), linewidth=1.4,
                      label=f"{name}: AUROC {value:.3f}")
        axis.plot([0, 1], [0, 1], color="0.4", linewidth=0.8, linestyle="--")
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1.01)
        axis.set_xlabel(f"false positive rate ({in_distribution})")
        axis.set_ylabel("true positive rate")
        axis.set_title(f"ROC, score {label} ({version})")
        axis.legend(fontsize=7, loc="lower right")
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

# the calibration numbers: before and after recalibration side by side
_CALIBRATION_COLUMNS = (
    ("NLL E", "energy_nll"),
    ("NLL F", "forces_nll"),
    ("miscal E", "energy_miscalibration_area"),
    ("miscal F", "forces_miscalibration_area"),
    ("ENCE E", "energy_ence"),
    ("ENCE F", "forces_ence"),
    ("cov95 E", "energy_coverage_95"),
    ("cov95 F", "forces_coverage_95"),
    ("sharp E [meV/at]", "energy_sharpness_meV_per_atom"),
    ("sharp F [eV/Å]", "forces_sharpness_eV_per_A"),
)


def format_table(results: Mapping[str, Mapping[str, float]], columns=_TABLE_COLUMNS) -> str:
    """Fixed-width table, one row per set; σ columns are means, units in the headers.
    ``columns``: (header, metric name) pairs."""
    headers = ["set"] + [header for header, _ in columns]
    rows = [
        [name] + [_format_value(metrics.get(metric)) for _, metric in columns]
        for name, metrics in results.items()
    ]
    widths = [max(len(row[column]) for row in [headers] + rows) for column in range(len(headers))]

    def line(cells):
        first = cells[0].ljust(widths[0])
        return "  ".join([first] + [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:])])

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(row) for row in rows])


def format_summary(evaluation: Mapping[str, object]) -> str:
    """The terminal summary: the error/σ table; with a fitted calibration, the calibration
    numbers before → after; the AUROC of each OOD set (recalibrated σ's when fitted)."""
    calibration = evaluation.get("calibration")
    lines = [format_table(evaluation["sets"])]
    if calibration is not None:
        fitted_on = calibration["fitted_on"]
        rows = {}
        for name in evaluation["sets"]:
            flag = " *" if name == fitted_on else ""
            rows[f"{name}{flag} before"] = evaluation["sets"][name]
            rows[f"{name}{flag} after"] = evaluation["recalibrated"][name]
        lines += ["", f"recalibration: {calibration_one_line(calibration)}",
                  format_table(rows, _CALIBRATION_COLUMNS),
                  f"* {fitted_on}: the calibration set (in-sample)"]
    ood = evaluation["ood"]
    aurocs = ood["auroc_recalibrated"] if ood.get("auroc_recalibrated") is not None else ood["auroc"]
    if aurocs:
        which = "recalibrated σ's" if ood.get("auroc_recalibrated") is not None else "σ's as predicted"
        lines += ["", f"OOD detection, AUROC against {ood['in_distribution']} ({which}):"]
        for name, values in aurocs.items():
            cells = ", ".join(f"{OOD_SCORES[s][0]} {_format_value(v)}" for s, v in values.items())
            lines.append(f"  {name}: {cells}")
    return "\n".join(lines)


def _describe_map(std_map, scale: float, unit: str, factor: float) -> str:
    x = np.asarray(std_map[keys.META_MAP_SIGMA], dtype=np.float64)
    y = np.asarray(std_map[keys.META_MAP_CALIBRATED], dtype=np.float64)
    ratio = scale * y / x
    return (f"map of {x.size} knots on σ {factor * x[0]:.3g}–{factor * x[-1]:.3g} {unit}, "
            f"c(σ)/σ {ratio.min():.3g}–{ratio.max():.3g}")


def calibration_one_line(calibration: Optional[Mapping[str, object]]) -> str:
    """One line: ``calibration`` is evaluate_sets' {"fitted_on", "method", "parameters"} or a
    bare calibration dict (the contract's fields; {} or None = identity)."""
    if not calibration:
        return "none (identity: σ's as the posterior predicts them)"
    prefix = ""
    if "parameters" in calibration:
        prefix = f"{calibration['method']}, fitted on `{calibration['fitted_on']}` (uncalibrated predictions): "
        calibration = calibration["parameters"]
    if not calibration:
        return prefix + "identity"
    parts = []
    for label, scale_key, map_key, unit, factor in (
        ("forces", keys.META_FORCE_STD_SCALE, keys.META_FORCE_STD_MAP, "eV/Å", 1.0),
        ("energy", keys.META_ENERGY_STD_SCALE, keys.META_ENERGY_STD_MAP, "meV/atom", 1000.0),
    ):
        scale = float(calibration.get(scale_key, 1.0))
        text = f"{label} s = {scale:.4g}"
        if calibration.get(map_key):
            text += ", " + _describe_map(calibration[map_key], scale, unit, factor)
        parts.append(text)
    return prefix + "; ".join(parts)


_SUMMARY_ROWS = (
    ("E RMSE", "energy_rmse_meV_per_atom"),
    ("F RMSE", "forces_rmse_eV_per_A"),
    ("E NLL", "energy_nll"),
    ("F NLL", "forces_nll"),
    ("E miscalibration area", "energy_miscalibration_area"),
    ("F miscalibration area", "forces_miscalibration_area"),
    ("E ENCE", "energy_ence"),
    ("F ENCE", "forces_ence"),
    ("E coverage 95 %", "energy_coverage_95"),
    ("F coverage 95 %", "forces_coverage_95"),
    ("E sharpness", "energy_sharpness_meV_per_atom"),
    ("F sharpness", "forces_sharpness_eV_per_A"),
)


def format_markdown(evaluation: Mapping[str, object]) -> str:
    """report.md: summary (key numbers per set before/after recalibration, OOD AUROCs, the
    calibration in one line, the plots), then the full per-set tables and the σ's per set."""
    sets = evaluation["sets"]
    recalibrated = evaluation.get("recalibrated")
    calibration = evaluation.get("calibration")
    fitted_on = calibration["fitted_on"] if calibration else None
    ood = evaluation["ood"]
    lines = ["# bayesrace evaluation", "", "## summary", ""]
    if calibration:
        lines.append(f"Recalibration: {calibration_one_line(calibration)}. Its set, `{fitted_on}`, is "
                     "the calibration set: its recalibrated numbers are in-sample.")
    else:
        lines.append("Calibration: the posterior's own, "
                     + calibration_one_line(evaluation.get("posterior_calibration")) + ".")
    lines += [
        "",
        "Force errors and σ's are per Cartesian component (σ_F,i = sqrt(tr Σ_i / 3)); energy numbers",
        "are per structure (NLL, coverage, ENCE in eV) or per atom where the unit says so; NLLs include",
        "the 0.5·log 2π constant; miscalibration area = mean |observed − expected| coverage over levels",
        "0.01…0.99 (0 = calibrated); ENCE over ≤ 10 equal-count σ bins; sharpness = sqrt(mean σ²).",
        "",
    ]
    columns = ["uncalibrated", "recalibrated"] if recalibrated is not None else ["as predicted"]
    for name, metrics in sets.items():
        flag = " (calibration set, in-sample)" if name == fitted_on else ""
        lines += [f"### {name}{flag}", "", "| metric | " + " | ".join(columns) + " | unit |",
                  "|---|" + "---:|" * len(columns) + "---|"]
        for label, metric in _SUMMARY_ROWS:
            values = [metrics.get(metric)] + ([recalibrated[name].get(metric)] if recalibrated else [])
            cells = " | ".join(_format_value(v) for v in values)
            lines.append(f"| {label} | {cells} | {METRIC_UNITS[metric]} |")
        lines.append("")

    lines += ["### out-of-distribution detection", ""]
    if not ood["auroc"]:
        lines += ["Only one set (besides the calibration set): no OOD pairs.", ""]
    else:
        lines += [f"AUROC of per-structure scores, in-distribution `{ood['in_distribution']}` against each "
                  "other set (0.5 = no separation, 1 = perfect).", ""]
        versions = [("", ood["auroc"])]
        if ood.get("auroc_recalibrated") is not None:
            versions = [(" (uncal.)", ood["auroc"]), (" (recal.)", ood["auroc_recalibrated"])]
        headers = [f"{label}{suffix}" for label, _ in OOD_SCORES.values() for suffix, _ in versions]
        lines += ["| OOD set | " + " | ".join(headers) + " |", "|---|" + "---:|" * len(headers)]
        for name in ood["auroc"]:
            cells = [_format_value(table[name][score]) for score in OOD_SCORES for _, table in versions]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")

    lines += ["### plots", "",
              "- `parity_energy.png`, `parity_forces.png`: predicted vs reference per set",
              "- `error_vs_sigma.png`: |ΔF_i|/√3 vs σ_F,i, median and 5–95 % per σ bin"
              + (", before and after recalibration" if recalibrated else ""),
              "- `calibration_curves.png`: observed vs expected coverage, energies and forces"
              + (" (solid uncalibrated, dashed recalibrated)" if recalibrated else ""),
              "- `ood_scores.png`: histograms of the OOD scores of every set",
              "- `ood_roc.png`: ROC curves of each OOD set, AUROC in the legend", ""]

    lines += ["## full metrics per set", ""]
    for name, metrics in sets.items():
        flag = " (calibration set)" if name == fitted_on else ""
        header = "| metric | " + " | ".join(columns) + " | unit |"
        lines += [f"### {name}{flag}", "", header, "|---|" + "---:|" * len(columns) + "---|"]
        for metric, value in metrics.items():
            values = [value] + ([recalibrated[name].get(metric)] if recalibrated else [])
            lines.append(f"| {metric} | " + " | ".join(_format_value(v) for v in values)
                         + f" | {METRIC_UNITS.get(metric, '')} |")
        lines.append("")

    lines += _sigma_table(recalibrated if recalibrated is not None else sets,
                          "recalibrated" if recalibrated is not None else "as predicted")
    return "\n".join(lines)


def _sigma_table(results: Mapping[str, Mapping[str, float]], version: str) -> List[str]:
    names = list(results)
    reference_name = names[0]
    reference_sigma = results[reference_name]["forces_sigma_mean_eV_per_A"]
    reference_epistemic = results[reference_name]["forces_sigma_epistemic_mean_eV_per_A"]

    def ratio(value: float, reference: float) -> float:
        return value / reference if reference > 0 else float("nan")

    lines = [
        "## uncertainty: in-distribution vs out-of-distribution",
        "",
        f"Mean predicted σ per set ({version}). The first set, `{reference_name}`, is the in-distribution",
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
    return lines
