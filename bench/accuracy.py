#!/usr/bin/env python
"""Accuracy benchmark on acetylacetone: a single RACE model and a deep ensemble.

Trains, under a fixed wall-clock budget per member on CPU,

  (a) a single model (pure MSE on energies and forces), one process, and
  (b) a deep ensemble of K members (MSE warm-up, then NLL_JEF), under
      ``mpirun -np NP`` with one torch thread per rank,

on ``../shared/data/acac/train_300K.xyz`` (450 training / 50 validation structures,
seed 0, reference energies of the isolated atoms), evaluates both posteriors on
``test_MD_300K.xyz`` (in distribution) and ``test_MD_600K.xyz`` (hotter, partly out
of distribution), and writes to ``--out`` (default ``bench/results/accuracy``):

  results.json, results.md      numbers, the exact command, machine and load, budget
  learning_curve.png            validation force / energy RMSE vs elapsed minutes
  configs/                      the two training configs (paths relative to that folder)

Run directories (checkpoints, posteriors, logs, prediction arrays, and in ``<run>/report/`` the
evaluate_sets reports: metrics.json, report.md, parity plots) go to ``--runs`` (default
``bench/runs/accuracy``, git-ignored), not into the results.

The data set and the training-history analysis live in bench/_accuracy_history.py, results.md
in bench/_accuracy_report.py, the helpers every benchmark shares in bench/_common.py.

    python bench/accuracy.py                         # 8 min per member, 4 members, -np 2
    python bench/accuracy.py --minutes 0.5 --members 2 --out /tmp/acc_smoke --runs /tmp/acc_smoke_runs
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Dict

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _accuracy_history import (  # noqa: E402  (bench helpers: bench/ is not a package)
    ISOLATED_FILE, MACE_REFERENCE, N_ATOMS, TEST_SETS, TRAIN_FILE, history_summary, learning_curve_table,
    loss_switch_effect, per_doubling, plot_learning_curve, read_history,
)
from _accuracy_report import comparison_text, write_markdown  # noqa: E402
from _common import (  # noqa: E402
    BENCH_DIR, REPO, cli_command, git_commit, installed_package_hash, machine_info, timed_job, write_config,
    write_json,
)

# seconds per epoch of the `small` preset on this CPU, one thread, 450 structures, batch 8
# (measured: ~5 s on an otherwise idle core, 7-11 s with other jobs on the machine); used only to
# turn the MSE warm-up fraction into epochs when the single model has not just measured it
EPOCH_SECONDS_ESTIMATE = 8.0
# the ensemble's ranks run beside each other (and beside other jobs): slower epochs than the single model
ENSEMBLE_SLOWDOWN = 1.25


# ----------------------------------------------------------------------------------------
# configs


def _rel(path: Path, start: Path) -> str:
    return os.path.relpath(Path(path).resolve(), Path(start).resolve())


def make_config(
    config_dir: Path, run_dir: Path, *, members: int, loss: str, warmup_epochs: int, args
) -> Dict:
    """A training config whose paths are relative to ``config_dir`` (where it will be written)."""
    return {
        "out": _rel(run_dir, config_dir),
        "seed": args.seed,
        "dtype": "float64",
        "data": {
            "train": _rel(TRAIN_FILE, config_dir),
            "n_valid": 50,
            "reference_energies": "isolated",
            "isolated_atoms": _rel(ISOLATED_FILE, config_dir),
        },
        "model": {"preset": args.preset},
        "loss": {"kind": loss, "energy_weight": 1.0, "force_weight": 1.0, "mse_warmup_epochs": warmup_epochs,
                 **({"means": args.means} if loss != "mse" else {})},
        "training": {
            "optimizer": "adamw",
            "lr": args.lr,
            "weight_decay": 0.0,
            "batch_size": 8,
            "max_epochs": 100000,  # the wall-clock budget is what stops training
            "max_minutes": args.minutes,
            "early_stopping_patience": 100000,  # off: every run uses its whole budget
            "lr_factor": 0.5,
            "lr_patience": 5,
            "min_lr": 1e-5,
            "ema_decay": 0.99,
            "grad_clip": 10.0,
            "threads": 1,
        },
        "ensemble": {"members": members},
    }



def run_training(config_path: Path, log_path: Path, ranks: int) -> Dict:
    """Run ``bayesrace train`` (under mpirun when ranks > 1); wall and CPU seconds, load samples."""
    return timed_job(config_path.parent.name, cli_command("train", config_path, ranks), log_path, ranks)


# ----------------------------------------------------------------------------------------
# evaluation


def evaluate(posterior_path: Path, report_dir: Path, keep_dir: Path) -> Dict:
    """evaluate_sets on the two MD test sets, plus per-member errors from the member predictions."""
    import torch

    from bayesrace import keys
    from bayesrace.uq import evaluate_sets, reference_key
    from bayesrace.bayes import load_posterior

    torch.set_num_threads(1)
    posterior = load_posterior(posterior_path)
    started = time.time()
    sets = {k: str(v) for k, v in TEST_SETS.items()}
    problem = None
    try:
        metrics = evaluate_sets(posterior, sets, report_dir=report_dir, progress=False)["sets"]
    except ValueError as error:
        # an MSE-trained posterior reports zero variance from its untrained heads, which
        # evaluate_sets' Gaussian NLL refuses; evaluate it with the (meaningless) raw heads
        # switched back on, so the error metrics and parity plots still come out
        if "sigma" not in str(error) or not all(hasattr(m, "set_trained_heads") for m in posterior.members):
            raise
        problem = (
            f"evaluate_sets failed on an MSE-trained posterior ({posterior_path.name}): `{error}` "
            "(its untrained heads now report zero variance, and set_metrics computes a Gaussian NLL "
            "unconditionally); evaluated instead with the raw heads switched on, so its σ's are meaningless "
            "(the benchmark reports none for it)"
        )
        for member in posterior.members:
            member.set_trained_heads(["energy", "forces"])
        metrics = evaluate_sets(posterior, sets, report_dir=report_dir, progress=False)["sets"]
    seconds = time.time() - started
    members: Dict[str, Dict] = {}
    keep_dir.mkdir(parents=True, exist_ok=True)
    for name in TEST_SETS:
        npz = report_dir / f"predictions_{name}.npz"
        with np.load(npz) as prediction:
            e_ref = prediction[reference_key(keys.ENERGY)]
            f_ref = prediction[reference_key(keys.FORCES)]
            e_m = prediction[keys.MEMBER_ENERGY]  # [M, B]
            f_m = prediction[keys.MEMBER_FORCES]  # [M, N, 3]
            n_at = prediction[keys.NUM_ATOMS]
        rows = []
        for m in range(e_m.shape[0]):
            de, df = e_m[m] - e_ref, f_m[m] - f_ref
            rows.append({
                "energy_rmse_meV": 1000 * float(np.sqrt(np.mean(de**2))),
                "energy_mae_meV": 1000 * float(np.mean(np.abs(de))),
                "energy_rmse_meV_per_atom": 1000 * float(np.sqrt(np.mean((de / n_at) ** 2))),
                "forces_rmse_meV_per_A": 1000 * float(np.sqrt(np.mean(df**2))),
                "forces_mae_meV_per_A": 1000 * float(np.mean(np.abs(df))),
            })
        members[name] = rows
        # prediction arrays are large and reproducible: keep them with the run, not the results
        shutil.move(str(npz), keep_dir / npz.name)
    return {"metrics": metrics, "members": members, "evaluation_s": round(seconds, 1), "problem": problem}


def headline(metrics: Dict) -> Dict:
    """The numbers of the results table in meV units."""
    out = {
        "energy_mae_meV": 1000 * metrics["energy_mae_eV"],
        "energy_rmse_meV": 1000 * metrics["energy_rmse_eV"],
        "energy_mae_meV_per_atom": metrics["energy_mae_meV_per_atom"],
        "energy_rmse_meV_per_atom": metrics["energy_rmse_meV_per_atom"],
        "forces_mae_meV_per_A": 1000 * metrics["forces_mae_eV_per_A"],
        "forces_rmse_meV_per_A": 1000 * metrics["forces_rmse_eV_per_A"],
    }
    return {k: round(v, 4) for k, v in out.items()}


def uncertainty(metrics: Dict) -> Dict:
    out = {
        "energy_sigma_mean_meV": N_ATOMS * metrics["energy_sigma_mean_meV_per_atom"],
        "energy_sigma_epistemic_mean_meV": N_ATOMS * metrics["energy_sigma_epistemic_mean_meV_per_atom"],
        "forces_sigma_mean_meV_per_A": 1000 * metrics["forces_sigma_mean_eV_per_A"],
        "forces_sigma_epistemic_mean_meV_per_A": 1000 * metrics["forces_sigma_epistemic_mean_eV_per_A"],
        "forces_sigma_aleatoric_mean_meV_per_A": 1000 * metrics["forces_sigma_aleatoric_mean_eV_per_A"],
        "spearman_energy": metrics.get("spearman_energy"),
        "spearman_forces": metrics.get("spearman_forces"),
        "energy_coverage_95": metrics.get("energy_coverage_95"),
        "forces_coverage_95": metrics.get("forces_coverage_95"),
    }
    return {k: (None if v is None or not math.isfinite(v) else round(v, 4)) for k, v in out.items()}


# ----------------------------------------------------------------------------------------
# report

# ----------------------------------------------------------------------------------------
# main


def ensemble_warmup(args, results: Dict):
    """MSE epochs of the ensemble members: a fraction of the epochs the budget is expected to buy."""
    if args.warmup_epochs is not None:
        return args.warmup_epochs, "given with --warmup-epochs"
    single = results["runs"].get("single")
    measured = single["history"][0].get("s_per_epoch") if single and single["history"] else None
    seconds = (measured or EPOCH_SECONDS_ESTIMATE) * ENSEMBLE_SLOWDOWN
    epochs = max(1, round(args.warmup_fraction * args.minutes * 60.0 / seconds))
    source = f"the single model's measured {measured} s/epoch" if measured else f"an assumed {EPOCH_SECONDS_ESTIMATE} s/epoch"
    return epochs, (f"≈{args.warmup_fraction:.0%} of the budget, from {source} × {ENSEMBLE_SLOWDOWN} for "
                    "ranks running side by side")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=8.0, help="wall-clock training budget per member")
    parser.add_argument("--members", type=int, default=4, help="ensemble members")
    parser.add_argument("--np", type=int, default=2, dest="ranks", help="MPI ranks for the ensemble")
    parser.add_argument("--preset", default="small", help="model preset (tiny, small, medium, paper)")
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup-fraction", type=float, default=0.4,
                        help="fraction of the budget (in estimated epochs) the ensemble trains with MSE")
    parser.add_argument("--warmup-epochs", type=int, default=None,
                        help="MSE epochs of the ensemble (default: from --warmup-fraction and the single "
                             "model's measured epoch time)")
    parser.add_argument("--means", choices=("nll", "mse", "frozen"), default="nll",
                        help="the ensemble's loss.means: nll (joint NLL_JEF), mse (means by MSE, the NLL trains "
                             "the variance heads; no MSE warm-up unless --warmup-epochs) or frozen (MSE, then the "
                             "heads alone on the frozen network for loss.heads_fraction 0.2 of the budget)")
    parser.add_argument("--out", default=str(BENCH_DIR / "results" / "accuracy"), help="results folder")
    parser.add_argument("--runs", default=str(BENCH_DIR / "runs" / "accuracy"),
                        help="run directories (checkpoints): keep out of the results")
    parser.add_argument("--resume", action="store_true",
                        help="keep existing run directories (finished runs are only evaluated)")
    parser.add_argument("--skip-single", action="store_true")
    parser.add_argument("--skip-ensemble", action="store_true")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild results.md, results.json and learning_curve.png from --out/results.json "
                             "and the metrics.jsonl files under --runs, without training or evaluating")
    parser.add_argument("--note", action="append", default=[],
                        help="a note to print under 'Machine and load' (repeatable; with --report-only, added "
                             "to the notes already there)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    runs = Path(args.runs).resolve()
    if runs == out or out in runs.parents:
        raise SystemExit(f"--runs ({runs}) must not lie inside --out ({out}): checkpoints stay out of the results")
    for path in [TRAIN_FILE, ISOLATED_FILE, *TEST_SETS.values()]:
        if not path.is_file():
            raise SystemExit(f"{path}: missing (the acac data set is expected in ../shared/data/acac)")
    if args.report_only:
        results = json.loads((out / "results.json").read_text())
        results["notes"] = list(results.get("notes", [])) + [n for n in args.note if n not in results.get("notes", [])]
        if "runtime_problems" not in results:  # a results.json written before problems were split
            results["runtime_problems"] = [p for p in results.get("problems", []) if "evaluate_sets" in p
                                           or "exited with status" in p]
        return finalize(results, runs, out)
    out.mkdir(parents=True, exist_ok=True)
    runs.mkdir(parents=True, exist_ok=True)

    from bayesrace.model import PRESETS

    try:
        cwd_rel = os.path.relpath(Path.cwd(), REPO)
    except ValueError:
        cwd_rel = str(Path.cwd())
    command = " ".join(shlex.quote(a) for a in ["python", os.path.relpath(Path(sys.argv[0]).resolve(), Path.cwd())]
                       + sys.argv[1:])
    if cwd_rel != ".":
        command = f"(cd {shlex.quote(cwd_rel)}) " + command
    command = "OMP_NUM_THREADS=1 " + command if os.environ.get("OMP_NUM_THREADS") == "1" else command

    plan = {
        "single": dict(members=1, loss="mse", warmup_epochs=0, ranks=1, skip=args.skip_single),
        "ensemble": dict(members=args.members, loss="nll_jef",
                         warmup_epochs=0 if args.means in ("mse", "frozen") and args.warmup_epochs is None else None,
                         ranks=args.ranks,
                         skip=args.skip_ensemble),
    }
    results: Dict = {
        "command": command,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "installed_bayesrace_sha": {"start": installed_package_hash()},
        "machine": machine_info(),
        "seed": args.seed,
        "data": {"train": "../shared/data/acac/train_300K.xyz", "n_train": 450, "n_valid": 50,
                 "tests": {k: f"../shared/data/acac/{v.name}" for k, v in TEST_SETS.items()}},
        "model_config": ", ".join(f"{k}={v}" for k, v in PRESETS[args.preset].items()),
        "budget": {
            "minutes_per_member": args.minutes,
            "members": args.members,
            "ranks": args.ranks,
            "preset": args.preset,
            "lr": args.lr,
            "ensemble_means": args.means,
            "ensemble_mse_warmup_epochs": None,
            "ensemble_warmup_basis": None,
            "threads_per_process": 1,
        },
        "mace_reference": MACE_REFERENCE,
        "runs_dir": os.path.relpath(runs, REPO) if REPO in runs.parents else str(runs),
        "runs": {},
        "runtime_problems": [],
        "notes": list(args.note),
    }
    print(f"accuracy benchmark: {args.minutes} min per member, single model + {args.members}-member ensemble on "
          f"-np {args.ranks}; results -> {out}; runs -> {runs}", flush=True)
    print(f"machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, "
          f"load {' '.join(results['machine']['load_at_start'])}", flush=True)

    for name, p in plan.items():
        if p["skip"]:
            continue
        run_dir = runs / name
        if p["warmup_epochs"] is None:
            p["warmup_epochs"], basis = ensemble_warmup(args, results)
            results["budget"]["ensemble_mse_warmup_epochs"] = p["warmup_epochs"]
            results["budget"]["ensemble_warmup_basis"] = basis
        if run_dir.exists() and not args.resume:
            shutil.rmtree(run_dir)
        values = make_config(run_dir, run_dir, members=p["members"], loss=p["loss"],
                             warmup_epochs=p["warmup_epochs"], args=args)
        config_path = write_config(values, run_dir / "config.yaml")
        write_config(make_config(out / "configs", run_dir, members=p["members"], loss=p["loss"],
                                 warmup_epochs=p["warmup_epochs"], args=args), out / "configs" / f"{name}.yaml")
        print(f"\n== training {name}: {p['members']} member(s), loss {p['loss']}"
              f"{' after ' + str(p['warmup_epochs']) + ' MSE epochs' if p['warmup_epochs'] else ''}, "
              f"{p['ranks']} rank(s)", flush=True)
        training = run_training(config_path, run_dir / "train.log", p["ranks"])
        print(f"  finished in {training['wall_s'] / 60:.1f} min (rc {training['returncode']}), "
              f"CPU/rank/wall {training['cpu_per_rank_per_wall']}, load {training['load']}", flush=True)
        histories = read_history(run_dir, p["members"])
        run = {"training": training, "history": [history_summary(h) for h in histories], "loss": p["loss"],
               "mse_warmup_epochs": p["warmup_epochs"]}
        results["runs"][name] = run
        write_json(out / "results.partial.json", results)
        if training["returncode"] != 0:
            tail = (run_dir / "train.log").read_text().splitlines()[-15:]
            results["runtime_problems"].append(f"{name}: training exited with status {training['returncode']}; log tail: "
                                       + " | ".join(tail))
            print("\n".join(tail), file=sys.stderr)
            continue
        print(f"== evaluating {name}", flush=True)
        # the evaluate_sets report (plots, per-set metrics) stays with the run, out of the results
        evaluated = evaluate(run_dir / "posterior.pt", run_dir / "report", run_dir / "predictions")
        run["evaluation_s"] = evaluated["evaluation_s"]
        if evaluated["problem"]:
            results["runtime_problems"].append(evaluated["problem"])
        run["test"] = {}
        for set_name, metrics in evaluated["metrics"].items():
            member_rows = evaluated["members"][set_name]
            entry = {
                "errors": headline(metrics),
                "members": [{k: round(v, 4) for k, v in r.items()} for r in member_rows],
                "members_mean": {k: round(float(np.mean([r[k] for r in member_rows])), 4) for k in member_rows[0]},
            }
            if p["members"] > 1:
                entry["uncertainty"] = uncertainty(metrics)
            run["test"][set_name] = entry
        from bayesrace.uq import format_table

        print(format_table(evaluated["metrics"]), flush=True)

    results["installed_bayesrace_sha"]["end"] = installed_package_hash()
    return finalize(results, runs, out)


def finalize(results: Dict, runs: Path, out: Path) -> int:
    """Everything derived from the runs' metrics.jsonl and the raw results: learning curve,
    plot, diagnostics, comparison, results.json and results.md (rerun by --report-only)."""
    minutes = results["budget"]["minutes_per_member"]
    problems = list(results.get("runtime_problems", []))
    histories = {
        name: read_history(runs / name, len(run["history"])) for name, run in results["runs"].items()
    }
    for name, run in results["runs"].items():
        run["history"] = [history_summary(h) for h in histories[name]]
        for member, summary in enumerate(run["history"]):
            if not summary.get("all_finite", True):
                problems.append(f"{name} member {member}: non-finite loss or RMSE in metrics.jsonl")
            jumps = summary.get("valid_force_rmse_jumps_epochs")
            if jumps:
                at_switch = summary.get("first_epoch_of_second_loss") in jumps
                problems.append(
                    f"{name} member {member}: validation force RMSE jumped above twice its best so far at "
                    f"epoch(s) {jumps}" + (" (the first epochs of NLL_JEF: see the loss-switch table)"
                                           if at_switch else " (see learning_curve.png)")
                )
    single_rows = (histories.get("single") or [[]])[0]
    member_rows = histories.get("ensemble") or []
    marks = [t for t in (0.5, 1, 2, 4, 8, 16, 32) if t <= minutes + 1e-9]
    if minutes not in marks:
        marks.append(minutes)
    results["learning_curve"] = learning_curve_table(single_rows, member_rows, marks)
    slopes = [per_doubling(rows, minutes) for rows in member_rows]
    slopes = [x for x in slopes if x is not None]
    results["per_doubling"] = {
        "single": per_doubling(single_rows, minutes) if single_rows else None,
        "members_mean": round(float(np.mean(slopes)), 3) if slopes else None,
    }
    results["lr_decayed"] = any(
        r["lr"] < results["budget"]["lr"] for rows in [single_rows] + member_rows for r in rows
    )
    results["loss_switch"] = [loss_switch_effect(rows) for rows in member_rows]
    if single_rows or member_rows:
        plot_learning_curve(single_rows, member_rows, out / "learning_curve.png", minutes)

    loads = [r["training"]["cpu_per_rank_per_wall"] for r in results["runs"].values()
             if r["training"].get("cpu_per_rank_per_wall") is not None]
    if loads and min(loads) < 0.85:
        results["load_note"] = (
            f"the processes got only {min(loads):.2f} CPU-seconds per rank per wall-second in the busiest run: "
            "the machine was oversubscribed (other jobs), so each member did fewer epochs than on idle cores "
            "and the numbers understate what this budget buys on a free machine."
        )
    if results["installed_bayesrace_sha"]["end"] != results["installed_bayesrace_sha"]["start"]:
        problems.append(
            "the installed bayesrace package changed while this benchmark ran (sha "
            f"{results['installed_bayesrace_sha']['start']} → {results['installed_bayesrace_sha']['end']}): "
            "someone reinstalled it; the two runs may have used different code"
        )
    results["problems"] = problems
    results["comparison"] = comparison_text(results)
    write_json(out / "results.json", results)
    (out / "results.partial.json").unlink(missing_ok=True)
    write_markdown(results, out / "results.md")
    print(f"\nresults: {out / 'results.md'}", flush=True)
    return 1 if any("exited with status" in p for p in problems) else 0


if __name__ == "__main__":
    sys.exit(main())
