"""Run benchmark jobs side by side with per-job CPU accounting (shared by bench/uq.py and bench/al.py).

A job is a dict with ``name``, ``command`` (argv), ``log`` (path) and ``ranks`` (cores it
occupies: an ``mpirun -np K`` job takes K). ``run_jobs`` keeps at most ``slots`` cores busy,
runs each job with one torch/OpenMP thread per process and adds ``wall_s``, ``cpu_s`` and
``returncode`` to its dict. CPU seconds come from ``os.wait4``: the CPU of the job's whole
process tree, which stays right when jobs run at the same time (RUSAGE_CHILDREN deltas do not).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parent.parent


def run_jobs(jobs: List[Dict], slots: int) -> None:
    pending = list(jobs)
    running: Dict[int, Dict] = {}
    busy = 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    while pending or running:
        while pending and busy + min(pending[0]["ranks"], slots) <= slots:
            job = pending.pop(0)
            job["ranks"] = min(job["ranks"], slots)
            print("  $ " + " ".join(shlex.quote(str(c)) for c in job["command"]), flush=True)
            job["log_file"] = open(job["log"], "w")
            job["started"] = time.time()
            process = subprocess.Popen(job["command"], stdout=job["log_file"], stderr=subprocess.STDOUT,
                                       env=env, cwd=REPO)
            running[process.pid] = job
            busy += job["ranks"]
        pid, status, usage = os.wait4(-1, 0)
        job = running.pop(pid, None)
        if job is None:
            continue
        busy -= job["ranks"]
        job.pop("log_file").close()
        job["wall_s"] = round(time.time() - job["started"], 1)
        job["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 1)
        job["returncode"] = os.waitstatus_to_exitcode(status)
        state = "done" if job["returncode"] == 0 else f"FAILED (exit {job['returncode']}, see {job['log']})"
        print(f"  {job['name']}: {state} in {job['wall_s']:.0f} s wall, {job['cpu_s']:.0f} CPU s", flush=True)
