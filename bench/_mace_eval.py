"""One harness for both models of bench/accuracy_vs_mace.py: predictions on the test sets and the
cost of one energy+forces evaluation, through each model's ASE calculator, one thread.

Run with the python of the model's environment (this file imports neither bayesrace nor mace at
the top, nor any other bench/ module, so the MACE venv can run it):

    MACE venv python bench/_mace_eval.py --kind mace --model mace.model --out DIR \\
        --test test_MD_300K=PATH ... --speed acac_64_box=PATH:30 --speed acac_1=PATH

writes DIR/predictions_NAME.npz (energy [n], forces [n, atoms, 3], eV and eV/Å) per test set and
a JSON report (``--json``, default DIR/report.json: versions, per structure timed the atoms, wall
and CPU seconds of every timed call, medians)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402


def calculator(kind: str, model: str):
    import torch

    torch.set_num_threads(1)
    if kind == "mace":
        from mace.calculators import MACECalculator

        return MACECalculator(model_paths=model, device="cpu", default_dtype="float64")
    from bayesrace.calculator import BayesRaceCalculator

    return BayesRaceCalculator(model, dtype=torch.float64, device="cpu")


def versions(kind: str) -> dict:
    import importlib.metadata as metadata

    names = ["torch", "e3nn", "ase", "numpy"] + (["mace-torch"] if kind == "mace" else ["bayesrace"])
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def predict(calc, path: str, out: Path, name: str, progress_every: int = 200) -> dict:
    import ase.io

    frames = ase.io.read(path, ":")
    energies, forces = [], []
    started = time.time()
    for i, atoms in enumerate(frames):
        a = atoms.copy()  # without the reference labels' calculator
        a.calc = calc
        energies.append(a.get_potential_energy())
        forces.append(a.get_forces().copy())
        if (i + 1) % progress_every == 0:
            print(f"    {name}: {i + 1}/{len(frames)} structures", flush=True)
    np.savez(out / f"predictions_{name}.npz", energy=np.array(energies), forces=np.array(forces))
    return {"structures": len(frames), "seconds": round(time.time() - started, 1)}


def time_calls(calc, atoms, min_repeats: int, min_seconds: float, max_repeats: int) -> dict:
    """Median wall and CPU seconds of calc.calculate(energy, forces) on ``atoms`` after one
    warm-up call; at least ``min_repeats`` timed calls, more until ``min_seconds`` have passed."""
    from ase.calculators.calculator import all_changes

    properties = ["energy", "forces"]
    started = time.perf_counter()
    calc.calculate(atoms, properties, all_changes)  # warm-up: first-call allocations, caches
    warmup = time.perf_counter() - started
    walls, cpus = [], []
    while len(walls) < max_repeats and (len(walls) < min_repeats or sum(walls) < min_seconds):
        w0, c0 = time.perf_counter(), time.process_time()
        calc.calculate(atoms, properties, all_changes)  # all_changes: neighbour list rebuilt, as in MD
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    wall, cpu = statistics.median(walls), statistics.median(cpus)
    return {"atoms": len(atoms), "pbc": [bool(p) for p in atoms.pbc], "cell": atoms.cell.lengths().tolist(),
            "warmup_s": round(warmup, 4), "wall_s": [round(t, 5) for t in walls], "cpu_s": [round(t, 5) for t in cpus],
            "median_wall_s": round(wall, 5), "median_cpu_s": round(cpu, 5),
            "atom_steps_per_s": round(len(atoms) / wall, 2), "atom_steps_per_cpu_s": round(len(atoms) / cpu, 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=["mace", "race"], required=True)
    parser.add_argument("--model", required=True, help="mace.model, or a bayesrace posterior.pt")
    parser.add_argument("--out", required=True)
    parser.add_argument("--test", action="append", default=[], help="NAME=PATH (repeatable)")
    parser.add_argument("--speed", action="append", default=[],
                        help="NAME=PATH[:BOX]: time it; with BOX, a cubic periodic cell of BOX Å (repeatable)")
    parser.add_argument("--json", default=None, help="report file (default OUT/report.json)")
    parser.add_argument("--min-repeats", type=int, default=3)
    parser.add_argument("--min-seconds", type=float, default=10.0)
    parser.add_argument("--max-repeats", type=int, default=20)
    args = parser.parse_args(argv)
    import ase.io

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    calc = calculator(args.kind, args.model)
    import torch

    report = {"kind": args.kind, "model": args.model, "versions": versions(args.kind),
              "torch_threads": torch.get_num_threads(), "tests": {}, "speed": {}}
    for item in args.test:
        name, path = item.split("=", 1)
        print(f"  {args.kind}: predicting {name}", flush=True)
        report["tests"][name] = predict(calc, path, out, name)
    for item in args.speed:
        name, spec = item.split("=", 1)
        path, _, box = spec.partition(":")
        atoms = ase.io.read(path)
        if box:
            atoms.set_cell([float(box)] * 3)
            atoms.pbc = True
        print(f"  {args.kind}: timing {name} ({len(atoms)} atoms)", flush=True)
        report["speed"][name] = time_calls(calc, atoms, args.min_repeats, args.min_seconds, args.max_repeats)
        s = report["speed"][name]
        print(f"  {args.kind}: {name}: {s['median_wall_s']:.4f} s per call, {s['atom_steps_per_s']:.0f} atom-steps/s",
              flush=True)
    Path(args.json or out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
