"""float32 against float64 deployables of one posterior: how far apart, how much faster.

Exports the posterior twice (``export_posterior(..., dtype=...)``), evaluates both with the
C++ engine (the code LAMMPS runs) on every structure of a data set, in shell mode
(``Engine.evaluate``) and in layer mode (``Engine.evaluate_layered``), and prints the
largest and typical differences of energies, forces and every σ, and the time per
evaluation.

    python bench/precision.py --posterior out/demo/run/posterior_calibrated.pt \
        --data out/demo/data/test_id.xyz [--limit 50]

Writes bench/results/precision/results.md and results.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import RESULTS_DIR, command_line, git_commit, machine_info, uptime, write_json

from bayesrace import keys
from bayesrace.bayes import load_posterior
from bayesrace.data import neighbour_list, read_frames
from bayesrace.export import export_posterior

FIELDS = {
    "energy [eV]": keys.ENERGY,
    "forces [eV/Å]": keys.FORCES,
    "atomic energy [eV]": keys.ATOMIC_ENERGY,
    "force σ [eV/Å]": keys.ATOMIC_FORCE_STD,
    "force σ epistemic [eV/Å]": keys.ATOMIC_FORCE_STD_EPISTEMIC,
    "force σ aleatoric [eV/Å]": keys.ATOMIC_FORCE_STD_ALEATORIC,
    "energy σ [eV]": keys.ENERGY_STD,
}


def structure_inputs(frame, type_names, cutoff):
    """Positions, species and edges of a molecule (no periodic images: both modes see the same atoms)."""
    if frame.pbc.any():
        raise SystemExit(f"{frame.source}: precision.py compares molecules (no periodic boundaries)")
    edge_index, _ = neighbour_list(frame.positions, np.zeros((3, 3)), frame.pbc, cutoff)
    species = np.array([type_names.index(s) for s in _symbols(frame.numbers)], dtype=np.int64)
    return np.ascontiguousarray(frame.positions, dtype=np.float64), species, edge_index


def _symbols(numbers):
    from ase.data import chemical_symbols

    return [chemical_symbols[int(z)] for z in numbers]


def evaluate(engine, inputs, layered: bool):
    positions, species, edge_index = inputs
    n = len(positions)
    start = time.perf_counter()
    if layered:
        out = engine.evaluate_layered(positions, species, edge_index, n, np.zeros(0, dtype=np.int64))
    else:
        out = engine.evaluate(positions, species, edge_index, np.zeros((edge_index.shape[1], 3)), n, "mean", False)
    return out, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--posterior", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path, help="structures (extxyz), molecules")
    parser.add_argument("--limit", type=int, default=50, help="at most this many structures")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "precision")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from bayesrace import _bayesrace_core as core

    posterior = load_posterior(args.posterior, dtype=torch.float64)
    frames = read_frames(args.data, require_energy=False, require_forces=False)[: args.limit]
    type_names = list(posterior.type_names)
    cutoff = float(posterior.cutoff)
    inputs = [structure_inputs(frame, type_names, cutoff) for frame in frames]
    engines, times = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float64", "float32"):
            path = Path(tmp) / f"{dtype}.pt"
            export_posterior(posterior, path, dtype=getattr(torch, dtype))
            engines[dtype] = core.Engine(str(path))
    rows, outputs = [], {}
    for dtype, engine in engines.items():
        for layered in (False, True):
            evaluate(engine, inputs[0], layered)  # warm-up
            results = [evaluate(engine, one, layered) for one in inputs]
            outputs[(dtype, layered)] = [out for out, _ in results]
            times[f"{dtype} {'layer' if layered else 'shell'}"] = float(np.mean([t for _, t in results]))
    for layered in (False, True):
        mode = "layer" if layered else "shell"
        for label, field in FIELDS.items():
            ref = np.concatenate([np.ravel(o[field]) for o in outputs[("float64", layered)]])
            low = np.concatenate([np.ravel(o[field]) for o in outputs[("float32", layered)]])
            diff = np.abs(low - ref)
            scale = np.abs(ref).mean()
            rows.append({"mode": mode, "quantity": label, "max_abs": float(diff.max()),
                         "mean_abs": float(diff.mean()), "mean_abs_over_mean": float(diff.mean() / max(scale, 1e-300))})
    result = {"command": command_line("precision.py", argv), "commit": git_commit(), "machine": machine_info(),
              "load": uptime(), "posterior": str(args.posterior), "data": str(args.data), "structures": len(frames),
              "atoms": int(sum(len(i[0]) for i in inputs)), "members": len(posterior.members),
              "seconds_per_structure": times, "differences": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", result)
    lines = ["# float32 against float64 deployables (C++ engine)", "",
             f"Command: `{result['command']}`; commit {result['commit']}; load `{result['load']}`.",
             f"{len(frames)} structures, {result['atoms']} atoms, {result['members']} members, one thread.", "",
             "| mode | quantity | max abs diff | mean abs diff | mean abs diff / mean abs value |",
             "|---|---|---:|---:|---:|"]
    lines += [f"| {r['mode']} | {r['quantity']} | {r['max_abs']:.3g} | {r['mean_abs']:.3g} | "
              f"{r['mean_abs_over_mean']:.3g} |" for r in rows]
    lines += ["", "| deployable | seconds per structure |", "|---|---:|"]
    lines += [f"| {name} | {seconds:.4f} |" for name, seconds in times.items()]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
