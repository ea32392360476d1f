"""MD throughput of pair_style bayesrace in LAMMPS: atom-steps/s and ms/step.

Systems: one PSB3 molecule (14 atoms, non-periodic) and a periodic lattice of PSB3
molecules at about 100, 1 000 and 10 000 atoms; 1 and 2 MPI ranks; ensembles of M = 1,
4 and 8 members (untrained weights: the cost does not depend on their values). Every
timing is LAMMPS' own "Loop time" of an NVE run after a warm-up run, with the global
uncertainty compute read every 10 steps. Ratios are taken against baselines measured in
the same invocation: M = 1 for the cost of M members, 1 rank for 2 ranks. Peak memory is
the largest resident set of any one process of the run (ru_maxrss of a fresh launcher's
children), i.e. per rank.

    python bench/md_throughput.py [--quick] [--out bench/results/md_throughput]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR  # noqa: E402  (bench helpers: bench/ is not a package)

from bayesrace import Posterior, build_model, model_config_from
from bayesrace.export import export_posterior
from bayesrace.lammps import run_lmp
from bayesrace.data import build_psb3

TYPES = ["H", "C", "N"]
# a PSB3 molecule (planar, about 8.5 Å long) per orthorhombic cell; images stay > 2 Å apart
CELL = np.array([11.0, 7.0, 5.0])
_PEAK_LAUNCHER = (
    "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
    "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)"
)
LOOP = re.compile(r"Loop time of ([0-9.eE+-]+) on (\d+) procs for (\d+) steps with (\d+) atoms")


def make_deployable(members: int, preset: str, path: Path) -> None:
    config = model_config_from(preset, avg_num_neighbors=12.0)
    models = [build_model(config, TYPES, seed=seed).eval() for seed in range(members)]
    export_posterior(Posterior(models).eval(), path, training_data_sha256="untrained-benchmark-weights")


def write_data(path: Path, replicate, periodic: bool) -> int:
    molecule = build_psb3()
    positions = molecule.positions - molecule.positions.mean(axis=0) + CELL / 2
    symbols = molecule.get_chemical_symbols()
    nx, ny, nz = replicate
    coords, types = [], []
    for i in range(nx):
        for j in range(ny):
            for k in range(nz):
                coords.append(positions + CELL * np.array([i, j, k]))
                types += [TYPES.index(s) + 1 for s in symbols]
    coords = np.concatenate(coords)
    box = CELL * np.array(replicate) if periodic else np.array([40.0, 40.0, 40.0])
    if not periodic:
        coords = coords - coords.mean(axis=0) + box / 2
    masses = {1: 1.008, 2: 12.011, 3: 14.007}
    lines = ["bayesrace benchmark", "", f"{len(coords)} atoms", "3 atom types", ""]
    lines += [f"0 {box[0]} xlo xhi", f"0 {box[1]} ylo yhi", f"0 {box[2]} zlo zhi", "", "Masses", ""]
    lines += [f"{t} {m}" for t, m in masses.items()] + ["", "Atoms # atomic", ""]
    lines += [f"{n + 1} {t} {x:.10f} {y:.10f} {z:.10f}" for n, (t, (x, y, z)) in enumerate(zip(types, coords))]
    path.write_text("\n".join(lines) + "\n")
    return len(coords)


def lammps_input(model: Path, periodic: bool, steps: int) -> str:
    boundary = "p p p" if periodic else "f f f"
    return f"""units metal
