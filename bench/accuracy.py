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
  single/, ensemble/            evaluate_sets reports: metrics.json, report.md, parity plots
  configs/                      the two training configs (paths relative to that folder)

Run directories (checkpoints, posteriors, logs, prediction arrays) go to ``--runs``
(default ``bench/runs/accuracy``, meant to be git-ignored), not into the results.

    python bench/accuracy.py                         # 8 min per member, 4 members, -np 2
    python bench/accuracy.py --minutes 0.5 --members 2 --out /tmp/acc_smoke --runs /tmp/acc_smoke_runs
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import yaml

from bayesrace._mpi import mpirun_executable

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
DATA_DIR = (REPO / ".." / "shared" / "data" / "acac").resolve()
TRAIN_FILE = DATA_DIR / "train_300K.xyz"
ISOLATED_FILE = DATA_DIR / "isolated_atoms.xyz"
TEST_SETS = {"test_MD_300K": DATA_DIR / "test_MD_300K.xyz", "test_MD_600K": DATA_DIR / "test_MD_600K.xyz"}
N_ATOMS = 15  # acetylacetone, C5H8O2

# published MACE test RMSEs on this data set (long GPU training), for scale
MACE_REFERENCE = {"test_MD_300K": {"energy_rmse_meV": 1.0, "forces_rmse_meV_per_A": 5.0}}

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
        "loss": {"kind": loss, "energy_weight": 1.0, "force_weight": 1.0, "mse_warmup_epochs": warmup_epochs},
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


def write_config(values: Dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


# ----------------------------------------------------------------------------------------
# machine and load


class LoadSampler:
    """Samples /proc/loadavg (1-minute load) every ``every`` seconds in a thread."""

    def __init__(self, every: float = 15.0):
        self.every = every
        self.samples: List[List[float]] = []
        self._stop = threading.Event()
        self._start = time.time()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> Optional[float]:
        try:
            return float(Path("/proc/loadavg").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            value = self._read()
            if value is not None:
                self.samples.append([round(time.time() - self._start, 1), value])
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> Dict:
        values = [v for _, v in self.samples]
        if not values:
            return {}
        return {
            "load1_mean": round(float(np.mean(values)), 2),
            "load1_min": min(values),
            "load1_max": max(values),
            "n_samples": len(values),
        }


def machine_info() -> Dict:
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        load = []
    import bayesrace

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_at_start": load,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "bayesrace": getattr(bayesrace, "__version__", "?"),
        "platform": platform.platform(),
    }


def installed_package_hash() -> str:
    """sha256 (first 12 hex digits) over the installed bayesrace's Python files: other engineers
    reinstall the package while benchmarks run, and a run should say if its code changed under it."""
    import hashlib
    import importlib.util

    spec = importlib.util.find_spec("bayesrace")
    root = Path(spec.origin).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "python"], capture_output=True, text=True, check=True
        ).stdout.strip()
        return out.stdout.strip() + (" (python/ has uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


# ----------------------------------------------------------------------------------------
# training


def run_training(config_path: Path, log_path: Path, ranks: int) -> Dict:
    """Run ``bayesrace train`` (under mpirun when ranks > 1); wall and CPU seconds, load samples."""
    command = [sys.executable, "-m", "bayesrace.cli", "train", str(config_path), "--quiet"]
    if ranks > 1:
        command = [mpirun_executable(), "-np", str(ranks)] + command
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print("  $ " + " ".join(shlex.quote(c) for c in command), flush=True)
    package = installed_package_hash()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.time()
    with LoadSampler() as sampler, open(log_path, "w") as log:
        process = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    wall = time.time() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "command": command,
        "returncode": process.returncode,
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        # CPU seconds per rank per wall second: 1.0 means every rank had a core to itself
        "cpu_per_rank_per_wall": round(cpu / (wall * ranks), 3) if wall > 0 else None,
        "ranks": ranks,
        "load": sampler.summary(),
        "load_samples": sampler.samples,
        "log": str(log_path),
        "installed_bayesrace_sha": package,
        "started": datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
    }


