"""The report of the pool-based active-learning benchmark (bench/al.py): learning curves mean ± std
over seeds, the labels each strategy needs to reach random's final force MAE on every test set,
what each strategy picked, and the plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

STRATEGIES = ("bald_ef", "bald_e", "bald_f", "energy_std", "random")
DATASETS = ("psb3", "acac")
PICK_TAG = "config_type"  # the pool files' tag that tells 300 K from hot frames (PSB3 and acac alike)
PLOT_METRICS = (("forces_mae_eV_per_A", "force MAE [eV/Å]"), ("forces_nll", "force NLL (per component)"))
TABLE_METRICS = (("F MAE [meV/Å]", "forces_mae_eV_per_A", 1000.0), ("NLL F", "forces_nll", 1.0),
                 ("E RMSE [meV/at]", "energy_rmse_meV_per_atom", 1.0), ("NLL E", "energy_nll", 1.0))
COLOURS = {"bald_ef": "C3", "bald_e": "C1", "bald_f": "C0", "energy_std": "C2", "random": "k"}

# ----------------------------------------------------------------------------------------
# aggregation


ENERGY_ONLY_FILE = "energy_only_metrics.json"


def evaluate_energy_only(run_dir: Path, sets: Dict[str, Path]) -> Dict:
    """Metrics of every round's posterior on the energy-only sets (cached in the run directory);
    {round: {set: {metric: value}}}."""
    from bayesrace.active import CURVE_METRICS
    from bayesrace.uq import evaluate_sets
    from bayesrace.bayes import load_posterior

    cache = run_dir / ENERGY_ONLY_FILE
    done = json.loads(cache.read_text()) if cache.exists() else {}
    changed = False
    for posterior_path in sorted(run_dir.glob("round_*/posterior.pt")):
        key = posterior_path.parent.name.split("_")[1]
        if key in done and all(name in done[key] for name in sets):
            continue
        evaluation = evaluate_sets(load_posterior(posterior_path), {n: str(p) for n, p in sets.items()},
                                   progress=False)
        done[key] = {name: {m: (None if metrics.get(m) is None else float(metrics[m])) for m in CURVE_METRICS}
                     for name, metrics in evaluation["sets"].items()}
        changed = True
    if changed:
        cache.write_text(json.dumps(done, indent=1) + "\n")
    return done


def collect(runs: Path, dataset: str, strategy: str, seeds: List[int]) -> Dict:
    """Per seed: the learning curve and the job's cost (runs that did not finish are skipped)."""
    found = {}
    for seed in seeds:
        run_dir = runs / dataset / strategy / f"seed{seed}"
        curve_path = run_dir / "learning_curve.json"
        if not curve_path.exists():
            continue
        curve = json.loads(curve_path.read_text())
        job = json.loads((run_dir / "job.json").read_text()) if (run_dir / "job.json").exists() else {}
        if job.get("returncode") != 0:  # an unfinished run would cut every mean curve short
            continue
        extra = run_dir / ENERGY_ONLY_FILE
        if extra.exists():
            by_round = json.loads(extra.read_text())
            for point in curve["points"]:
                point["test"].update(by_round.get(str(point["round"]), {}))
        found[seed] = dict(points=curve["points"], **job)
    return found


def mean_curve(per_seed: Dict, set_name: str, metric: str):
    """Labels counts present in every seed's curve, and the mean and std over seeds there."""
    tables = []
    for entry in per_seed.values():
        tables.append({p["n_labels"]: (p["test"].get(set_name) or {}).get(metric) for p in entry["points"]})
    if not tables:
        return [], np.array([]), np.array([])
    common = sorted(set.intersection(*(set(t) for t in tables)))
    labels, means, stds = [], [], []
    for n in common:
        values = [t[n] for t in tables if t[n] is not None]
        if len(values) < len(tables):
            continue
        labels.append(n)
        means.append(float(np.mean(values)))
        stds.append(float(np.std(values)))
    return labels, np.array(means), np.array(stds)


