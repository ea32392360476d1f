"""The evaluation as text and files: the terminal table and summary, report.md, and the
report folder (``write_report``: metrics.json, predictions, plots, report.md)."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import List, Mapping, Optional, Union

import numpy as np

from .. import keys
from .._files import atomic_path, jsonable, write_text_atomic
from ._ood import OOD_SCORES, THRESHOLD_SCORES
from ._plots import write_plots
from ._set_metrics import METRIC_UNITS

def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "set"


def write_report(
    evaluation: Mapping[str, object],
    predictions: Mapping[str, Mapping[str, np.ndarray]],
    report_dir: Union[str, os.PathLike],
    recalibrated_predictions: Optional[Mapping[str, Mapping[str, np.ndarray]]] = None,
) -> None:
    """Write into ``report_dir``: metrics.json (``evaluation``), report.md, the plots of
    ``PLOT_FILES`` (``write_plots``) and predictions_<set>.npz (the predictions as made: uncalibrated when a
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
    # metrics.json ends in a newline, which write_json_atomic does not add
    write_text_atomic(report_dir / "metrics.json", json.dumps(jsonable(evaluation), indent=2) + "\n")
    for name, prediction in predictions.items():
        with atomic_path(report_dir / f"predictions_{_file_stem(name)}.npz") as tmp:
            np.savez_compressed(tmp, **prediction)
    write_plots(evaluation, predictions, report_dir, recalibrated_predictions)
    write_text_atomic(report_dir / "report.md", format_markdown(evaluation))


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


def _flagged_lines(flagged) -> List[str]:
    """The fraction of each set over the thresholds ``bayesrace calibrate`` stores."""
    if not flagged or not flagged["thresholds"]:
        return []
    names = list(flagged["thresholds"])
    units = {n: "" if OOD_SCORES[n][1] == "1" else f" {OOD_SCORES[n][1]}" for n in names}  # "1": unit-free
    headers = [f"{OOD_SCORES[n][0]} > {_format_value(flagged['thresholds'][n])}{units[n]} ({THRESHOLD_SCORES[n]})"
               for n in names]
    lines = ["Fraction of structures over the stored thresholds (recalibrated σ's; each threshold 1.5 × the 0.99 "
             "quantile of its score on the calibration set, as `bayesrace calibrate` stores them; the LAMMPS "
             "column in brackets).", "",
             "| set | " + " | ".join(headers) + " |", "|---|" + "---:|" * len(headers)]
    for set_name, fractions in flagged["fraction"].items():
        lines.append(f"| {set_name} | " + " | ".join(_format_value(fractions[n]) for n in names) + " |")
    return lines + [""]


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
        shown = [s for s in OOD_SCORES if all(s in table[name] for _, table in versions for name in ood["auroc"])]
        headers = [f"{OOD_SCORES[s][0]}{suffix}" for s in shown for suffix, _ in versions]
        lines += ["| OOD set | " + " | ".join(headers) + " |", "|---|" + "---:|" * len(headers)]
        for name in ood["auroc"]:
            cells = [_format_value(table[name][score]) for score in shown for _, table in versions]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += _flagged_lines(ood.get("flagged"))

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