boundary {boundary}
atom_style atomic
read_data data.lmp
pair_style bayesrace
pair_coeff * * {model} {' '.join(TYPES)}
compute ug all bayesrace
velocity all create 300 4928459 loop geom
fix nve all nve
timestep 0.0005
thermo_style custom step pe c_ug[1] c_ug[4]
thermo 10
run 2
run {steps}
"""


def run_case(workdir: Path, model: Path, periodic: bool, steps: int, ranks: int) -> dict:
    (workdir / "in.lmp").write_text(lammps_input(model, periodic, steps))
    # a fresh launcher per case: ru_maxrss of its children is this case's largest process
    started = time.time()
    result = run_lmp(["-in", "in.lmp", "-log", "none", "-nocite"], workdir, ranks,
                     launcher=[sys.executable, "-c", _PEAK_LAUNCHER], check=False)
    wall = time.time() - started
    if result.returncode != 0:
        raise RuntimeError(f"LAMMPS failed in {workdir}:\n{result.output[-3000:]}")
    loops = LOOP.findall(result.output)
    seconds, procs, n_steps, atoms = loops[-1]  # the timed run, after the warm-up
    seconds, n_steps, atoms = float(seconds), int(n_steps), int(atoms)
    peak_kib = int(re.findall(r"PEAK_RSS_KIB (\d+)", result.output)[-1])
    return {
        "atoms": atoms,
        "ranks": int(procs),
        "steps": n_steps,
        "ms_per_step": 1000.0 * seconds / n_steps,
        "atom_steps_per_s": atoms * n_steps / seconds,
        # ru_maxrss of children only grows: report it where this run raised it
        "peak_rss_mib": peak_kib / 1024.0,
        "wall_s": wall,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS_DIR / "md_throughput"))
    parser.add_argument("--preset", default="small")
    parser.add_argument("--quick", action="store_true", help="fewer cases and steps (a smoke run)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # (name, replicate, periodic, steps); step counts keep each case to tens of seconds
    systems = [
        ("psb3_molecule", (1, 1, 1), False, 100),
        ("psb3_lattice_112", (2, 2, 2), True, 5),
        ("psb3_lattice_1120", (5, 4, 4), True, 2),
        ("psb3_lattice_10206", (9, 9, 9), True, 1),
    ]
    member_counts = [1, 4, 8]
    rank_counts = [1, 2]
    if args.quick:
        systems, member_counts = systems[:1], [1, 4]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = {}
        for members in member_counts:
            models[members] = tmp / f"model_M{members}.pt"
            make_deployable(members, args.preset, models[members])
        for name, replicate, periodic, steps in systems:
            for members in member_counts:
                if name.endswith("10206") and members > 1:
                    continue  # tens of GB with the ghost shell of 3 layers; M=1 shows the scaling
                for ranks in rank_counts:
                    workdir = tmp / f"{name}_M{members}_np{ranks}"
                    workdir.mkdir()
                    write_data(workdir / "data.lmp", replicate, periodic)
                    row = {"system": name, "members": members, **run_case(workdir, models[members], periodic, steps, ranks)}
                    rows.append(row)
                    print(
                        f"{name:22s} M={members} np={ranks}: {row['ms_per_step']:10.2f} ms/step "
                        f"{row['atom_steps_per_s']:12.0f} atom-steps/s  peak {row['peak_rss_mib']:7.0f} MiB",
                        flush=True,
                    )

    def find(system, members, ranks):
        return next((r for r in rows if r["system"] == system and r["members"] == members and r["ranks"] == ranks), None)

    for row in rows:
        single = find(row["system"], 1, row["ranks"])
        serial = find(row["system"], row["members"], 1)
        row["cost_vs_one_member"] = row["ms_per_step"] / single["ms_per_step"] if single else None
        row["speedup_vs_one_rank"] = serial["ms_per_step"] / row["ms_per_step"] if serial else None

    meta = {
        "command": "python bench/md_throughput.py" + (" --quick" if args.quick else ""),
        "preset": args.preset,
        "model": model_config_from(args.preset, avg_num_neighbors=12.0).__dict__,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "load_average_at_end": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        "# LAMMPS MD throughput of pair_style bayesrace",
        "",
        f"Command: `{meta['command']}`. Model preset `{args.preset}` (float64), {meta['machine']},",
        f"load average at the end {meta['load_average_at_end'][0]:.1f}. One torch thread per rank; NVE, 0.5 fs;",
        "global uncertainty read every 10 steps. Baselines in the same run: M=1 (member cost), 1 rank (speed-up).",
        "",
        "| system | atoms | M | ranks | ms/step | atom-steps/s | × M=1 | speed-up vs 1 rank | peak RSS/rank [MiB] |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        peak = f"{r['peak_rss_mib']:.0f}"
        lines.append(
            f"| {r['system']} | {r['atoms']} | {r['members']} | {r['ranks']} | {r['ms_per_step']:.2f} | "
            f"{r['atom_steps_per_s']:.0f} | {r['cost_vs_one_member']:.2f} | {r['speedup_vs_one_rank']:.2f} | {peak} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print(f"\nwritten: {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