def read_history(run_dir: Path, members: int) -> List[List[Dict]]:
    histories = []
    for member in range(members):
        path = run_dir / f"member_{member}" / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
        histories.append(rows)
    return histories


def history_summary(rows: List[Dict]) -> Dict:
    if not rows:
        return {"epochs": 0}
    finite = all(
        math.isfinite(r[k]) for r in rows for k in ("train_loss", "valid_loss", "valid_force_rmse",
                                                    "valid_energy_rmse_per_atom")
    )
    switch = next((r["epoch"] for r in rows if r["loss_kind"] != rows[0]["loss_kind"]), None)
    forces = [r["valid_force_rmse"] for r in rows]
    # a jump of the validation force RMSE to more than twice its best so far: a sign of divergence
    jumps = [
        r["epoch"] for i, r in enumerate(rows) if i > 0 and r["valid_force_rmse"] > 2.0 * min(forces[:i])
    ]
    return {
        "epochs": len(rows),
        "elapsed_s": round(rows[-1]["elapsed_s"], 1),
        "s_per_epoch": round(rows[-1]["elapsed_s"] / len(rows), 2),
        "final_lr": rows[-1]["lr"],
        "loss_kinds": sorted({r["loss_kind"] for r in rows}),
        "first_epoch_of_second_loss": switch,
        "all_finite": finite,
        "valid_force_rmse_jumps_epochs": jumps,
        "best_valid_force_rmse_meV_per_A": round(1000 * min(forces), 2),
        "final_valid_force_rmse_meV_per_A": round(1000 * forces[-1], 2),
        "final_valid_energy_rmse_meV_per_atom": round(1000 * rows[-1]["valid_energy_rmse_per_atom"], 3),
    }


def curve_at(rows: List[Dict], minutes: float, key: str) -> Optional[float]:
    """Value of ``key`` at the last epoch that ended within ``minutes`` (None if none did)."""
    done = [r for r in rows if r["elapsed_s"] <= 60.0 * minutes + 1e-9]
    return done[-1][key] if done else None


def loss_switch_effect(rows: List[Dict]) -> Optional[Dict]:
    """What the switch MSE -> second loss did to the validation RMSEs of one member."""
    index = next((i for i, r in enumerate(rows) if r["loss_kind"] != rows[0]["loss_kind"]), None)
    if index is None or index == 0:
        return None
    before = rows[index - 1]
    after = rows[index:]
    peak_f = max(r["valid_force_rmse"] for r in after[:10])
    peak_e = max(r["valid_energy_rmse_per_atom"] for r in after[:10])
    back = next((r for r in after if r["valid_force_rmse"] <= before["valid_force_rmse"]), None)
    return {
        "switch_epoch": rows[index]["epoch"],
        "switch_minutes": round(before["elapsed_s"] / 60.0, 2),
        "force_rmse_before_meV_per_A": round(1000 * before["valid_force_rmse"], 1),
        "force_rmse_peak_meV_per_A": round(1000 * peak_f, 1),
        "energy_rmse_before_meV_per_atom": round(1000 * before["valid_energy_rmse_per_atom"], 2),
        "energy_rmse_peak_meV_per_atom": round(1000 * peak_e, 2),
        "epochs_to_recover_force_rmse": None if back is None else back["epoch"] - before["epoch"],
        "minutes_to_recover_force_rmse": None if back is None else round((back["elapsed_s"] - before["elapsed_s"]) / 60, 2),
    }


def per_doubling(rows: List[Dict], minutes: float, key: str = "valid_force_rmse") -> Optional[float]:
    """Factor by which ``key`` changed over the last doubling of training time (minutes/2 -> minutes)."""
    a, b = curve_at(rows, minutes / 2.0, key), curve_at(rows, minutes, key)
    return None if a is None or b is None or a <= 0 else round(b / a, 3)


