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


# acac (atom order of ../shared/data/acac): the C1-C2 bond test_dihedral.xyz scans (the training
# set's |C0-C1-C2-O3| stays below 30°) and the enol proton H11 between O3 and O5 (training frames
# keep |d(O3-H) - d(O5-H)| above 0.22 Å: the proton sits on one oxygen)
ACAC_DIHEDRAL = (0, 1, 2, 3)
ACAC_DIHEDRAL_ANGLES_DEG = (45.0, 75.0, 105.0, 135.0, 165.0)
ACAC_PROTON, ACAC_OXYGENS = 11, (3, 5)
ACAC_PROTON_OFFSETS_A = (-0.12, -0.06, 0.0, 0.06, 0.12)  # d(O3-H) - d(O5-H) held, Å


def _acac_side(atoms, pivot: int, away_from: int) -> list:
    """Atoms reached from ``pivot`` without crossing the ``pivot``-``away_from`` bond (covalent radii)."""
    from ase.neighborlist import natural_cutoffs, neighbor_list

    first, second = neighbor_list("ij", atoms, natural_cutoffs(atoms, mult=1.2))  # bonds stretch in MD
    neighbours = {k: set(second[first == k]) for k in range(len(atoms))}
    side, todo = {pivot}, [pivot]
    while todo:
        for n in neighbours[todo.pop()] - side - {away_from}:
            side.add(n)
            todo.append(n)
    if away_from in side:
        raise ValueError(f"acac: atoms {pivot} and {away_from} lie on a ring; no side to rotate")
    return sorted(side)


def acac_thermal_sets(data: Path, frames_per_point: int = 12, seed: int = 0) -> Dict[str, Path]:
    """Unlabelled acac test sets from 300 K GFN2-xTB MD (the generator of the training geometries)
    with one coordinate held by FixInternals: ``test_dihedral_thermal.xyz`` (C0-C1-C2-O3 at
    ACAC_DIHEDRAL_ANGLES_DEG) and ``test_H_transfer_thermal.xyz`` (the proton at
    ACAC_PROTON_OFFSETS_A). Written once into ``data``. The shared scans are partially relaxed,
    so their small forces alone tell them from MD; these frames have thermal forces, and carry no
    DFT labels (only AUROCs, not errors, come from them)."""
    import ase
    import ase.io
    from ase.constraints import FixInternals

    from bayesrace.data import one_openmp_thread, xtb_calculator, xtb_md_samples, xtb_relax

    paths = {"test_dihedral_thermal": data / "test_dihedral_thermal.xyz",
             "test_H_transfer_thermal": data / "test_H_transfer_thermal.xyz"}
    if all(path.exists() for path in paths.values()):
        return paths
    start = ase.io.read(ACAC_DIR / "train_300K.xyz", index=0)
    start.calc = None
    if start.get_distance(ACAC_PROTON, ACAC_OXYGENS[0]) > 1.2:
        raise ValueError(f"{ACAC_DIR / 'train_300K.xyz'}: frame 0's H{ACAC_PROTON} is not on O{ACAC_OXYGENS[0]}; "
                         "the atom order differs from the one this benchmark assumes")
    streams = iter(np.random.SeedSequence([seed, 11]).spawn(len(ACAC_DIHEDRAL_ANGLES_DEG) + len(ACAC_PROTON_OFFSETS_A)))
    rotating = _acac_side(start, ACAC_DIHEDRAL[2], ACAC_DIHEDRAL[1])
    mask = [k in rotating for k in range(len(start))]
    o_a, o_b = ACAC_OXYGENS
    def held(atoms, hold, config_type, info):
        """Relax ``atoms`` (≤ 40 BFGS steps) with the coordinate ``hold()`` fixes, then sample 300 K MD with it."""
        atoms.set_constraint(hold())
        atoms.calc = xtb_calculator(0.0)
        xtb_relax(atoms, 0.05, 40)
        atoms.set_constraint()
        atoms.calc = None
        return xtb_md_samples(atoms, 0.0, 300.0, frames_per_point, np.random.default_rng(next(streams)), config_type,
                              constraints=[hold()], info=info)

    dihedral, transfer = [], []
    with one_openmp_thread():
        for angle in ACAC_DIHEDRAL_ANGLES_DEG:
            atoms = start.copy()
            atoms.set_dihedral(*ACAC_DIHEDRAL, angle, mask=mask)
            dihedral += held(atoms, lambda: FixInternals(dihedrals_deg=[[angle, list(ACAC_DIHEDRAL)]]),
                             f"acac_md_dihedral_{angle:g}deg", {"dihedral_deg": angle})
        for offset in ACAC_PROTON_OFFSETS_A:
            atoms = start.copy()
            axis = atoms.positions[o_b] - atoms.positions[o_a]
            length = np.linalg.norm(axis)
            # on the O-O line where d(O_a-H) - d(O_b-H) = offset, then relaxed with it held
            atoms.positions[ACAC_PROTON] = atoms.positions[o_a] + axis / length * (length + offset) / 2.0
            combo = [[offset, [[ACAC_PROTON, o_a, 1.0], [ACAC_PROTON, o_b, -1.0]]]]
            transfer += held(atoms, lambda: FixInternals(bondcombos=combo), f"acac_md_proton_{offset:+g}A",
                             {"proton_offset_A": offset})
    for name, frames in (("test_dihedral_thermal", dihedral), ("test_H_transfer_thermal", transfer)):
        # positions only: xTB is not the level of theory of the acac labels
        write_frames(paths[name], [ase.Atoms(numbers=f.numbers, positions=f.positions, info=dict(f.info))
                                   for f in frames])
    return paths


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
