#!/usr/bin/env python
"""Active-learning benchmark: BALD against energy σ and random picks, pool-based, on PSB3 and acetylacetone.

Every run is ``bayesrace al`` (``bayesrace.active.run_pool_al``) with the same posterior for every strategy
(a deep ensemble of ``--members`` NLL_JEF members, warm-started from the previous round), the same
initial random picks per seed and the labels already in the pool (oracle ``from_pool``: no
DFT/xTB is recomputed). Strategies: bald_ef, bald_e, bald_f, energy_std, random. The seed
changes the initial picks, the training initialisation and the random strategy.

Data (test sets are disjoint from the pool; the validation set is fixed, outside the pool, and
is not counted as labels — it only steers the learning-rate schedule):

  psb3  bench/runs/uq/data_psb3 (made by bayesrace.data.generate_psb3(seed=0) if missing).
        pool = train.xyz (400 frames, 300–600 K) + the first half of test_ood_hot.xyz
        (100 frames, 1000–1500 K); tests: test_id, ood_hot (the held-out second half),
        ood_torsion; valid: the first --n-valid frames of valid.xyz
  acac  ../shared/data/acac: pool = train_600K.xyz + train_300K.xyz (1000 frames);
        test_MD_300K is split (seed 0) into --n-valid validation frames and --n-test test
        frames; tests: test_MD_300K, test_MD_600K (--n-test random frames), test_dihedral
        (energies only: no force metrics); reference energies from isolated_atoms.xyz

Outputs in ``--out`` (default bench/results/al): configs/, results.json, results.md
(learning-curve tables, labels needed to reach random's final in-distribution force MAE,
CPU time per strategy) and learning-curve plots (force MAE and force NLL per test set, mean ±
std over seeds). Runs go to ``--runs`` (default bench/runs/al); a finished run is not rerun,
so the script can be restarted, and ``--report-only`` only aggregates the runs that exist.

    python bench/al.py                                  # both data sets, 5 strategies, 3 seeds
    python bench/al.py --datasets psb3 --seeds 0 --rounds 2 --epochs 3 --out /tmp/al --runs /tmp/al_runs
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402  (bench helpers: bench/ is not a package)
    ACAC_DIR, BENCH_DIR, PSB3_DIR, cli_command, command_line, git_commit, machine_info, psb3_data, run_jobs,
    write_config, write_frames, write_json,
)

STRATEGIES = ("bald_ef", "bald_e", "bald_f", "energy_std", "random")
DATASETS = ("psb3", "acac")
IN_DISTRIBUTION = {"psb3": "test_id", "acac": "test_MD_300K"}  # the set of the "half the data" number
PLOT_METRICS = (("forces_mae_eV_per_A", "force MAE [eV/Å]"), ("forces_nll", "force NLL (per component)"))
TABLE_METRICS = (("F MAE [meV/Å]", "forces_mae_eV_per_A", 1000.0), ("NLL F", "forces_nll", 1.0),
                 ("E RMSE [meV/at]", "energy_rmse_meV_per_atom", 1.0), ("NLL E", "energy_nll", 1.0))
COLOURS = {"bald_ef": "C3", "bald_e": "C1", "bald_f": "C0", "energy_std": "C2", "random": "k"}


# ----------------------------------------------------------------------------------------
# data


def prepare_psb3(runs: Path, args) -> Dict:
    import ase.io

    source = psb3_data(PSB3_DIR)
    data = runs / "data_psb3"
    pool = data / "pool.xyz"
    if not pool.exists():
        hot = ase.io.read(source / "test_ood_hot.xyz", ":")
        half = len(hot) // 2
        write_frames(data / "valid.xyz", ase.io.read(source / "valid.xyz", f":{args.n_valid}"))
        write_frames(data / "ood_hot_test.xyz", hot[half:])
        write_frames(pool, ase.io.read(source / "train.xyz", ":") + hot[:half])
    return {
        "pool": pool,
        "valid": data / "valid.xyz",
        "isolated": source / "isolated_atoms.xyz",
        "test": {
            "test_id": source / "test_id.xyz",
            "ood_hot": data / "ood_hot_test.xyz",
            "ood_torsion": source / "test_ood_torsion.xyz",
        },
    }


def prepare_acac(runs: Path, args) -> Dict:
    import ase.io

    data = runs / "data_acac"
    pool = data / "pool.xyz"
    if not pool.exists():
        rng = np.random.default_rng(0)
        md300 = ase.io.read(ACAC_DIR / "test_MD_300K.xyz", ":")
        order = rng.permutation(len(md300))
        write_frames(data / "valid.xyz", [md300[k] for k in order[:args.n_valid]])
        write_frames(data / "test_MD_300K.xyz", [md300[k] for k in order[args.n_valid:args.n_valid + args.n_test]])
        md600 = ase.io.read(ACAC_DIR / "test_MD_600K.xyz", ":")
        write_frames(data / "test_MD_600K.xyz", [md600[k] for k in rng.permutation(len(md600))[:args.n_test]])
        write_frames(pool, ase.io.read(ACAC_DIR / "train_600K.xyz", ":") + ase.io.read(ACAC_DIR / "train_300K.xyz", ":"))
    return {
        "pool": pool,
        "valid": data / "valid.xyz",
        "isolated": ACAC_DIR / "isolated_atoms.xyz",
        "test": {
            "test_MD_300K": data / "test_MD_300K.xyz",
            "test_MD_600K": data / "test_MD_600K.xyz",
        },
        # run_pool_al reads its test sets with forces required: energy-only sets are
        # evaluated afterwards on every round's posterior (evaluate_energy_only)
        "energy_only": {"test_dihedral": ACAC_DIR / "test_dihedral.xyz"},
    }


# ----------------------------------------------------------------------------------------
# configs and jobs


def al_config(strategy: str, seed: int, data: Dict, run_dir: Path, args) -> Dict:
    """The ``bayesrace al`` config of one run; only strategy and seed differ between runs."""
    training = {
        "seed": seed,
        "data": {
            "valid": str(data["valid"]),
            "reference_energies": "isolated",
            "isolated_atoms": str(data["isolated"]),
        },
        "model": {"preset": args.preset},
        "loss": {"kind": "nll_jef", "mse_warmup_epochs": args.warmup},
        "posterior": {"kind": "ensemble"},
        "ensemble": {"members": args.members},
        "training": {
            "batch_size": 8,
            "lr": args.lr,
            "max_epochs": args.epochs,
            "early_stopping_patience": 10 * args.epochs,  # off: every round gets every epoch
            "lr_patience": 5,
            "threads": 1,
        },
    }
    return {
        "mode": "pool",
        "out": str(run_dir),
        "pool": str(data["pool"]),
        "n_initial": args.n_initial,
        "seed": seed,
        "strategy": strategy,
        "batch_size": args.batch_size,
        "n_rounds": args.rounds,
        "batch_aware": True,
        "warm_start": True,
        "training": training,
        "test": {name: str(path) for name, path in data["test"].items()},
        "oracle": {"kind": "from_pool"},
    }


def run_al_jobs(jobs: List[Dict], slots: int) -> None:
    """Run the AL runs, ``slots`` at once (one thread each, bench/_common.run_jobs); each run's wall
    and CPU seconds go to <run>/job.json."""
    for job in jobs:
        job.update(command=cli_command("al", job["config"]), ranks=1)
    run_jobs(jobs, slots)
    for job in jobs:
        record = {k: job[k] for k in ("wall_s", "cpu_s", "returncode")}
        (job["run_dir"] / "job.json").write_text(json.dumps(record) + "\n")


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
            time_s=_time_split(per_seed),
            per_seed={str(seed): e["points"] for seed, e in per_seed.items()})
    # "half the data": labels each strategy needs to reach random's final in-distribution force MAE
    target_set = IN_DISTRIBUTION[dataset]
    random = summary["strategies"].get("random")
    if random:
        curve = random["curves"][target_set]["forces_mae_eV_per_A"]
        if curve["n_labels"]:
            target, final_labels = curve["mean"][-1], curve["n_labels"][-1]
            summary["target"] = dict(set=target_set, forces_mae_eV_per_A=target, n_labels=final_labels)
            for entry in summary["strategies"].values():
                c = entry["curves"][target_set]["forces_mae_eV_per_A"]
                entry["labels_to_random_final"] = labels_to_reach(c["n_labels"], np.array(c["mean"]), target)
    return summary


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
        f"{results['wall_s']:.0f} s  ",
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
        target = summary.get("target")
        lines += [f"### {dataset}: labels needed to reach random's final force MAE on {IN_DISTRIBUTION[dataset]}", ""]
        if target:
            lines += [f"Target: {1000 * target['forces_mae_eV_per_A']:.1f} meV/Å (random, mean over seeds, at "
                      f"{target['n_labels']} labels); linear interpolation on each mean curve.", ""]
        lines += ["| strategy | seeds | labels to target | fraction of random's | CPU s per run (mean) | "
                  "train / evaluate / select wall s per run |", "|---|---:|---:|---:|---:|---|"]
        for strategy, entry in summary["strategies"].items():
            reach = entry.get("labels_to_random_final")
            fraction = f"{reach / target['n_labels']:.2f}" if (reach is not None and target) else "–"
            t = entry["time_s"]
            lines.append(f"| {strategy} | {entry['n_seeds']} | "
                         f"{'not reached' if reach is None and target else _fmt(reach)} | {fraction} | "
                         f"{_fmt(entry['cpu_s_mean'])} | {t.get('train', 0):.0f} / {t.get('evaluate', 0):.0f} / "
                         f"{t.get('select', 0):.0f} |")
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


# ----------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--acac-seeds", nargs="+", type=int, default=None,
                        help="seeds for acac if fewer than --seeds fit the budget")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--n-initial", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=12, help="epochs per round")
    parser.add_argument("--warmup", type=int, default=2, help="MSE warm-up epochs before the NLL loss, per round")
    parser.add_argument("--lr", type=float, default=0.005)
    parser.add_argument("--n-valid", type=int, default=30)
    parser.add_argument("--n-test", type=int, default=150, help="frames of each acac MD test set")
    parser.add_argument("--slots", type=int, default=2, help="runs at once (one thread each)")
    parser.add_argument("--report-only", action="store_true", help="aggregate the existing runs, run nothing")
    parser.add_argument("--findings", type=Path, default=None, help="a text file of findings appended to results.md")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "al")
    parser.add_argument("--runs", type=Path, default=BENCH_DIR / "runs" / "al")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.runs.mkdir(parents=True, exist_ok=True)
    started = time.time()
    prepare = {"psb3": prepare_psb3, "acac": prepare_acac}
    data = {name: prepare[name](args.runs, args) for name in args.datasets}
    seeds = {d: (args.acac_seeds if d == "acac" and args.acac_seeds is not None else args.seeds)
             for d in args.datasets}

    jobs = []
    # seed-major order: if time runs out, every strategy has its first seeds on both data sets
    for seed_rank in range(max(len(s) for s in seeds.values())):
        for dataset in args.datasets:
            if seed_rank >= len(seeds[dataset]):
                continue
            seed = seeds[dataset][seed_rank]
            for strategy in args.strategies:
                run_dir = args.runs / dataset / strategy / f"seed{seed}"
                if (run_dir / "job.json").exists() and json.loads((run_dir / "job.json").read_text())["returncode"] == 0:
                    continue
                run_dir.mkdir(parents=True, exist_ok=True)
                config = write_config(al_config(strategy, seed, data[dataset], run_dir, args),
                                      args.out / "configs" / dataset / f"{strategy}_seed{seed}.yaml")
                jobs.append(dict(name=f"{dataset}/{strategy}/seed{seed}", config=config, log=run_dir / "al.log",
                                 run_dir=run_dir))
    if not args.report_only:
        print(f"running {len(jobs)} active-learning runs, {args.slots} at once", flush=True)
        run_al_jobs(jobs, args.slots)

    command = command_line("al.py", argv)
    settings = {k: getattr(args, k) for k in ("preset", "members", "n_initial", "batch_size", "rounds", "epochs",
                                              "warmup", "lr", "seeds", "acac_seeds", "slots", "n_valid", "n_test")}
    previous = json.loads((args.out / "results.json").read_text()) if (args.out / "results.json").exists() else {}
    results = dict(commit=git_commit(), machine=machine_info(), settings=settings, datasets={})
    results["commands"] = (previous.get("commands", []) if previous.get("settings") == settings else []) + [command]
    results["wall_s"] = round(time.time() - started, 1) + (previous.get("wall_s", 0.0)
                                                           if previous.get("settings") == settings else 0.0)
    for dataset in args.datasets:
        energy_only = data[dataset].get("energy_only", {})
        if energy_only:
            for strategy in args.strategies:
                for seed in seeds[dataset]:
                    run_dir = args.runs / dataset / strategy / f"seed{seed}"
                    if (run_dir / "learning_curve.json").exists():
                        evaluate_energy_only(run_dir, energy_only)
        sets = list(data[dataset]["test"]) + list(energy_only)
        summary = summarise(args.runs, dataset, sets, seeds[dataset])
        results["datasets"][dataset] = summary
        plot_curves(summary, dataset, args.out / f"{dataset}_learning_curves.png")
    if args.findings is not None:
        results["findings"] = [line for line in args.findings.read_text().splitlines()]
    write_json(args.out / "results.json", results, indent=1, default=str)
    write_markdown(results, args.out / "results.md")
    print(f"results: {args.out / 'results.md'} ({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
