"""Helpers shared by the benchmark scripts in bench/ (each script imports this, never another script).

Owns:

- paths: the repository, bench/results/ (summaries, committed) and bench/runs/ (run
  directories, checkpoints, per-method reports and plots: git-ignored), the data sets;
- data: the PSB3 set every PSB3 benchmark shares, writing frame subsets;
- jobs: ``bayesrace`` CLI commands (under mpirun for several ranks) and ``run_jobs``, which runs
  them side by side with per-job wall and CPU seconds;
- provenance: the command line, commit, machine, load and installed package of a run;
- result writing: YAML configs and JSON results.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
RUNS_DIR = BENCH_DIR / "runs"
ACAC_DIR = (REPO / ".." / "shared" / "data" / "acac").resolve()
# made by bayesrace.data.generate_psb3(seed=0); shared by bench/uq.py, bench/al.py and bench/al_otf.py
PSB3_DIR = RUNS_DIR / "uq" / "data_psb3"

# one torch/OpenMP thread per process: the benchmarks count cores by processes (ranks)
SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# ----------------------------------------------------------------------------------------
# data


def psb3_data(directory: Path = PSB3_DIR) -> Path:
    """The PSB3 set of ``generate_psb3(seed=0)`` in ``directory``, generated there if missing."""
    if not (directory / "manifest.json").exists():
        from bayesrace.data import generate_psb3

        print("generating PSB3 with GFN2-xTB (about a minute)", flush=True)
        generate_psb3(directory, seed=0, progress=False)
    return directory


def write_frames(path: Path, frames) -> Path:
    """ASE frames as extxyz (parent folders created)."""
    import ase.io

    path.parent.mkdir(parents=True, exist_ok=True)
    ase.io.write(path, frames, format="extxyz")
    return path


# ----------------------------------------------------------------------------------------
# jobs


def cli_command(subcommand: str, config_path: Path, ranks: int = 1, quiet: bool = True) -> List[str]:
    """``python -m bayesrace.cli SUBCOMMAND CONFIG [--quiet]``, under ``mpirun -np ranks`` if ranks > 1."""
    command = [sys.executable, "-m", "bayesrace.cli", subcommand, str(config_path)] + (["--quiet"] if quiet else [])
    from bayesrace.lammps import mpirun_executable

    return [mpirun_executable(), "-np", str(ranks)] + command if ranks > 1 else command


def run_jobs(jobs: List[Dict], slots: int, announce_end: bool = True,
             on_done: Optional[Callable[[Dict], None]] = None) -> None:
    """Run jobs side by side, at most ``slots`` cores busy, with per-job CPU accounting.

    A job is a dict with ``name``, ``command`` (argv), ``log`` (path) and ``ranks`` (cores it
    occupies: an ``mpirun -np K`` job takes K). Each job runs from the repository root with one
    torch/OpenMP thread per process; ``wall_s``, ``cpu_s``, ``returncode`` and ``started`` (epoch
    seconds) are added to its dict. CPU seconds come from ``os.wait4``: the CPU of the job's
    whole process tree, which stays right when jobs run at the same time (RUSAGE_CHILDREN
    deltas do not). ``on_done(job)`` is called as each job ends (e.g. to record it while the
    others still run, so a partial report is possible)."""
    pending = list(jobs)
    # the Popen objects stay referenced until reaped here: an unreferenced running Popen is
    # reaped by subprocess' own clean-up at the next Popen, and os.wait4 would never see it
    running: Dict[int, tuple] = {}
    busy = 0
    env = {**os.environ, **SINGLE_THREAD_ENV}
    while pending or running:
        while pending and busy + min(pending[0]["ranks"], slots) <= slots:
            job = pending.pop(0)
            job["ranks"] = min(job["ranks"], slots)
            print("  $ " + " ".join(shlex.quote(str(c)) for c in job["command"]), flush=True)
            job["log_file"] = open(job["log"], "w")
            job["started"] = time.time()
            process = subprocess.Popen(job["command"], stdout=job["log_file"], stderr=subprocess.STDOUT,
                                       env=env, cwd=REPO)
            running[process.pid] = (job, process)
            busy += job["ranks"]
        pid, status, usage = os.wait4(-1, 0)
        if pid not in running:
            continue
        job, process = running.pop(pid)
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        busy -= job["ranks"]
        job.pop("log_file").close()
        job["wall_s"] = round(time.time() - job["started"], 1)
        job["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 1)
        job["returncode"] = process.returncode
        if announce_end:
            state = "done" if job["returncode"] == 0 else f"FAILED (exit {job['returncode']}, see {job['log']})"
            print(f"  {job['name']}: {state} in {job['wall_s']:.0f} s wall, {job['cpu_s']:.0f} CPU s", flush=True)
        if on_done is not None:
            on_done(job)


# ----------------------------------------------------------------------------------------
# provenance: command, commit, machine, load, installed package


def command_line(script: str, argv: Optional[Sequence[str]] = None) -> str:
    """``python bench/SCRIPT ARGS`` as typed from the repository root (``argv`` defaults to sys.argv[1:])."""
    args = sys.argv[1:] if argv is None else argv
    return f"python bench/{script} " + " ".join(shlex.quote(a) for a in args)


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "python"], capture_output=True, text=True, check=True
        ).stdout.strip()
        return out.stdout.strip() + (" (python/ has uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def uncommitted_changes() -> List[str]:
    """``git status --porcelain`` lines of the whole repository (empty when clean or without git)."""
    try:
        out = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return []
    return [line for line in out.stdout.splitlines() if line.strip()]


def uptime() -> str:
    """The output of ``uptime`` (time, users, load averages), or /proc/loadavg without it."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "loadavg " + Path("/proc/loadavg").read_text().strip()


def machine_info() -> Dict:
    import torch

    import bayesrace

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
    """sha256 (first 12 hex digits) over the imported bayesrace's Python files: other engineers
    reinstall the package while benchmarks run, and a run should say if its code changed under it."""
    root = Path(importlib.util.find_spec("bayesrace").origin).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


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


def timed_job(name: str, command: List[str], log_path: Path, ranks: int) -> Dict:
    """One job run alone (``run_jobs``) under a LoadSampler: its command, exit status, wall and
    CPU seconds, CPU share per rank, and the 1-minute load while it ran."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    package = installed_package_hash()
    job = dict(name=name, command=command, log=log_path, ranks=ranks)
    with LoadSampler() as sampler:
        run_jobs([job], slots=ranks, announce_end=False)
    wall, cpu = job["wall_s"], job["cpu_s"]
    return {
        "command": command,
        "returncode": job["returncode"],
        "wall_s": wall,
        "cpu_s": cpu,
        # CPU seconds per rank per wall second: 1.0 means every rank had a core to itself
        "cpu_per_rank_per_wall": round(cpu / (wall * ranks), 3) if wall > 0 else None,
        "ranks": ranks,
        "load": sampler.summary(),
        "load_samples": sampler.samples,
        "log": str(log_path),
        "installed_bayesrace_sha": package,
        "started": datetime.datetime.fromtimestamp(job["started"]).isoformat(timespec="seconds"),
    }


# ----------------------------------------------------------------------------------------
# result writing


def write_config(values: Dict, path: Path) -> Path:
    """A config as YAML (keys in the given order), parent folders created."""
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def write_json(path: Path, value, indent: int = 2, default=None) -> Path:
    """JSON with a trailing newline (``default`` as in json.dumps, e.g. str for paths)."""
    path.write_text(json.dumps(value, indent=indent, default=default) + "\n")
    return path