def learning_curve_table(single: List[Dict], members: List[List[Dict]], marks: List[float]) -> List[Dict]:
    table = []
    for t in marks:
        row = {"minutes": t}
        f = curve_at(single, t, "valid_force_rmse")
        e = curve_at(single, t, "valid_energy_rmse_per_atom")
        row["single_force_rmse_meV_per_A"] = None if f is None else round(1000 * f, 2)
        row["single_energy_rmse_meV_per_atom"] = None if e is None else round(1000 * e, 3)
        fs = [curve_at(m, t, "valid_force_rmse") for m in members]
        es = [curve_at(m, t, "valid_energy_rmse_per_atom") for m in members]
        fs = [1000 * v for v in fs if v is not None]
        es = [1000 * v for v in es if v is not None]
        row["members_force_rmse_meV_per_A_mean"] = round(float(np.mean(fs)), 2) if fs else None
        row["members_force_rmse_meV_per_A_range"] = [round(min(fs), 2), round(max(fs), 2)] if fs else None
        row["members_energy_rmse_meV_per_atom_mean"] = round(float(np.mean(es)), 3) if es else None
        row["members_reporting"] = len(fs)
        table.append(row)
    return table


def plot_learning_curve(single: List[Dict], members: List[List[Dict]], path: Path, budget_minutes: float) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.3), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2)
    series = [("single (MSE)", single, "k", "-")] + [
        (f"ensemble member {i} (MSE → NLL_JEF)", rows, f"C{i % 10}", "-") for i, rows in enumerate(members)
    ]
    for label, rows, colour, style in series:
        if not rows:
            continue
        t = np.array([r["elapsed_s"] for r in rows]) / 60.0
        f = 1000 * np.array([r["valid_force_rmse"] for r in rows])
        e = 1000 * np.array([r["valid_energy_rmse_per_atom"] for r in rows])
        width = 2.0 if colour == "k" else 1.0
        axes[0].plot(t, f, style, color=colour, linewidth=width, label=label)
        axes[1].plot(t, e, style, color=colour, linewidth=width, label=label)
        switch = next((i for i, r in enumerate(rows) if r["loss_kind"] != rows[0]["loss_kind"]), None)
        if switch is not None:
            axes[0].plot(t[switch], f[switch], "o", color=colour, markersize=4)
            axes[1].plot(t[switch], e[switch], "o", color=colour, markersize=4)
    axes[0].axhline(5.0, color="0.5", linestyle="--", linewidth=0.8, label="MACE test 300 K (~5 meV/Å)")
    axes[1].axhline(1.0 / N_ATOMS, color="0.5", linestyle="--", linewidth=0.8,
                    label="MACE test 300 K (~1 meV = 0.067 meV/atom)")
    for axis, ylabel in zip(axes, ("validation force RMSE [meV/Å]", "validation energy RMSE [meV/atom]")):
        axis.set_yscale("log")
        axis.set_xlabel("elapsed training time per member [min]")
        axis.set_ylabel(ylabel)
        axis.set_xlim(0, max([budget_minutes] + [r["elapsed_s"] / 60.0 for _, rows, _, _ in series for r in rows])
                      * 1.03)
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[0].set_title("forces (EMA weights, 50 validation structures)")
    axes[1].set_title("energies (dots: switch MSE → NLL_JEF)")
    figure.savefig(path, dpi=120)


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


def _f(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, (list, tuple)):
        return "–".join(_f(v, digits) for v in value)
    return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"