def labels_to_reach(labels: List[int], means: np.ndarray, target: float) -> Optional[float]:
    """The first labels count at which the mean curve falls to ``target`` (linear interpolation
    between the bracketing points); None if it never does."""
    for k, (n, value) in enumerate(zip(labels, means)):
        if value <= target:
            if k == 0:
                return float(n)
            n0, v0 = labels[k - 1], means[k - 1]
            return float(n0 + (n - n0) * (v0 - target) / (v0 - value))
    return None


def plot_curves(summary: Dict, dataset: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = summary["sets"]
    figure, axes = plt.subplots(len(PLOT_METRICS), len(sets), figsize=(4.2 * len(sets), 3.4 * len(PLOT_METRICS)),
                                squeeze=False)
    for row, (metric, label) in enumerate(PLOT_METRICS):
        for col, set_name in enumerate(sets):
            ax = axes[row][col]
            for strategy, entry in summary["strategies"].items():
                curve = entry["curves"].get(set_name, {}).get(metric)
                if not curve or not curve["n_labels"]:
                    continue
                x, m, s = np.array(curve["n_labels"]), np.array(curve["mean"]), np.array(curve["std"])
                ax.plot(x, m, "o-", ms=3, color=COLOURS.get(strategy), label=f"{strategy} (n={entry['n_seeds']})")
                ax.fill_between(x, m - s, m + s, color=COLOURS.get(strategy), alpha=0.12)
            ax.set_title(f"{dataset}: {set_name}", fontsize=9)
            ax.set_xlabel("labelled structures")
            ax.set_ylabel(label)
            if metric == "forces_mae_eV_per_A":
                ax.set_yscale("log")
            if not ax.lines:
                ax.text(0.5, 0.5, "no force labels", ha="center", va="center", transform=ax.transAxes)
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def summarise(runs: Path, dataset: str, sets: List[str], seeds: List[int]) -> Dict:
    summary = {"sets": sets, "strategies": {}}
    for strategy in STRATEGIES:
        per_seed = collect(runs, dataset, strategy, seeds)
        if not per_seed:
            continue
        curves = {}
        for set_name in sets:
            curves[set_name] = {}
            for _, metric, _ in TABLE_METRICS:
                labels, means, stds = mean_curve(per_seed, set_name, metric)
                curves[set_name][metric] = dict(n_labels=labels, mean=means.tolist(), std=stds.tolist())
        cpu = [e["cpu_s"] for e in per_seed.values() if "cpu_s" in e]
        wall = [e["wall_s"] for e in per_seed.values() if "wall_s" in e]
        summary["strategies"][strategy] = dict(
            n_seeds=len(per_seed), seeds=sorted(per_seed), curves=curves,
            cpu_s_mean=float(np.mean(cpu)) if cpu else None, cpu_s_total=float(np.sum(cpu)) if cpu else None,
            wall_s_mean=float(np.mean(wall)) if wall else None,
            time_s=_time_split(per_seed), picked=_picked_by_tag(per_seed, PICK_TAG),
            per_seed={str(seed): [{k: v for k, v in p.items() if k != "picked"} for p in e["points"]]
                      for seed, e in per_seed.items()})  # picks: aggregated in "picked"
    add_targets(summary)
    return summary


def keep_earlier(summary: Dict, earlier: Optional[Dict]) -> List[str]:
    """Strategies of an earlier report of the same benchmark (same settings) whose runs are not in
    ``--runs`` any more: their summaries are kept, so a benchmark can be extended strategy by strategy
    across machines. Returns their names; the targets are recomputed over the merged strategies."""
    if not earlier:
        return []
    kept = [name for name in earlier.get("strategies", {}) if name not in summary["strategies"]]
    for name in kept:
        summary["strategies"][name] = dict(earlier["strategies"][name], from_earlier_report=True)
    summary["strategies"] = {name: summary["strategies"][name] for name in STRATEGIES if name in summary["strategies"]}
    add_targets(summary)
    return kept


def add_targets(summary: Dict) -> None:
    """"Half the data": labels each strategy needs to reach random's final force MAE, on every test
    set with forces (the in-distribution one and those holding what MD would meet out of it)."""
    sets = summary["sets"]
    summary["targets"] = {}
    random = summary["strategies"].get("random")
    for set_name in sets:
        curve = random["curves"][set_name]["forces_mae_eV_per_A"] if random else {"n_labels": []}
        if not curve["n_labels"]:
            continue
        target, final_labels = curve["mean"][-1], curve["n_labels"][-1]
        summary["targets"][set_name] = dict(forces_mae_eV_per_A=target, n_labels=final_labels)
        for entry in summary["strategies"].values():
            c = entry["curves"][set_name]["forces_mae_eV_per_A"]
            entry.setdefault("labels_to_random_final", {})[set_name] = labels_to_reach(
                c["n_labels"], np.array(c["mean"]), target)


def _picked_by_tag(per_seed: Dict, tag: str) -> Dict:
    """Acquisitions (initial random picks excluded) by the pool's ``tag``, mean over seeds, and the
    mean max epistemic force σ of the picks when they were picked."""
    counts, sigmas = {}, []
    for entry in per_seed.values():
        for point in entry["points"]:
            picked = point.get("picked") or {}
            for value, n in (picked.get(f"tag {tag}") or {}).items():
                counts[value] = counts.get(value, 0) + n / len(per_seed)
            if "mean_max_force_sigma_epistemic" in picked:
                sigmas.append(picked["mean_max_force_sigma_epistemic"])
    return dict(counts=dict(sorted(counts.items())), mean_max_force_sigma_epistemic=float(np.mean(sigmas))
                if sigmas else None)


def _time_split(per_seed: Dict) -> Dict:
    """Mean seconds per run spent training, evaluating, selecting and labelling (from the curves)."""
    totals = {}
    for entry in per_seed.values():
        for point in entry["points"]:
            for key, value in point["time_s"].items():
                totals[key] = totals.get(key, 0.0) + value
    return {key: round(value / len(per_seed), 1) for key, value in totals.items()}


def _fmt(value, scale=1.0):
    return "–" if value is None else f"{scale * value:.3g}"


def write_markdown(results: Dict, path: Path) -> None:
    s = results["settings"]
    lines = ["# Active-learning benchmark (bench/al.py)", ""]
    lines += [
        "Commands: " + "; ".join(f"`{c}`" for c in results["commands"]) + "  ",
        f"Commit: {results['commit']}  ",
        f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, torch "
        f"{results['machine']['torch']}; {s['slots']} runs at once, one thread each; total wall "
        + (f"{results['wall_s']:.0f} s  " if results.get("wall_s") else "not recorded (report only)  "),
        f"Budget per run: preset `{s['preset']}`, ensemble of {s['members']} NLL_JEF members (every strategy), "
        f"n_initial {s['n_initial']} (random, per seed), batch {s['batch_size']} (batch-aware), {s['rounds']} "
        f"rounds, {s['epochs']} epochs per round ({s['warmup']} MSE warm-up) warm-started from the previous "
        f"round; seeds {s['seeds']}. Oracle `from_pool` (the pool's own labels).",
        "",
        "Pools and test sets are disjoint. psb3: pool = train.xyz (400, 300–600 K) + first half of "
        "test_ood_hot (100, 1000–1500 K); ood_hot = the other half. acac: pool = train_600K + train_300K "
        "(1000); test_MD_300K/600K are random subsets of the MD test files (validation frames taken from "
        "test_MD_300K, disjoint from its test subset); test_dihedral has energies only (this script "
        "evaluates it on every round's posterior after the runs). The validation "
        "set is fixed and not counted in the labels.",
        "",
        "Plots: `<dataset>_learning_curves.png` (force MAE and force NLL per test set, mean ± std over seeds).",
        "",
    ]
    for dataset, summary in results["datasets"].items():
        lines += [f"## {dataset}", ""]
        held = sorted({len(points) - 1 for e in summary["strategies"].values() for points in e["per_seed"].values()})
        if held:  # a data set's runs may hold fewer rounds than asked (a benchmark extended on one data set)
            lines += [f"Runs held: {'/'.join(map(str, held))} acquisition rounds.", ""]
        earlier = [name for name, e in summary["strategies"].items() if e.get("from_earlier_report")]
        if earlier:
            lines += [f"Strategies kept from an earlier report with the same settings (their runs were on another "
                      f"machine): {', '.join(earlier)}.", ""]
        targets = summary.get("targets", {})
        lines += [f"### {dataset}: labels needed to reach random's final force MAE", "",
                  "Target per test set: random's mean force MAE at its last labels count (" +
                  ", ".join(f"{name} {1000 * t['forces_mae_eV_per_A']:.1f} meV/Å" for name, t in targets.items()) +
                  f", at {next(iter(targets.values()))['n_labels'] if targets else '–'} labels); linear "
                  "interpolation on each strategy's mean curve; in brackets the fraction of random's labels.", ""]
        lines += ["| strategy | seeds | " + " | ".join(f"labels to target: {name}" for name in targets) +
                  " | CPU s per run (mean) | train / evaluate / select wall s per run |",
                  "|---|---:|" + "---:|" * len(targets) + "---:|---|"]
        for strategy, entry in summary["strategies"].items():
            cells = []
            for name, target in targets.items():
                reach = entry.get("labels_to_random_final", {}).get(name)
                cells.append("not reached" if reach is None else f"{reach:.0f} ({reach / target['n_labels']:.2f})")
            t = entry["time_s"]
            lines.append(f"| {strategy} | {entry['n_seeds']} | " + " | ".join(cells) +
                         f" | {_fmt(entry['cpu_s_mean'])} | {t.get('train', 0):.0f} / {t.get('evaluate', 0):.0f} / "
                         f"{t.get('select', 0):.0f} |")
        lines.append("")
        values = sorted({v for e in summary["strategies"].values() for v in e.get("picked", {}).get("counts", {})})
        if values:
            lines += [f"### {dataset}: what was acquired (pool tag `{PICK_TAG}`, structures per run, mean over seeds; "
                      "initial random picks excluded)", "",
                      "| strategy | " + " | ".join(values) + " | mean max σ_F,epi at pick [eV/Å] |",
                      "|---|" + "---:|" * (len(values) + 1)]
            for strategy, entry in summary["strategies"].items():
                picked = entry.get("picked", {})
                lines.append(f"| {strategy} | " + " | ".join(f"{picked['counts'].get(v, 0):.1f}" for v in values) +
                             f" | {_fmt(picked.get('mean_max_force_sigma_epistemic'))} |")
            lines.append("")
        for set_name in summary["sets"]:
            lines += [f"### {dataset}: {set_name} (mean ± std over seeds)", ""]
            for header, metric, scale in TABLE_METRICS:
                rows = []
                all_labels = sorted({n for e in summary["strategies"].values()
                                     for n in e["curves"][set_name][metric]["n_labels"]})
                if not all_labels:
                    continue
                for strategy, entry in summary["strategies"].items():
                    c = entry["curves"][set_name][metric]
                    cells = {n: f"{scale * m:.3g} ± {scale * sd:.2g}" for n, m, sd in zip(c["n_labels"], c["mean"], c["std"])}
                    rows.append(f"| {strategy} | " + " | ".join(cells.get(n, "–") for n in all_labels) + " |")
                lines += [f"{header}:", "", "| strategy | " + " | ".join(str(n) for n in all_labels) + " |",
                          "|---|" + "---:|" * len(all_labels)] + rows + [""]
    if results.get("findings"):
        lines += ["## Findings", ""] + results["findings"] + [""]
    path.write_text("\n".join(lines) + "\n")
