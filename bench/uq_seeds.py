#!/usr/bin/env python
"""bench/uq.py over several seeds: mean ± std of its metrics, AUROCs and costs.

Each ``--results`` folder is one ``bench/uq.py --seed S --out DIR`` (same settings but the
seed). Writes to ``--out``: results.md (per data set: the headline metrics of every test set
before → after recalibration, the OOD AUROCs and the training CPU, each as mean ± std over
the seeds), results.json (the per-seed values those come from) and auroc_<dataset>.png.

    python bench/uq_seeds.py --results /work/runs/uq_shallow/s{0,1,2}/out --out bench/results/uq_shallow
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, git_commit, machine_info, write_json  # noqa: E402

from bayesrace.uq import OOD_SCORES  # noqa: E402

# (header, metric of evaluate's per-set results, factor to the header's unit)
SET_METRICS = (
    ("F RMSE [meV/Å]", "forces_rmse_eV_per_A", 1000.0),
    ("E RMSE [meV/at]", "energy_rmse_meV_per_atom", 1.0),
    ("NLL F", "forces_nll", 1.0),
    ("NLL E", "energy_nll", 1.0),
    ("MA F", "forces_miscalibration_area", 1.0),
    ("cov95 F", "forces_coverage_95", 1.0),
    ("ρ F", "spearman_forces", 1.0),
    ("ρ E", "spearman_energy", 1.0),
)
EPI_ALE = "σF epi/ale"


def _epi_ale(metrics: Dict) -> float:
    epi = metrics.get("forces_sigma_epistemic_mean_eV_per_A")
    ale = metrics.get("forces_sigma_aleatoric_mean_eV_per_A")
    return float("nan") if epi is None or not ale else epi / ale


def collect(folders: List[Path]) -> Dict:
    """{dataset: {method: {"seeds", "sets": {set: {phase: {metric: [values]}}}, "ood": {pair: {score: [..]}},
    "cpu_s": [..]}}} over the folders' results.json."""
    table: Dict = {}
    for folder in folders:
        result = json.loads((folder / "results.json").read_text())
        seed = result["settings"]["seed"]
        for dataset, methods in result["datasets"].items():
            for method, entry in methods.items():
                if "error" in entry:
                    print(f"{folder}: {dataset}/{method} failed ({entry['error']}); left out", flush=True)
                    continue
                slot = table.setdefault(dataset, {}).setdefault(
                    method, dict(seeds=[], sets={}, ood={}, cpu_s=[], low_force={}, ceiling={}, flagged={}))
                slot["seeds"].append(seed)
                slot["cpu_s"].append(entry["cpu_s"])
                for phase in ("before", "after"):
                    for set_name, metrics in entry[phase].items():
                        values = slot["sets"].setdefault(set_name, {}).setdefault(phase, {})
                        for _, name, factor in SET_METRICS:
                            if metrics.get(name) is not None:
                                values.setdefault(name, []).append(factor * metrics[name])
                        values.setdefault(EPI_ALE, []).append(_epi_ale(metrics))
                for pair, scores in (entry.get("ood") or {}).items():
                    for score, value in scores.items():
                        slot["ood"].setdefault(pair, {}).setdefault(score, []).append(value)
                for pair, value in (entry.get("ood_low_force") or {}).items():
                    slot["low_force"].setdefault(pair, []).append(value)
                for pair, value in result.get("reference_energy_auroc", {}).get(dataset, {}).items():
                    slot["ceiling"].setdefault(pair, []).append(value)
                flagged = entry.get("flagged") or {}
                for set_name, per_score in (flagged.get("fraction") or {}).items():
                    for score, fraction in per_score.items():
                        slot["flagged"].setdefault(score, {}).setdefault(set_name, []).append(fraction)
    # cheapest method first: the tables then read as "what more training buys"
    return {dataset: dict(sorted(methods.items(), key=lambda item: float(np.mean(item[1]["cpu_s"]))))
            for dataset, methods in table.items()}


def _mean_std(values: List[float], digits: int = 3) -> str:
    values = np.asarray(values, dtype=float)
    if values.size == 0 or np.all(np.isnan(values)):
        return "–"
    mean = np.nanmean(values)
    if values.size == 1:
        return f"{mean:.{digits}g}"
    spread = np.nanstd(values, ddof=1)
    if spread <= 1e-12 * max(abs(mean), 1.0):  # the same value every seed (a model-free column), not round-off
        spread = 0.0
    return f"{mean:.{digits}g} ± {spread:.2g}"