def write_markdown(results: Dict, path: Path) -> None:
    b = results["budget"]
    m = results["machine"]
    lines = [
        "# Accuracy on acetylacetone (acac): single RACE model vs deep ensemble, CPU budget",
        "",
        "Produced by (from the repository root, venv active):",
        "",
        "```",
        results["command"],
        "```",
        "",
        f"Date {results['date']}; commit {results['git_commit']}; installed bayesrace files sha256 "
        f"{results['installed_bayesrace_sha']['start']} (the venv's non-editable install is what ran).",
        "",
        "## Setup",
        "",
        f"- Data: `../shared/data/acac/train_300K.xyz`, {results['data']['n_train']} training / "
        f"{results['data']['n_valid']} validation structures (random split, seed {results['seed']}); "
        "reference energies of the isolated atoms (`isolated_atoms.xyz`). Tests: `test_MD_300K.xyz` "
        "(650, in distribution) and `test_MD_600K.xyz` (650, hotter: partly out of distribution).",
        f"- Model: preset `{b['preset']}` ({results['model_config']}), float64.",
        f"- Budget: **{b['minutes_per_member']} min wall clock per member** (training loop only; the check "
        "runs after each epoch, so a member overshoots by up to one epoch), one torch thread per process. "
        f"Single model: 1 process. Ensemble: {b['members']} members on `mpirun -np {b['ranks']}` "
        f"({math.ceil(b['members'] / b['ranks'])} member(s) per rank, one after another).",
        f"- Optimiser: AdamW, lr {b['lr']}, batch 8, ReduceLROnPlateau(factor 0.5, patience 5 epochs, "
        "min 1e-5) on the validation loss, EMA 0.99 (the EMA weights are validated and kept), gradient "
        "clipping 10, early stopping off (the budget stops training); the kept weights are those of the "
        "best validation loss.",
        f"- Loss: single model pure MSE (λ_E = λ_F = 1, energy per atom); ensemble members MSE for "
        f"{b['ensemble_mse_warmup_epochs']} epochs ({b['ensemble_warmup_basis']}), then "
        "NLL_JEF (invariant Cholesky covariance). Switching the loss restarts the best-weights record, so "
        "each member's kept weights are its best under NLL_JEF.",
        "",
        "## Machine and load",
        "",
        f"- {m['cpu']}, {m['cores']} cores (shared with other engineers' jobs), torch {m['torch']}, "
        f"Python {m['python']}. 1-min load average at start: {' '.join(m['load_at_start'])}.",
    ]
    for name in ("single", "ensemble"):
        run = results["runs"].get(name)
        if not run:
            continue
        load = run["training"].get("load", {})
        lines.append(
            f"- {name}: wall {run['training']['wall_s'] / 60:.1f} min, CPU {run['training']['cpu_s'] / 60:.1f} min "
            f"on {run['training']['ranks']} rank(s) (≈{run['training']['cpu_s'] / 60 / len(run['history']):.1f} "
            f"CPU-min per member, data preparation included) → {run['training']['cpu_per_rank_per_wall']} CPU-s per rank "
            f"per wall-s (1.0 = a free core per rank); 1-min load during training mean {load.get('load1_mean')} "
            f"(min {load.get('load1_min')}, max {load.get('load1_max')}); epochs per member "
            f"{[h['epochs'] for h in run['history']]}, s/epoch {[h.get('s_per_epoch') for h in run['history']]}."
        )
    if results.get("load_note"):
        lines.append(f"- **Note:** {results['load_note']}")
    for note in results.get("notes", []):
        lines.append(f"- **Note:** {note}")
    lines += [
        "",
        "## Test errors",
        "",
        "Energies: total per molecule (meV) and per atom (meV/atom, 15 atoms); forces per Cartesian "
        "component. \"members (mean)\" is the average error of the ensemble's members taken one at a time "
        "(what ensembling the members gains is the difference to the ensemble row).",
        "",
        "| set | model | E MAE [meV] | E RMSE [meV] | E MAE [meV/atom] | E RMSE [meV/atom] | F MAE [meV/Å] "
        "| F RMSE [meV/Å] |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in TEST_SETS:
        for label, key in (("single (MSE)", "single"), (f"ensemble of {b['members']} (NLL_JEF)", "ensemble")):
            run = results["runs"].get(key)
            if not run or "test" not in run:
                continue
            h = run["test"][name]["errors"]
            lines.append(
                f"| {name} | {label} | {_f(h['energy_mae_meV'])} | {_f(h['energy_rmse_meV'])} | "
                f"{_f(h['energy_mae_meV_per_atom'])} | {_f(h['energy_rmse_meV_per_atom'])} | "
                f"{_f(h['forces_mae_meV_per_A'])} | {_f(h['forces_rmse_meV_per_A'])} |"
            )
            if key == "ensemble":
                mm = run["test"][name]["members_mean"]
                lines.append(
                    f"| {name} | members (mean of {b['members']}) | {_f(mm['energy_mae_meV'])} | "
                    f"{_f(mm['energy_rmse_meV'])} | – | {_f(mm['energy_rmse_meV_per_atom'])} | "
                    f"{_f(mm['forces_mae_meV_per_A'])} | {_f(mm['forces_rmse_meV_per_A'])} |"
                )
        ref = MACE_REFERENCE.get(name)
        if ref:
            lines.append(
                f"| {name} | MACE, published (long GPU training) | – | ≈{ref['energy_rmse_meV']:g} | – | "
                f"≈{ref['energy_rmse_meV'] / N_ATOMS:.3g} | – | ≈{ref['forces_rmse_meV_per_A']:g} |"
            )
    ens = results["runs"].get("ensemble")
    if ens and "test" in ens:
        lines += [
            "",
            "## Ensemble uncertainty on the test sets",
            "",
            "Mean predicted σ (energy σ per molecule; force σ per component, sqrt(tr Σ_i / 3)), Spearman rank "
            "correlation of |error| with σ (per structure for energies, per atom for forces), and the "
            "fraction of errors inside the central 95 % interval (uncalibrated).",
            "",
            "| set | σ_E [meV] | σ_E epi [meV] | σ_F [meV/Å] | σ_F epi [meV/Å] | σ_F ale [meV/Å] "
            "| ρ_E | ρ_F | cov95 E | cov95 F |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name in TEST_SETS:
            u = ens["test"][name]["uncertainty"]
            lines.append(
                f"| {name} | {_f(u['energy_sigma_mean_meV'])} | {_f(u['energy_sigma_epistemic_mean_meV'])} | "
                f"{_f(u['forces_sigma_mean_meV_per_A'])} | {_f(u['forces_sigma_epistemic_mean_meV_per_A'])} | "
                f"{_f(u['forces_sigma_aleatoric_mean_meV_per_A'])} | {_f(u['spearman_energy'], 2)} | "
                f"{_f(u['spearman_forces'], 2)} | {_f(u['energy_coverage_95'], 2)} | "
                f"{_f(u['forces_coverage_95'], 2)} |"
            )
    lines += [
        "",
        "## How the error falls with training time",
        "",
        "Validation RMSE (50 structures, EMA weights) at the last epoch finished by each time; members: mean "
        "(range) over the ensemble's members. Plot: `learning_curve.png` (log y).",
        "",
        "| minutes | single F RMSE [meV/Å] | members F RMSE [meV/Å] | single E RMSE [meV/atom] "
        "| members E RMSE [meV/atom] |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in results["learning_curve"]:
        lines.append(
            f"| {row['minutes']:g} | {_f(row['single_force_rmse_meV_per_A'])} | "
            f"{_f(row['members_force_rmse_meV_per_A_mean'])} ({_f(row['members_force_rmse_meV_per_A_range'])}) | "
            f"{_f(row['single_energy_rmse_meV_per_atom'])} | {_f(row['members_energy_rmse_meV_per_atom_mean'])} |"
        )
    slope = results.get("per_doubling") or {}
    if slope.get("single") is not None or slope.get("members_mean") is not None:
        improving = (slope.get("single") or slope.get("members_mean") or 1.0) < 0.95
        decayed = [
            f"{name} member {i}: {h['final_lr']:g}"
            for name, run in results["runs"].items() for i, h in enumerate(run["history"])
            if h.get("final_lr") is not None and h["final_lr"] < results["budget"]["lr"]
        ]
        lr_text = (
            "the plateau schedule never lowered the learning rate" if not decayed
            else "final learning rates below the initial one: " + ", ".join(decayed)
        )
        lines += [
            "",
            f"Over the last doubling of training time ({results['budget']['minutes_per_member'] / 2:g} → "
            f"{results['budget']['minutes_per_member']:g} min) the validation force RMSE changed by a factor "
            f"{_f(slope.get('single'))} (single) and {_f(slope.get('members_mean'))} (ensemble members, mean): "
            + ("training was still improving when the budget ran out" if improving
               else "training had nearly stopped improving")
            + f" ({lr_text}).",
        ]
    switches = results.get("loss_switch") or []
    if switches:
        lines += [
            "",
            "Switching the ensemble members from MSE to NLL_JEF disturbs the means: validation RMSE right "
            "before the switch → worst of the next 10 epochs → epochs (minutes) until the force RMSE is back "
            "to its pre-switch value:",
            "",
            "| member | switch at [min] | F RMSE before → peak [meV/Å] | E RMSE before → peak [meV/atom] "
            "| recovered after |",
            "|---:|---:|---:|---:|---:|",
        ]
        for member, sw in enumerate(switches):
            if sw is None:
                continue
            lines.append(
                f"| {member} | {sw['switch_minutes']:g} | {sw['force_rmse_before_meV_per_A']:g} → "
                f"{sw['force_rmse_peak_meV_per_A']:g} | {sw['energy_rmse_before_meV_per_atom']:g} → "
                f"{sw['energy_rmse_peak_meV_per_atom']:g} | "
                + ("not within the budget" if sw["epochs_to_recover_force_rmse"] is None else
                   f"{sw['epochs_to_recover_force_rmse']} epochs ({sw['minutes_to_recover_force_rmse']:g} min)")
                + " |"
            )
    lines += ["", "## Comparison with MACE, and what the numbers say", "", results.get("comparison", ""), ""]
    if results.get("problems"):
        lines += ["## Problems seen", ""] + [f"- {p}" for p in results["problems"]] + [""]
    lines += [
        "## Files",
        "",
        "- `results.json`: everything above, per-member histories summaries, load samples.",
        "- `learning_curve.png`; `single/` and `ensemble/`: `report.md`, `metrics.json`, `parity_energy.png`, "
        "`parity_forces.png`, `error_vs_sigma.png`, `calibration_curves.png`, `ood_scores.png`, `ood_roc.png` "
        "from `evaluate_sets`.",
        "- `configs/`: the two training configs (paths relative to that folder; `out` points into the "
        "git-ignored run directory).",
        f"- Run directories (checkpoints, posteriors, logs, prediction arrays): `{results['runs_dir']}` "
        "(not part of the results).",
        "",
    ]
    path.write_text("\n".join(lines))


def comparison_text(results: Dict) -> str:
    parts = []
    for key, label in (("single", "the single model"), ("ensemble", "the ensemble")):
        run = results["runs"].get(key)
        if not run or "test" not in run:
            continue
        h = run["test"]["test_MD_300K"]["errors"]
        parts.append(
            f"At 300 K {label} reaches E RMSE {h['energy_rmse_meV']:.3g} meV and F RMSE "
            f"{h['forces_rmse_meV_per_A']:.3g} meV/Å, i.e. {h['energy_rmse_meV'] / 1.0:.1f}× and "
            f"{h['forces_rmse_meV_per_A'] / 5.0:.1f}× MACE's ≈1 meV / ≈5 meV/Å."
        )
    parts.append(
        f"MACE's numbers come from long GPU training of a larger model; here each member had "
        f"{results['budget']['minutes_per_member']} min on one shared CPU core "
        f"(preset `{results['budget']['preset']}`)."
    )
    slope = (results.get("per_doubling") or {}).get("single")
    if slope:
        doublings = math.log(5.0 / results["learning_curve"][-1]["single_force_rmse_meV_per_A"]) / math.log(slope) \
            if slope < 1 and results["learning_curve"][-1]["single_force_rmse_meV_per_A"] else None
        if doublings:
            parts.append(
                f"At the last doubling's rate (×{slope:g} per doubling of time) the single model would need about "
                f"{doublings:.0f} more doublings of training time to reach 5 meV/Å: a power law extrapolated that "
                "far means little (learning-rate decay would speed it up, model capacity would stop it), but it "
                "says the gap is not closed by minutes more of CPU."
            )
    last = results["learning_curve"][-1]
    ens = (results["runs"].get("ensemble") or {}).get("test", {})
    single_300 = (results["runs"].get("single") or {}).get("test", {}).get("test_MD_300K", {}).get("errors")
    if "test_MD_300K" in ens and single_300:
        e300 = ens["test_MD_300K"]
        f_ens, f_mem = e300["errors"]["forces_rmse_meV_per_A"], e300["members_mean"]["forces_rmse_meV_per_A"]
        parts.append(
            f"Ensembling: at 300 K the ensemble's mean prediction has F RMSE {f_ens:.3g} meV/Å against "
            f"{f_mem:.3g} for its members on average ({100 * (f_ens / f_mem - 1):+.0f} %), but the members "
            f"themselves are worse than the single MSE model ({f_mem:.3g} vs "
            f"{single_300['forces_rmse_meV_per_A']:.3g} meV/Å) with the same per-member budget: they optimise "
            "NLL_JEF rather than the squared error, and lost part of their budget recovering from the loss "
            "switch (table above)."
        )
        u = e300.get("uncertainty") or {}
        if u.get("forces_sigma_mean_meV_per_A") and u.get("energy_sigma_mean_meV"):
            text = (
                f"Uncertainty at 300 K: mean σ_F {u['forces_sigma_mean_meV_per_A']:.3g} meV/Å against an F RMSE of "
                f"{f_ens:.3g} (ratio {u['forces_sigma_mean_meV_per_A'] / f_ens:.2f}); mean σ_E "
                f"{u['energy_sigma_mean_meV']:.3g} meV against an E RMSE of {e300['errors']['energy_rmse_meV']:.3g} "
                f"(ratio {u['energy_sigma_mean_meV'] / e300['errors']['energy_rmse_meV']:.1f}: the energy variance "
                "head is far from calibrated"
                + (f", and its Spearman ρ_E is only {u['spearman_energy']:.2f}" if u.get("spearman_energy") is not None
                   else "")
                + ")."
            )
            e600 = ens.get("test_MD_600K")
            if e600 and e600.get("uncertainty"):
                u6 = e600["uncertainty"]
                text += (
                    f" From 300 K to 600 K the epistemic σ_F grows ×"
                    f"{u6['forces_sigma_epistemic_mean_meV_per_A'] / u['forces_sigma_epistemic_mean_meV_per_A']:.2f} "
                    f"while the ensemble's F RMSE grows ×{e600['errors']['forces_rmse_meV_per_A'] / f_ens:.2f}; "
                    f"the aleatoric σ_F hardly moves (×"
                    f"{u6['forces_sigma_aleatoric_mean_meV_per_A'] / u['forces_sigma_aleatoric_mean_meV_per_A']:.2f})."
                )
            parts.append(text)
    single_test = single_300
    further = single_test and single_test["energy_rmse_meV"] / 1.0 > single_test["forces_rmse_meV_per_A"] / 5.0
    if further and last.get("single_force_rmse_meV_per_A") and last.get("single_energy_rmse_meV_per_atom"):
        e_term = (last["single_energy_rmse_meV_per_atom"] / 1000.0) ** 2
        f_term = (last["single_force_rmse_meV_per_A"] / 1000.0) ** 2
        parts.append(
            f"Energies are further from MACE than forces. With λ_E = λ_F = 1 and the energy term per atom, the "
            f"energy part of the MSE at the end of training is ≈{e_term:.1e} eV² against ≈{f_term:.1e} (eV/Å)² for "
            f"forces ({f_term / e_term:.0f}×), so energies are learned almost only through the forces; a larger "
            "energy weight late in training (as MACE's recipes do) is the obvious next experiment."
        )
    return "\n\n".join(parts)


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
        "ensemble": dict(members=args.members, loss="nll_jef", warmup_epochs=None, ranks=args.ranks,
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
        (out / "results.partial.json").write_text(json.dumps(results, indent=2) + "\n")
        if training["returncode"] != 0:
            tail = (run_dir / "train.log").read_text().splitlines()[-15:]
            results["runtime_problems"].append(f"{name}: training exited with status {training['returncode']}; log tail: "
                                       + " | ".join(tail))
            print("\n".join(tail), file=sys.stderr)
            continue
        print(f"== evaluating {name}", flush=True)
        evaluated = evaluate(run_dir / "posterior.pt", out / name, run_dir / "predictions")
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
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.partial.json").unlink(missing_ok=True)
    write_markdown(results, out / "results.md")
    print(f"\nresults: {out / 'results.md'}", flush=True)
    return 1 if any("exited with status" in p for p in problems) else 0


if __name__ == "__main__":
    sys.exit(main())
