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
(learning-curve tables, labels needed to reach random's final force MAE on each test set,
CPU time per strategy) and learning-curve plots (force MAE and force NLL per test set, mean ±
std over seeds). Runs go to ``--runs`` (default bench/runs/al); a finished run is not rerun
(one asked for more ``--rounds`` than it holds continues from its last round, its cost added),
so the script can be restarted or extended, and ``--report-only`` only aggregates the runs that exist.

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
from _al_report import (  # noqa: E402
    DATASETS, STRATEGIES, evaluate_energy_only, keep_earlier, plot_curves, summarise, write_markdown,
)


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


def finished_run(run_dir: Path) -> Optional[Dict]:
    """The job record of a run that ended well, with the acquisition rounds it holds (a run asked
    for more rounds later continues from its state.json); None if it did not."""
    job_path, curve_path = run_dir / "job.json", run_dir / "learning_curve.json"
    if not (job_path.exists() and curve_path.exists()):
        return None
    job = json.loads(job_path.read_text())
    if job["returncode"] != 0:
        return None
    return dict(job, n_rounds=len(json.loads(curve_path.read_text())["points"]) - 1)


def run_al_jobs(jobs: List[Dict], slots: int) -> None:
    """Run the AL runs, ``slots`` at once (one thread each, bench/_common.run_jobs); each run's wall
    and CPU seconds go to <run>/job.json as it ends (``--report-only`` can then report the
    finished runs while the others go on)."""
    def record(job: Dict) -> None:
        entry = {k: job[k] for k in ("wall_s", "cpu_s", "returncode")}
        earlier = job.get("earlier")  # a run continued with more rounds: its cost so far is added
        if earlier:
            entry.update(wall_s=entry["wall_s"] + earlier["wall_s"], cpu_s=entry["cpu_s"] + earlier["cpu_s"])
        (job["run_dir"] / "job.json").write_text(json.dumps(entry) + "\n")

    for job in jobs:
        job.update(command=cli_command("al", job["config"]), ranks=1)
    run_jobs(jobs, slots, on_done=record)


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
                earlier = finished_run(run_dir)
                if earlier and earlier["n_rounds"] >= args.rounds:
                    continue
                run_dir.mkdir(parents=True, exist_ok=True)
                config = write_config(al_config(strategy, seed, data[dataset], run_dir, args),
                                      args.out / "configs" / dataset / f"{strategy}_seed{seed}.yaml")
                jobs.append(dict(name=f"{dataset}/{strategy}/seed{seed}", config=config, log=run_dir / "al.log",
                                 run_dir=run_dir, earlier=earlier))
    if not args.report_only:
        print(f"running {len(jobs)} active-learning runs, {args.slots} at once", flush=True)
        run_al_jobs(jobs, args.slots)

    command = command_line("al.py", argv)
    settings = {k: getattr(args, k) for k in ("preset", "members", "n_initial", "batch_size", "rounds", "epochs",
                                              "warmup", "lr", "seeds", "acac_seeds", "slots", "n_valid", "n_test")}
    previous = json.loads((args.out / "results.json").read_text()) if (args.out / "results.json").exists() else {}
    # the same benchmark if every setting but the number of runs at once agrees
    same = {k: v for k, v in (previous.get("settings") or {}).items() if k != "slots"} == \
        {k: v for k, v in settings.items() if k != "slots"}
    results = dict(commit=git_commit(), machine=machine_info(), settings=settings, datasets={})
    results["commands"] = (previous.get("commands", []) if same else []) + [command]
    earlier_wall = previous.get("wall_s") if same else None
    # a report-only call ran nothing: its seconds are not the benchmark's (each run's CPU is in the tables)
    results["wall_s"] = earlier_wall if args.report_only else round(time.time() - started, 1) + (earlier_wall or 0.0)
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
        kept = keep_earlier(summary, previous.get("datasets", {}).get(dataset) if same else None)
        if kept:
            print(f"{dataset}: {', '.join(kept)} kept from the earlier {args.out / 'results.json'}", flush=True)
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
