"""TorchScript against AOTInductor (.pt2) deployables of one posterior: time per evaluation.

Builds an untrained posterior of M members of a model preset (the time does not depend on
the weights), exports it both ways (``export_posterior``, ``export_posterior_aoti`` with the
plain model only), checks that both give the same numbers, and times the C++ engine (the
code LAMMPS runs, shell mode, one thread) on random periodic C/H/N structures of N atoms:
the median over repeats of one evaluation (energies, forces, virial, every σ).

    python bench/aoti_speed.py [--preset small] [--members 4] [--atoms 64 512] [--repeats 15]

Writes bench/results/aoti/results.md and results.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import RESULTS_DIR, command_line, git_commit, machine_info, uptime, write_json

from bayesrace import keys
from bayesrace.bayes import Posterior
from bayesrace.data import neighbour_list
from bayesrace.export import export_posterior, export_posterior_aoti
from bayesrace.model import build_model, model_config_from

TYPES = ["H", "C", "N"]
DENSITY = 0.1  # atoms per Å^3, about that of an organic liquid


def structure(n_atoms: int, cutoff: float, seed: int = 0):
    """Random positions (no pair closer than 0.9 Å) in a cubic cell: the engine's inputs."""
    rng = np.random.default_rng(seed)
    length = (n_atoms / DENSITY) ** (1 / 3)
    points = []
    while len(points) < n_atoms:
        p = rng.uniform(0.0, length, 3)
        d = np.asarray(points) - p if points else np.zeros((0, 3))
        if not len(d) or (np.linalg.norm(d - length * np.round(d / length), axis=1) > 0.9).all():
            points.append(p)
    positions = np.array(points)
    cell = np.eye(3) * length
    edge_index, shift = neighbour_list(positions, cell, np.ones(3, dtype=bool), cutoff)
    species = np.arange(n_atoms, dtype=np.int64) % len(TYPES)
    return positions, species, edge_index, shift.astype(np.float64) @ cell


def median_time(engine, inputs, repeats: int) -> float:
    for _ in range(3):  # warm-up
        engine.evaluate(*inputs, len(inputs[0]), "mean", False)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        engine.evaluate(*inputs, len(inputs[0]), "mean", False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--atoms", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "aoti")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from bayesrace import _bayesrace_core as core

    load_start = uptime()
    config = model_config_from(args.preset, avg_num_neighbors=20.0)
    members = [build_model(config, TYPES, [-13.6, -1030.0, -1480.0], 0.1, 0.7, dtype=torch.float64, seed=s)
               for s in range(args.members)]
    posterior = Posterior(members).eval()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pt, pt2 = Path(tmp) / "model.pt", Path(tmp) / "model.pt2"
        export_posterior(posterior, pt, training_data_sha256="0" * 64)
        start = time.perf_counter()
        export_posterior_aoti(posterior, pt2, training_data_sha256="0" * 64, atomic_virial=False)
        compile_s = time.perf_counter() - start
        engines = {"torchscript": core.Engine(str(pt)), "aoti": core.Engine(str(pt2))}
        for n_atoms in args.atoms:
            inputs = structure(n_atoms, posterior.cutoff)
            outs = {name: e.evaluate(*inputs, n_atoms, "mean", False) for name, e in engines.items()}
            diff = max(float(np.abs(outs["aoti"][k] - outs["torchscript"][k]).max()
                             / max(np.abs(outs["torchscript"][k]).max(), 1e-300))
                       for k in (keys.ENERGY, keys.FORCES, keys.ATOMIC_FORCE_STD))
            times = {name: median_time(e, inputs, args.repeats) for name, e in engines.items()}
            row = {"atoms": n_atoms, "edges": int(inputs[2].shape[1]), "torchscript_ms": 1e3 * times["torchscript"],
                   "aoti_ms": 1e3 * times["aoti"], "speedup": times["torchscript"] / times["aoti"],
                   "max_relative_difference": diff}
            rows.append(row)
            print(f"N={n_atoms} E={row['edges']}: TorchScript {row['torchscript_ms']:.1f} ms, .pt2 "
                  f"{row['aoti_ms']:.1f} ms, ratio {row['speedup']:.2f}x (max rel. difference {diff:.1e})", flush=True)
    result = {"command": command_line("aoti_speed.py", argv), "commit": git_commit(), "machine": machine_info(),
              "load_before": load_start, "load_after": uptime(), "preset": args.preset, "members": args.members,
              "compile_s": compile_s, "threads": 1, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", result)
    lines = [f"# TorchScript vs AOTInductor (.pt2): C++ engine, shell mode, one thread", "",
             f"`{result['command']}` at {result['commit']}", "",
             f"Model: preset {args.preset}, {args.members} members, float64; .pt2 compile {compile_s:.0f} s "
             f"(plain model only). Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, "
             f"torch {result['machine']['torch']}; load before: {load_start}; after: {result['load_after']}.", "",
             "| atoms | edges | TorchScript ms | .pt2 ms | TorchScript / .pt2 | max rel. diff |",
             "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['atoms']} | {r['edges']} | {r['torchscript_ms']:.1f} | {r['aoti_ms']:.1f} | "
              f"{r['speedup']:.2f} | {r['max_relative_difference']:.1e} |" for r in rows]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