def write_markdown(table: Dict, header: List[str], path: Path) -> None:
    lines = header[:]
    for dataset, methods in table.items():
        lines += [f"## {dataset}", ""]
        set_names = list(next(iter(methods.values()))["sets"])
        for set_name in set_names:
            lines += [f"### {dataset}: {set_name} (before → after recalibration)", ""]
            columns = [h for h, _, _ in SET_METRICS] + [EPI_ALE]
            lines.append("| method | seeds | " + " | ".join(columns) + " |")
            lines.append("|" + "---|" * (len(columns) + 2))
            for method, slot in methods.items():
                phases = slot["sets"].get(set_name, {})
                cells = []
                for name in [n for _, n, _ in SET_METRICS] + [EPI_ALE]:
                    before = _mean_std(phases.get("before", {}).get(name, []))
                    after = _mean_std(phases.get("after", {}).get(name, []))
                    cells.append(before if before == after or after == "–" else f"{before} → {after}")
                lines.append(f"| {method} | {len(slot['seeds'])} | " + " | ".join(cells) + " |")
            lines.append("")
        lines += [f"### {dataset}: OOD AUROC against the in-distribution test set (as trained)", ""]
        scores = [s for s in OOD_SCORES if any(s in per for slot in methods.values() for per in slot["ood"].values())]
        lines.append("| method | OOD set | " + " | ".join(OOD_SCORES[s][0] for s in scores) + " | low ‖F‖ (no σ) | ref. E |")
        lines.append("|" + "---|" * (len(scores) + 4))
        for method, slot in methods.items():
            for pair, per in slot["ood"].items():
                lines.append(f"| {method} | {pair} | " + " | ".join(_mean_std(per.get(s, [])) for s in scores)
                             + f" | {_mean_std(slot.get('low_force', {}).get(pair, []))}"
                             + f" | {_mean_std(slot.get('ceiling', {}).get(pair, []))} |")
        lines += ["", "low ‖F‖: AUROC of −mean_i ‖F_i‖ (predicted), no uncertainty in it; a set it separates can be "
                  "'detected' by any score that divides by ‖F‖ (bench/uq.py's docstring). ref. E: AUROC of the "
                  "labelled energy per atom, no model; for hot MD of the same molecule the best any function of "
                  "the geometry can reach."]
        lines += _flagged_lines(dataset, methods)
        lines += ["", f"### {dataset}: training cost", "", "| method | CPU s |", "|---|---:|"]
        for method, slot in methods.items():
            lines.append(f"| {method} | {_mean_std(slot['cpu_s'])} |")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


def _flagged_lines(dataset: str, methods: Dict) -> List[str]:
    """Mean ± std over seeds of the fraction of each set above the stored default thresholds."""
    from bayesrace.uq import THRESHOLD_SCORES

    if not any(slot.get("flagged") for slot in methods.values()):
        return []
    set_names = [n for n in next(iter(methods.values()))["sets"] if n != "valid"]
    lines = ["", f"### {dataset}: flagged by the stored default thresholds (1.5 × 99th percentile of valid)", "",
             "| method | score (LAMMPS) | " + " | ".join(set_names) + " |", "|" + "---|" * (2 + len(set_names))]
    for method, slot in methods.items():
        for score, per_set in slot.get("flagged", {}).items():
            lines.append(f"| {method} | {OOD_SCORES[score][0]} ({THRESHOLD_SCORES[score]}) | "
                         + " | ".join(_mean_std(per_set.get(n, []), 2) for n in set_names) + " |")
    return lines


def plot_aurocs(table: Dict, out: Path) -> List[Path]:
    """Per data set: the AUROC of every OOD set and score, one bar per method (mean, std as error bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for dataset, methods in table.items():
        pairs = list(next(iter(methods.values()))["ood"])
        scores = [s for s in OOD_SCORES if any(s in slot["ood"].get(p, {}) for slot in methods.values() for p in pairs)]
        fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 3.6), squeeze=False, sharey=True)
        width = 0.8 / max(len(methods), 1)
        for axis, pair in zip(axes[0], pairs):
            x = np.arange(len(scores))
            for k, (method, slot) in enumerate(methods.items()):
                values = [np.asarray(slot["ood"].get(pair, {}).get(s, [np.nan]), dtype=float) for s in scores]
                means = [np.nanmean(v) for v in values]
                stds = [np.nanstd(v, ddof=1) if v.size > 1 else 0.0 for v in values]
                axis.bar(x + (k - (len(methods) - 1) / 2) * width, means, width, yerr=stds, label=method, capsize=2)
            axis.axhline(0.5, color="grey", lw=0.8, ls=":")
            axis.set_xticks(x, [OOD_SCORES[s][0] for s in scores], rotation=40, ha="right", fontsize=7)
            axis.set_title(pair, fontsize=9)
            axis.set_ylim(0.0, 1.0)
        axes[0][0].set_ylabel("AUROC vs in-distribution")
        axes[0][-1].legend(fontsize=7)
        fig.suptitle(f"{dataset}: OOD detection, mean ± std over seeds", fontsize=10)
        fig.tight_layout()
        path = out / f"auroc_{dataset}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", nargs="+", type=Path, required=True, help="bench/uq.py --out folders, one per seed")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = [json.loads((folder / "results.json").read_text()) for folder in args.results]
    settings = [{k: v for k, v in run["settings"].items() if k != "seed"} for run in runs]
    if any(s != settings[0] for s in settings):
        raise SystemExit(f"the --results folders differ in more than the seed: {settings}")
    table = collect(args.results)
    header = ["# Uncertainty benchmark over seeds (bench/uq_seeds.py)", "",
              f"Command: `{command_line('uq_seeds.py', argv)}`  ",
              "Per seed: " + "; ".join(f"`{c}`" for run in runs for c in run["commands"]) + "  ",
              f"Commits of the runs: {sorted({run['commit'] for run in runs})}; this summary: {git_commit()}  ",
              f"Settings: {settings[0]}; seeds {[run['settings']['seed'] for run in runs]}  ",
              "Cells: mean ± sample std over the seeds. Metric names as in bench/uq.py's results.md "
              "(ρ: Spearman of |error| and σ; MA: miscalibration area; cov95: coverage of the 95 % interval).", ""]
    write_markdown(table, header, args.out / "results.md")
    write_json(args.out / "results.json", dict(settings=settings[0], machine=machine_info(), table=table), indent=1)
    paths = plot_aurocs(table, args.out)
    print(f"results: {args.out / 'results.md'}; plots: {', '.join(p.name for p in paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
