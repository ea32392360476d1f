"""The MACE side of bench/accuracy_vs_mace.py: its own virtual environment (mace-torch pins
e3nn 0.4.4, bayesrace needs e3nn 0.6), created once and reused, and the facts about it that a
result should record (versions, how long the creation took)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

# the torch of the bayesrace environment: pinned exactly first, so that pip does not pull a newer
# torch (with gigabytes of CUDA wheels) when it resolves mace-torch
TORCH_PIN = "torch==2.13.0"
MACE_PACKAGE = "mace-torch"
STAMP = "bayesrace_bench_env.json"  # written into the venv once it is complete


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _run(command: List[str], log, env: Optional[Dict] = None) -> None:
    log.write("$ " + " ".join(command) + "\n")
    log.flush()
    result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` exited with status {result.returncode} (see {log.name})")


def installed_versions(venv: Path) -> Dict:
    """Versions of python, torch, e3nn, mace-torch and ase inside the MACE venv."""
    code = (
        "import json, platform, importlib.metadata as m\n"
        "out = {'python': platform.python_version()}\n"
        "for name in ('mace-torch', 'torch', 'e3nn', 'ase', 'numpy'):\n"
        "    try: out[name] = m.version(name)\n"
        "    except m.PackageNotFoundError: out[name] = None\n"
        "print(json.dumps(out))\n"
    )
    result = subprocess.run([str(venv_python(venv)), "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def ensure_mace_venv(venv: Path, mace_spec: str = MACE_PACKAGE, log_path: Optional[Path] = None) -> Dict:
    """The MACE venv at ``venv``, created with ``python -m venv`` and ``pip install torch==2.13.0
    mace-torch`` unless a complete one (its stamp file present) is already there.

    Returns the stamp: versions, the install commands, creation seconds and whether it was reused.
    A half-made venv (no stamp: an interrupted creation) is completed by running pip again."""
    venv = Path(venv).resolve()
    stamp_path = venv / STAMP
    if stamp_path.exists() and venv_python(venv).exists():
        stamp = json.loads(stamp_path.read_text())
        if stamp.get("requested") == mace_spec:
            stamp["reused"] = True
            return stamp
    log_path = Path(log_path or venv.parent / "mace_venv_install.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"creating the MACE environment {venv} (python -m venv; pip install {TORCH_PIN} {mace_spec}); "
          f"log: {log_path}", flush=True)
    started = time.time()
    # pip inside the new venv must not see the bayesrace venv's packages
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    commands = []
    with open(log_path, "a") as log:
        if not venv_python(venv).exists():
            commands.append([sys.executable, "-m", "venv", str(venv)])
            _run(commands[-1], log, env)
        pip = [str(venv_python(venv)), "-m", "pip", "install", "--progress-bar", "off"]
        # torch first and alone, pinned: its CPU wheel, never a CUDA build
        commands.append(pip + [TORCH_PIN])
        _run(commands[-1], log, env)
        commands.append(pip + [TORCH_PIN, mace_spec])
        _run(commands[-1], log, env)
    seconds = round(time.time() - started, 1)
    stamp = {
        "requested": mace_spec,
        "commands": [" ".join(c) for c in commands],
        "created_s": seconds,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "versions": installed_versions(venv),
    }
    if stamp["versions"].get("torch", "").split("+")[0] != TORCH_PIN.split("==")[1]:
        raise RuntimeError(f"the MACE venv got torch {stamp['versions'].get('torch')}, not {TORCH_PIN}")
    stamp_path.write_text(json.dumps(stamp, indent=2) + "\n")
    print(f"MACE environment ready in {seconds:.0f} s: {stamp['versions']}", flush=True)
    stamp["reused"] = False
    return stamp


if __name__ == "__main__":  # python bench/_mace_env.py [VENV]: create (or check) the venv alone
    from _common import RUNS_DIR

    print(json.dumps(ensure_mace_venv(Path(sys.argv[1]) if len(sys.argv) > 1 else RUNS_DIR / "mace_venv"), indent=2))
