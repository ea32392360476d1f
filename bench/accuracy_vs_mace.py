#!/usr/bin/env python
"""Accuracy and speed on acetylacetone: RACE (bayesrace) vs MACE, trained side by side.

Both models train at the same time, one process and one torch thread each, for the same wall
budget, float64, on the same 450 / 50 split of ``../shared/data/acac/train_300K.xyz`` (the split
of bench/accuracy.py, written to extxyz files), with the isolated-atom reference energies:

  MACE       mace-torch (from the package index) in its own venv, created once by this script
             (``--mace-venv``, default bench/runs/mace_venv: mace-torch pins e3nn 0.4.4), trained by
             ``mace_run_train`` (64 channels, max_L 1, 2 interactions, r_max 5 Å, E/F weights 1/100);
  RACE       ``bayesrace train`` with a one-member MSE config (preset ``--preset``, as the single
             model of bench/accuracy.py).

Then both are evaluated through their ASE calculators by the same harness (bench/_mace_eval.py,
run in each model's environment): E and F errors on test_MD_300K and test_MD_600K, and the time of
one energy+forces call on the 960-atom acac box (30 Å periodic cell) and on one molecule.

Writes to ``--out`` (default bench/results/accuracy_vs_mace): results.json, results.md,
learning_curve.png (validation force / energy RMSE vs CPU minutes, both models), and while it runs
results.partial.json. Run directories (split files, checkpoints, logs, predictions) go to
``--runs`` (default bench/runs/accuracy_vs_mace, git-ignored).

    python bench/accuracy_vs_mace.py --minutes 10
    python bench/accuracy_vs_mace.py --minutes 1.5 --out /tmp/acc_mace_smoke --runs /tmp/acc_mace_smoke_runs
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _accuracy_history import TEST_SETS, TRAIN_FILE, ISOLATED_FILE  # noqa: E402  (bench/ is not a package)
from _common import (  # noqa: E402
    BENCH_DIR, REPO, RUNS_DIR, SINGLE_THREAD_ENV, command_line, git_commit, installed_package_hash, machine_info,
    uptime, write_config, write_json,
)
from _mace_env import ensure_mace_venv, venv_python  # noqa: E402
from _mace_report import comparisons, curve_table, errors, plot, reference, write_markdown  # noqa: E402
from _mace_train import (  # noqa: E402
    Job, finish_mace, isolated_energies, mace_command, mace_rows, mace_settings, race_config, race_model_overrides,
    race_rows,
    train_side_by_side, write_split,
)

DATA_BENCH = (REPO / ".." / "shared" / "data" / "bench").resolve()
SPEED_STRUCTURES = {"acac_64_box": DATA_BENCH / "acac_64_box.xyz", "acac_1": DATA_BENCH / "acac_1.xyz"}
EVAL_SCRIPT = Path(__file__).resolve().parent / "_mace_eval.py"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-clock training budget per model")
    parser.add_argument("--seed", type=int, default=0, help="split and training seed (both models)")
    parser.add_argument("--out", default=str(BENCH_DIR / "results" / "accuracy_vs_mace"), help="results folder")
    parser.add_argument("--runs", default=str(RUNS_DIR / "accuracy_vs_mace"), help="run directories (git-ignored)")
    parser.add_argument("--mace-venv", default=str(RUNS_DIR / "mace_venv"), help="MACE's venv (created if missing)")
    parser.add_argument("--mace-spec", default="mace-torch", help="pip requirement of MACE, e.g. mace-torch==0.3.16")
    parser.add_argument("--mace-batch-size", type=int, default=5)
    parser.add_argument("--mace-lr", type=float, default=0.01)
    parser.add_argument("--mace-energy-weight", type=float, default=1.0)
    parser.add_argument("--mace-forces-weight", type=float, default=100.0)
    parser.add_argument("--mace-extra", default="",
                        help="more mace_run_train options, appended (later options win), e.g. "
                             "'--swa --start_swa 20' or '--E0s average'")
    parser.add_argument("--mace-grace-minutes", type=float, default=None,
                        help="MACE is stopped at budget + this at the latest, even inside an epoch "
                             "(default: max(2, budget / 4))")
    parser.add_argument("--preset", default="small", help="bayesrace model preset")
    parser.add_argument("--race-model", action="append", metavar="KEY=VALUE",
                        help="override one field of the preset (repeatable), e.g. l_max=2")
    parser.add_argument("--race-lr", type=float, default=5e-3)
    parser.add_argument("--race-schedule", choices=("plateau", "cosine"), default="plateau",
                        help="bayesrace training.schedule (cosine: constant, then decay over the budget's last "
                             "--race-decay-fraction)")
    parser.add_argument("--race-decay-fraction", type=float, default=0.25)
    parser.add_argument("--race-energy-weight", type=float, default=1.0)
    parser.add_argument("--race-force-weight", type=float, default=1.0)
    parser.add_argument("--box", type=float, default=30.0, help="cubic periodic cell [Å] of the 960-atom speed box")
    parser.add_argument("--speed-seconds", type=float, default=10.0,
                        help="time each structure for at least this long (and at least 3 calls)")
    return parser.parse_args(argv)


def load_now() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _run_eval(name: str, python: str, model: str, out: Path, log: Path, extra) -> Dict:
    """bench/_mace_eval.py for one model (started; ``wait_eval`` collects it)."""
    command = [python, str(EVAL_SCRIPT), "--kind", name, "--model", model, "--out", str(out)] + extra
    print("  $ " + " ".join(command), flush=True)
    handle = open(log, "w")
    process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT,
                               env={**os.environ, **SINGLE_THREAD_ENV}, cwd=REPO)
    return {"name": name, "command": command, "process": process, "handle": handle, "log": log}


def _wait_eval(run: Dict, results: Dict) -> bool:
    while run["process"].poll() is None:
        time.sleep(2.0)
    run["handle"].close()
    lines = run["log"].read_text().splitlines()
    print("\n".join("  | " + line.strip() for line in lines if line.startswith("  ")), flush=True)
    if run["process"].returncode != 0:
        results["problems"].append(f"{run['name']}: {run['log'].name} exited with status "
                                   f"{run['process'].returncode}: " + " | ".join(lines[-8:]))
        return False
    return True


def evaluate_both(results: Dict, runs: Path, mace_python: Path, models: Dict[str, str], args, out: Path) -> None:
    """Both models through bench/_mace_eval.py, each in its own environment: the test sets with
    both at the same time, then the timings one model after the other (so that neither is timed
    while the other computes)."""
    python = {"mace": str(mace_python), "race": sys.executable}
    refs = {k: reference(v) for k, v in TEST_SETS.items()}
    started = [_run_eval(name, python[name], model, runs / name / "evaluation", runs / name / "evaluation_tests.log",
                         [f"--test={k}={v}" for k, v in TEST_SETS.items()]
                         + ["--json", str(runs / name / "evaluation" / "tests.json")])
               for name, model in models.items()]
    for run in started:
        name = run["name"]
        if _wait_eval(run, results):
            report = json.loads((runs / name / "evaluation" / "tests.json").read_text())
            results["evaluation"][name] = {"command": run["command"], "versions": report["versions"],
                                           "torch_threads": report["torch_threads"], "tests": report["tests"]}
            results["test"][name] = {k: errors(runs / name / "evaluation" / f"predictions_{k}.npz", refs[k])
                                     for k in TEST_SETS}
            write_json(out / "results.partial.json", results, default=str)
    for name, model in models.items():
        speed = [f"--speed=acac_64_box={SPEED_STRUCTURES['acac_64_box']}:{args.box}",
                 f"--speed=acac_1={SPEED_STRUCTURES['acac_1']}", "--min-seconds", str(args.speed_seconds),
                 "--json", str(runs / name / "evaluation" / "speed.json")]
        run = _run_eval(name, python[name], model, runs / name / "evaluation", runs / name / "evaluation_speed.log",
                        speed)
        load = load_now()
        if _wait_eval(run, results):
            report = json.loads((runs / name / "evaluation" / "speed.json").read_text())
            results["speed"][name] = {k: {**v, "load_at_start": load} for k, v in report["speed"].items()}
            results["evaluation"].setdefault(name, {})["speed_command"] = run["command"]
            write_json(out / "results.partial.json", results, default=str)


def main(argv=None) -> int:
    args = parse_args(argv)
    out, runs = Path(args.out).resolve(), Path(args.runs).resolve()
    if runs == out or out in runs.parents:
        raise SystemExit(f"--runs ({runs}) must not lie inside --out ({out}): checkpoints stay out of the results")
    for path in [TRAIN_FILE, ISOLATED_FILE, *TEST_SETS.values(), *SPEED_STRUCTURES.values()]:
        if not path.is_file():
            raise SystemExit(f"{path}: missing (the data sets are expected in ../shared/data)")
    grace = args.mace_grace_minutes if args.mace_grace_minutes is not None else max(2.0, args.minutes / 4.0)
    out.mkdir(parents=True, exist_ok=True)
    if runs.exists():
        for name in ("data", "mace", "race"):
            shutil.rmtree(runs / name, ignore_errors=True)
    runs.mkdir(parents=True, exist_ok=True)
    from bayesrace.model import PRESETS

    command = command_line("accuracy_vs_mace.py", argv)
    if os.environ.get("OMP_NUM_THREADS") == "1":
        command = "OMP_NUM_THREADS=1 " + command
    results: Dict = {
        "command": command,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "installed_bayesrace_sha": installed_package_hash(),
        "machine": machine_info(),
        "load": {"before": load_now(), "uptime_before": uptime()},
        "seed": args.seed,
        "budget": {"minutes": args.minutes, "mace_grace_minutes": grace, "preset": args.preset,
                   "threads_per_process": 1},
        "runs_dir": os.path.relpath(runs, REPO) if REPO in runs.parents else str(runs),
        "mace_venv": os.path.relpath(Path(args.mace_venv).resolve(), REPO)
        if REPO in Path(args.mace_venv).resolve().parents else args.mace_venv,
        "race_model_config": ", ".join(f"{k}={v}" for k, v in {**PRESETS[args.preset],
                                                                  **race_model_overrides(args)}.items()),
        "test_sets": list(TEST_SETS), "speed_structures": list(SPEED_STRUCTURES),
        "training": {}, "evaluation": {}, "test": {}, "speed": {}, "problems": [],
    }
    print(f"accuracy vs MACE: {args.minutes} min per model, side by side; results -> {out}; runs -> {runs}", flush=True)
    print(f"machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, load {results['load']['before']}",
          flush=True)

    print("\n== MACE environment", flush=True)
    results["mace_env"] = ensure_mace_venv(Path(args.mace_venv), args.mace_spec)
    print(f"  {'reused' if results['mace_env']['reused'] else 'created'}: {results['mace_env']['versions']}", flush=True)

    print("\n== data", flush=True)
    split = write_split(runs / "data", args.seed)
    references = isolated_energies()
    from ase.data import atomic_numbers

    e0s = {atomic_numbers[s]: e for s, e in references.items()}
    results["data"] = {"train": "../shared/data/acac/train_300K.xyz", "n_train": split["n_train"],
                       "n_valid": split["n_valid"], "valid_indices": split["valid_indices"],
                       "reference_energies_eV": references,
                       "tests": {k: f"../shared/data/acac/{v.name}" for k, v in TEST_SETS.items()}}
    print(f"  {split['n_train']} train / {split['n_valid']} valid -> {runs / 'data'}; E0s {references}", flush=True)

    settings = mace_settings(args)
    mace_extra = shlex.split(args.mace_extra)
    mace_cmd = mace_command(Path(args.mace_venv).resolve(), runs / "mace", split, e0s, settings, mace_extra)
    race_values = race_config(runs / "race", split, references, args)
    race_path = write_config(race_values, runs / "race" / "config.yaml")
    race_cmd = [sys.executable, "-m", "bayesrace.cli", "train", str(race_path)]
    results.update(mace_settings=settings, mace_extra=mace_extra, mace_command=mace_cmd, race_config=race_values,
                   race_command=race_cmd)
    mace = Job("MACE", mace_cmd, runs / "mace" / "train.log", lambda: mace_rows(runs / "mace"))
    race = Job("RACE", race_cmd, runs / "race" / "train.log", lambda: race_rows(runs / "race"))

    last_plot = [0.0]

    def progress() -> None:
        results["training"] = {"mace": mace.summary(), "race": race.summary()}
        write_json(out / "results.partial.json", results, default=str)
        if time.time() - last_plot[0] > 60.0:
            plot({"mace": mace.rows, "race": race.rows}, out / "learning_curve.png", args.minutes,
                 f"energies (training in progress, {datetime.datetime.now():%H:%M})")
            last_plot[0] = time.time()

    print(f"\n== training both for {args.minutes} min (MACE stopped at most {grace} min past the budget)", flush=True)
    results["training_clock"] = train_side_by_side(mace, race, args.minutes, grace, progress)
    if race.rows and race.rows[-1].get("elapsed_s") is not None:
        results["training_clock"]["race_training_minutes"] = round(race.rows[-1]["elapsed_s"] / 60.0, 2)
    progress()
    for job, key in ((mace, "mace"), (race, "race")):
        if job.returncode != 0 and not job.stopped_by_monitor:
            tail = job.log.read_text().splitlines()[-12:]
            results["problems"].append(f"{key}: training exited with status {job.returncode}: " + " | ".join(tail))

    print("\n== MACE model file from its last checkpoint", flush=True)
    results["mace_finish"] = finish_mace(mace_cmd, runs / "mace", runs / "mace" / "finish.log")
    print(f"  {results['mace_finish']}", flush=True)
    models = {}
    if results["mace_finish"].get("model"):
        models["mace"] = results["mace_finish"]["model"]
    else:
        results["problems"].append("mace: " + results["mace_finish"].get("problem", "no model"))
    if (runs / "race" / "posterior.pt").exists():
        models["race"] = str(runs / "race" / "posterior.pt")
    else:
        results["problems"].append("race: no posterior.pt written")
    write_json(out / "results.partial.json", results, default=str)

    print("\n== evaluating: test sets (both models at once), then speed (one model after the other)", flush=True)
    evaluate_both(results, runs, venv_python(Path(args.mace_venv).resolve()), models, args, out)
    results["load"]["after"] = load_now()
    results["load"]["uptime_after"] = uptime()
    results["ratios"] = comparisons(results)
    histories = {"mace": mace.rows, "race": race.rows}
    results["learning_curve"] = curve_table(histories, args.minutes)
    if installed_package_hash() != results["installed_bayesrace_sha"]:
        results["problems"].append("the installed bayesrace package changed while this benchmark ran")
    plot(histories, out / "learning_curve.png", args.minutes, "energies")
    write_json(out / "results.json", results, default=str)
    (out / "results.partial.json").unlink(missing_ok=True)
    write_markdown(results, out / "results.md")
    for set_name in TEST_SETS:
        for name in ("mace", "race"):
            e = results["test"].get(name, {}).get(set_name)
            if e:
                print(f"  {set_name:13s} {name}: F RMSE {e['forces_rmse_meV_per_A']:.1f} meV/Å, "
                      f"E RMSE {e['energy_rmse_meV_per_atom']:.3f} meV/atom", flush=True)
    print(f"  ratios RACE/MACE: {results['ratios']}", flush=True)
    print(f"\nresults: {out / 'results.md'}", flush=True)
    return 1 if results["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
