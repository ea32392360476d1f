"""Training for bench/accuracy_vs_mace.py: the shared split, the two training commands (MACE's
``mace_run_train`` and ``bayesrace train``), both run side by side under one monitor that samples
their CPU time and validation errors as they appear, stops MACE at the budget, and turns MACE's
last checkpoint into a model file."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import yaml

from _accuracy_history import ISOLATED_FILE, TRAIN_FILE
from _common import REPO, SINGLE_THREAD_ENV

# label names written into the split files: ASE moves "energy"/"forces" of an extxyz file into a
# calculator, which MACE's readers handle differently across versions; REF_* stay plain columns
ENERGY_KEY, FORCES_KEY = "REF_energy", "REF_forces"
N_VALID = 50


# ----------------------------------------------------------------------------------------
# data: the split of bench/accuracy.py (bayesrace.data.split, seed, 50 validation frames)


def _labels(atoms):
    results = atoms.calc.results if atoms.calc is not None else {}
    energy = results.get("energy", atoms.info.get("energy"))
    forces = results.get("forces", atoms.arrays.get("forces"))
    return float(energy), forces


def _labelled(atoms):
    import ase

    energy, forces = _labels(atoms)
    out = ase.Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    out.info = {k: v for k, v in atoms.info.items() if k not in ("energy", "forces")}
    out.info[ENERGY_KEY] = energy
    out.arrays[FORCES_KEY] = forces.copy()
    return out


def write_split(data_dir: Path, seed: int) -> Dict:
    """train_300K.xyz split as bayesrace's trainer splits it (``data.n_valid: 50``, ``seed``: the
    multi-atom frames in file order, ``bayesrace.data.split``), written to train.xyz / valid.xyz
    with REF_energy / REF_forces labels; both models train on these two files."""
    import ase.io

    from bayesrace.data import split

    from _common import write_frames

    frames = [a for a in ase.io.read(TRAIN_FILE, ":") if len(a) > 1]
    train, valid = split(frames, N_VALID, seed)
    train_idx, valid_idx = split(list(range(len(frames))), N_VALID, seed)
    paths = {"train": data_dir / "train.xyz", "valid": data_dir / "valid.xyz"}
    write_frames(paths["train"], [_labelled(a) for a in train])
    write_frames(paths["valid"], [_labelled(a) for a in valid])
    return {"train": str(paths["train"]), "valid": str(paths["valid"]), "n_train": len(train),
            "n_valid": len(valid), "valid_indices": [int(i) for i in valid_idx],
            "n_frames": len(frames), "n_train_indices": len(train_idx)}


def isolated_energies() -> Dict[str, float]:
    """Energies of the isolated atoms by element (bayesrace's reader, as its trainer uses them)."""
    from bayesrace.data import isolated_atom_energies, read_frames

    return isolated_atom_energies(read_frames(ISOLATED_FILE, require_forces=False))


# ----------------------------------------------------------------------------------------
# the two commands


def mace_settings(args) -> Dict:
    """mace_run_train options (besides files and directories), as the issue describes the model."""
    return {
        "model": "MACE",
        "num_channels": 64,  # with max_L 1: hidden_irreps '64x0e + 64x1o'
        "max_L": 1,
        "num_interactions": 2,
        "correlation": 3,
        "max_ell": 3,
        "r_max": 5.0,
        "default_dtype": "float64",
        "device": "cpu",
        "batch_size": args.mace_batch_size,
        "valid_batch_size": 10,
        "loss": "weighted",
        "energy_weight": args.mace_energy_weight,
        "forces_weight": args.mace_forces_weight,
        "lr": args.mace_lr,
        "ema": True,
        "ema_decay": 0.99,
        "amsgrad": True,
        "scheduler_patience": 50,
        "clip_grad": 10.0,
        "max_num_epochs": 100000,  # the monitor stops training at the budget
        "patience": 100000,
        "eval_interval": 1,
        "error_table": "PerAtomRMSE",
        "plot": False,
        "save_cpu": True,
        "num_workers": 0,
        "seed": args.seed,
    }


def mace_command(venv: Path, work_dir: Path, split: Dict, e0s: Dict[int, float], settings: Dict,
                 extra: Optional[List[str]] = None) -> List[str]:
    command = [str(venv / "bin" / "mace_run_train"), "--name", "mace",
               "--work_dir", str(work_dir), "--log_dir", str(work_dir / "logs"),
               "--model_dir", str(work_dir), "--checkpoints_dir", str(work_dir / "checkpoints"),
               "--results_dir", str(work_dir / "results"),
               "--train_file", split["train"], "--valid_file", split["valid"],
               "--energy_key", ENERGY_KEY, "--forces_key", FORCES_KEY,
               "--E0s", "{" + ", ".join(f"{z}: {e!r}" for z, e in sorted(e0s.items())) + "}"]
    for key, value in settings.items():
        if value is True:
            command.append(f"--{key}")
        elif value is not False:
            command += [f"--{key}", str(value)]
        else:
            command += [f"--{key}", "False"]
    return command + list(extra or [])


def race_model_overrides(args) -> Dict[str, object]:
    """``--race-model KEY=VALUE`` options as config values (read as YAML scalars)."""
    overrides: Dict[str, object] = {}
    for item in args.race_model or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--race-model expects KEY=VALUE (e.g. l_max=2), got {item!r}")
        overrides[key] = yaml.safe_load(text)  # 2 -> int, 0.5 -> float, true -> bool, else str
    return overrides


def race_config(run_dir: Path, split: Dict, references: Dict[str, float], args) -> Dict:
    """``bayesrace train`` config: one member, pure MSE, the wall budget, as bench/accuracy.py's
    single model (paths relative to ``run_dir``, where the config is written)."""
    rel = lambda p: os.path.relpath(Path(p).resolve(), run_dir.resolve())  # noqa: E731
    return {
        "out": ".",
        "seed": args.seed,
        "dtype": "float64",
        "data": {"train": rel(split["train"]), "valid": rel(split["valid"]), "energy_key": ENERGY_KEY,
                 "forces_key": FORCES_KEY, "reference_energies": dict(references)},
        "model": {"preset": args.preset, **race_model_overrides(args)},
        "loss": {"kind": "mse", "energy_weight": args.race_energy_weight, "force_weight": args.race_force_weight},
        "training": {
            "optimizer": "adamw", "lr": args.race_lr, "weight_decay": 0.0, "batch_size": 8,
            "max_epochs": 100000, "max_minutes": args.minutes, "early_stopping_patience": 100000,
            "lr_factor": 0.5, "lr_patience": 5, "min_lr": 1e-5, "ema_decay": 0.99, "grad_clip": 10.0,
            "threads": 1, "schedule": args.race_schedule,
            **({"decay_fraction": args.race_decay_fraction} if args.race_schedule == "cosine" else {}),
        },
        "ensemble": {"members": 1},
    }


# ----------------------------------------------------------------------------------------
# histories as they grow


def mace_rows(work_dir: Path) -> List[Dict]:
    """Validation rows MACE logged after each epoch (its results/*_train.txt, eV units)."""
    rows = []
    for path in sorted((work_dir / "results").glob("*_train.txt")):
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line being written
                continue
            if row.get("mode") == "eval" and row.get("epoch") is not None:
                rows.append({"epoch": int(row["epoch"]) + 1, "valid_force_rmse": row["rmse_f"],
                             "valid_energy_rmse_per_atom": row["rmse_e_per_atom"], "valid_loss": row.get("loss")})
    return rows


def race_rows(run_dir: Path) -> List[Dict]:
    path = run_dir / "member_0" / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        rows.append({k: row.get(k) for k in ("epoch", "valid_force_rmse", "valid_energy_rmse_per_atom",
                                             "valid_loss", "lr", "elapsed_s")})
    return rows


def tree_cpu_seconds(pid: int) -> Optional[float]:
    """utime + stime of ``pid`` and its live descendants (from /proc; None once it is gone)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]))  # ppid, utime+stime
    if pid not in stats:
        return None
    family, grew = {pid}, True
    while grew:
        grew = False
        for p, (ppid, _) in stats.items():
            if ppid in family and p not in family:
                family.add(p)
                grew = True
    return sum(stats[p][1] for p in family) / tick


# ----------------------------------------------------------------------------------------
# the side-by-side run


class Job:
    def __init__(self, name: str, command: List[str], log: Path, rows: Callable[[], List[Dict]]):
        self.name, self.command, self.log, self.read_rows = name, command, log, rows
        self.rows: List[Dict] = []
        self.returncode = self.wall_s = self.cpu_s = None
        self.stopped_by_monitor = False

    def start(self, env: Dict) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.log_file = open(self.log, "w")
        self.started = time.time()
        self.process = subprocess.Popen(self.command, stdout=self.log_file, stderr=subprocess.STDOUT, env=env,
                                        cwd=REPO)

    @property
    def running(self) -> bool:
        return self.returncode is None

    def poll(self) -> None:
        pid, status, usage = os.wait4(self.process.pid, os.WNOHANG)
        if pid == 0:
            return
        self.process.returncode = self.returncode = os.waitstatus_to_exitcode(status)
        self.wall_s = round(time.time() - self.started, 1)
        self.cpu_s = round(usage.ru_utime + usage.ru_stime, 1)
        self.log_file.close()

    def update_rows(self, now: float, cpu: Optional[float]) -> List[Dict]:
        """New validation rows, stamped with wall and CPU seconds since the process started
        (the CPU as sampled now: rows are picked up within one poll interval)."""
        new = self.read_rows()[len(self.rows):]
        for row in new:
            row["wall_s"] = round(now - self.started, 1)
            row["cpu_s"] = None if cpu is None else round(cpu, 1)
        self.rows += new
        return new

    def stop(self) -> None:
        if self.running:
            self.stopped_by_monitor = True
            os.kill(self.process.pid, signal.SIGTERM)
            _, status, usage = os.wait4(self.process.pid, 0)
            self.process.returncode = self.returncode = os.waitstatus_to_exitcode(status)
            self.wall_s = round(time.time() - self.started, 1)
            self.cpu_s = round(usage.ru_utime + usage.ru_stime, 1)
            self.log_file.close()

    def summary(self) -> Dict:
        return {"command": self.command, "log": str(self.log), "returncode": self.returncode,
                "stopped_by_monitor": self.stopped_by_monitor, "wall_s": self.wall_s, "cpu_s": self.cpu_s,
                "cpu_per_wall": round(self.cpu_s / self.wall_s, 3) if self.wall_s else None,
                "epochs": len(self.rows), "history": self.rows}


def _mace_training_started(log: Path) -> bool:
    try:
        return "Started training" in log.read_text()
    except OSError:
        return False


def _fmt(job: Job) -> str:
    if not job.rows:
        cpu = tree_cpu_seconds(job.process.pid) if job.running else job.cpu_s
        return f"{job.name}: no epoch yet (CPU {(cpu or 0) / 60:.1f} min)"
    r = job.rows[-1]
    return (f"{job.name}: epoch {r['epoch']} valid F RMSE {1000 * r['valid_force_rmse']:.1f} meV/Å, "
            f"E {1000 * r['valid_energy_rmse_per_atom']:.2f} meV/atom (CPU {(r['cpu_s'] or 0) / 60:.1f} min)")


def train_side_by_side(mace: Job, race: Job, minutes: float, grace_minutes: float,
                       on_progress: Callable[[], None], poll_s: float = 2.0, report_s: float = 30.0) -> Dict:
    """Start both jobs together (one thread each) and watch them.

    bayesrace stops itself: its loop checks ``max_minutes`` after each epoch, so its last epoch ends
    just past the budget. MACE has no wall-clock option; it gets the same rule: its clock starts at
    its "Started training" log line, and it is stopped (SIGTERM) a few seconds after the first
    epoch that ends past the budget (its checkpoint of that epoch, if the epoch improved, is
    written by then), or at budget + ``grace_minutes`` if no epoch ends before that."""
    env = {**os.environ, **SINGLE_THREAD_ENV}
    for job in (mace, race):
        print("  $ " + " ".join(job.command), flush=True)
    mace.start(env)
    race.start(env)
    budget = 60.0 * minutes
    mace_clock = None
    stop_at = None
    last_report = time.time()
    while mace.running or race.running:
        time.sleep(poll_s)
        now = time.time()
        changed = False
        for job in (mace, race):
            cpu = tree_cpu_seconds(job.process.pid) if job.running else job.cpu_s
            changed |= bool(job.update_rows(now, cpu))
            if job.running:
                job.poll()
                if not job.running:
                    state = "done" if job.returncode == 0 else f"FAILED (exit {job.returncode}, see {job.log})"
                    print(f"  {job.name}: {state} after {job.wall_s:.0f} s wall, {job.cpu_s:.0f} CPU s", flush=True)
        if mace.running and mace_clock is None and _mace_training_started(mace.log):
            mace_clock = now
            print(f"  MACE started training after {now - mace.started:.0f} s of setup", flush=True)
        if mace.running and mace_clock is not None and stop_at is None:
            past = [r for r in mace.rows if r["wall_s"] - (mace_clock - mace.started) > budget]
            if past:
                stop_at = now + 5.0  # let the checkpoint of that epoch be written
            elif now - mace_clock > budget + 60.0 * grace_minutes:
                stop_at = now
        if mace.running and stop_at is not None and now >= stop_at:
            mace.stop()
            print(f"  MACE stopped by the monitor after {(now - mace_clock) / 60:.2f} min of training "
                  f"({len(mace.rows)} epochs)", flush=True)
        if race.running and now - race.started > budget + 60.0 * max(grace_minutes, 10.0):
            print("  bayesrace overran its budget by far: stopping it", flush=True)
            race.stop()
        if changed or now - last_report >= report_s:
            if now - last_report >= report_s:
                load = Path("/proc/loadavg").read_text().split()[0]
                print(f"  [{(now - race.started) / 60:5.1f} min] {_fmt(mace)} | {_fmt(race)} | load {load}", flush=True)
                last_report = now
            on_progress()
    return {"mace_training_started_after_s": None if mace_clock is None else round(mace_clock - mace.started, 1),
            "mace_training_minutes": None if mace_clock is None else round((mace.started + mace.wall_s - mace_clock)
                                                                           / 60.0, 2)}


# ----------------------------------------------------------------------------------------
# MACE's model file from its last checkpoint


def _checkpoints(work_dir: Path) -> List[Path]:
    def epoch(p: Path) -> int:
        match = re.search(r"epoch-(\d+)", p.name)
        return int(match.group(1)) if match else -1

    return sorted((work_dir / "checkpoints").glob("*.pt"), key=epoch)


def finish_mace(command: List[str], work_dir: Path, log: Path) -> Dict:
    """``mace_run_train --restart_latest --max_num_epochs 0``: loads the newest checkpoint (MACE
    writes one, with the EMA weights, whenever the validation loss improves), trains no further
    epoch and saves ``mace.model`` (and ``mace_stagetwo.model`` with --swa, which is then used);
    without --swa it is stopped once the model is saved (MACE then computes its own error tables,
    which this benchmark does not use). A checkpoint that was being written when training was
    stopped is removed and the one before it used."""
    swa = "--swa" in command or "--stage_two" in command
    models = [work_dir / "mace.model", work_dir / "mace_stagetwo.model"]
    finish = list(command) + ["--max_num_epochs", "0", "--restart_latest"]  # later options win
    env = {**os.environ, **SINGLE_THREAD_ENV}
    removed = []
    for attempt in range(2):
        if not _checkpoints(work_dir):
            return {"model": None, "problem": "MACE wrote no checkpoint (no epoch finished within the budget)",
                    "removed_checkpoints": removed}
        for model in models:
            model.unlink(missing_ok=True)
        started = time.time()
        with open(log, "a") as out:
            out.write(f"\n# attempt {attempt}: " + " ".join(finish) + "\n")
            out.flush()
            process = subprocess.Popen(finish, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
            while process.poll() is None:
                time.sleep(1.0)
                text = log.read_text().split("# attempt")[-1]
                if not swa and models[0].exists() and "Computing metrics" in text:
                    process.terminate()
                    process.wait()
                    break
        text = log.read_text().split("# attempt")[-1]
        epochs = re.findall(r"Loaded Stage (one|two) model from epoch (\d+)", text)
        model = models[1] if swa and models[1].exists() else models[0]
        if model.exists() and epochs:
            return {"model": str(model), "stage": "two" if model == models[1] else "one",
                    "checkpoint_epoch": int(epochs[-1][1]) + 1, "finish_command": finish,
                    "finish_s": round(time.time() - started, 1), "removed_checkpoints": removed}
        newest = _checkpoints(work_dir)[-1]
        removed.append(newest.name)
        newest.unlink()
    return {"model": None, "problem": f"could not make a model file from MACE's checkpoints (see {log})",
            "removed_checkpoints": removed}
