"""MD throughput of pair_style bayesrace in LAMMPS: atom-steps/s and ms/step, halo layer vs shell.

Systems: one PSB3 molecule (14 atoms, non-periodic) and a periodic lattice of PSB3
molecules at about 100, 1 000, 10 000 and 100 000 atoms; 1 and 2 MPI ranks; ensembles of
M = 1, 4 and 8 members, all evaluated in one pass (untrained weights: the cost does not
depend on their values), float64 or float32 (``--dtype``). Every case runs in each halo
mode of ``--halo``: ``layer`` (ghosts one cutoff + skin deep, node features exchanged
between ranks after every message-passing layer), ``layer-recompute`` (the same with
``recompute yes``: each layer runs again in the backward pass, in pieces, so memory follows
a piece, not the domain) and ``shell`` (ghosts n_layers × cutoff + skin deep, the model a
black box). Cases that would need tens of GB are skipped (``too_big``). Each system and rank count also runs
LAMMPS' own SNAP (twojmax 6, the same 5 Å cutoff, random linear coefficients) as the
baseline of a local potential in the same invocation.

Every timing is LAMMPS' own "Loop time" of an NVE run after a warm-up run, with the global
uncertainty compute read every 10 steps. Ratios are taken against baselines measured in
the same invocation: M = 1 for the cost of M members, 1 rank for 2 ranks, shell for layer.
Peak memory is the largest resident set of any one process of the run (ru_maxrss of a
fresh launcher's children), i.e. per rank; ghosts per rank are LAMMPS' "Nghost" average;
system time and page faults per step are rank 0's over the timed run only (its
/proc/<pid>/stat, read by LAMMPS' ``shell`` command before and after that run, divided by the
run's force evaluations: its steps + the setup's one); rank 0's CPU (user + system) per step
over the loop's wall time per step is its CPU share, which says how much a loaded machine
slowed a case.

    python bench/md_throughput.py [--quick] [--halo layer shell] [--out bench/results/md_throughput]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
# bench helpers: bench/ is not a package
from _common import RESULTS_DIR, LoadSampler, command_line, git_commit, machine_info  # noqa: E402
from _common import uncommitted_changes, uptime, write_json  # noqa: E402
from _md_throughput_report import add_ratios, plugin_info, write_markdown  # noqa: E402

from bayesrace import Posterior, build_model, model_config_from
from bayesrace.export import export_posterior
from bayesrace.lammps import run_lmp
from bayesrace.data import build_psb3

TYPES = ["H", "C", "N"]
# layer-recompute: halo layer with `recompute yes` (one piece of one layer's graph in memory)
HALOS = ("layer", "shell", "layer-recompute")
# a PSB3 molecule (planar, about 8.5 Å long) per orthorhombic cell; images stay > 2 Å apart
CELL = np.array([11.0, 7.0, 5.0])
# (name, replicate, periodic, steps); step counts keep each case to tens of seconds
SYSTEMS = [
    ("psb3_molecule", (1, 1, 1), False, 100),
    ("psb3_lattice_112", (2, 2, 2), True, 5),
    ("psb3_lattice_1120", (5, 4, 4), True, 2),
    ("psb3_lattice_10206", (9, 9, 9), True, 1),
    ("psb3_lattice_101080", (20, 19, 19), True, 1),
]
# SNAP is about three orders of magnitude cheaper per atom-step: more steps for a loop
# time well above the timer's resolution
SNAP_STEPS_PER_STEP = 20
SNAP_TWOJMAX = 6
SNAP_CUTOFF = 5.0  # Å, the cutoff of the `small` preset
_PEAK_LAUNCHER = (
    "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
    "usage = resource.getrusage(resource.RUSAGE_CHILDREN); "
    "print('PEAK_RSS_KIB', usage.ru_maxrss); "
    "print('CHILD_RUSAGE', usage.ru_utime, usage.ru_stime, usage.ru_minflt, usage.ru_majflt); sys.exit(code)"
)
LOOP = re.compile(r"Loop time of ([0-9.eE+-]+) on (\d+) procs for (\d+) steps with (\d+) atoms")
NGHOST = re.compile(r"Nghost:\s+([0-9.eE+-]+) ave\s+([0-9.eE+-]+) max\s+([0-9.eE+-]+) min")
# rank 0's /proc/<pid>/stat (sh's parent is LAMMPS) before and after the timed run; quoted so that
# LAMMPS does not substitute $PPID itself
STAT_BEFORE = 'shell "cat /proc/$PPID/stat > rank0_before.stat"'
STAT_AFTER = 'shell "cat /proc/$PPID/stat > rank0_after.stat; grep VmHWM /proc/$PPID/status >> rank0_after.stat"'


def make_deployable(members: int, preset: str, path: Path, dtype: str = "float64") -> None:
    config = model_config_from(preset, avg_num_neighbors=12.0)
    models = [build_model(config, TYPES, seed=seed).eval() for seed in range(members)]
    export_posterior(Posterior(models).eval(), path, training_data_sha256="untrained-benchmark-weights", dtype=dtype)


def bispectrum_count(twojmax: int) -> int:
    """Number of SNAP bispectrum components B_{j1 j2 j} (j2 <= j1 <= j <= twojmax)."""
    return sum(1 for j1 in range(twojmax + 1) for j2 in range(j1 + 1)
               for j in range(j1 - j2, min(twojmax, j1 + j2) + 1, 2) if j >= j1)


def write_snap(directory: Path, seed: int = 0) -> None:
    """snap.snapcoeff / snap.snapparam: linear SNAP for H, C, N with small random coefficients
    (the cost does not depend on them; tiny, so that atoms at rest stay put) and a cutoff of SNAP_CUTOFF between every pair."""
    rng = np.random.default_rng(seed)
    n_coeff = bispectrum_count(SNAP_TWOJMAX) + 1  # + the constant term
    lines = ["# bayesrace benchmark: random linear SNAP coefficients", "", f"{len(TYPES)} {n_coeff}"]
    for element in TYPES:
        # cutoff of a pair = rcutfac * (radius_i + radius_j)
        lines.append(f"{element} 0.5 1.0")
        lines += [f"{c:.3e}" for c in 1e-6 * rng.standard_normal(n_coeff)]
    (directory / "snap.snapcoeff").write_text("\n".join(lines) + "\n")
    params = [f"rcutfac {SNAP_CUTOFF}", f"twojmax {SNAP_TWOJMAX}", "rfac0 0.99363", "rmin0 0.0",
              "bzeroflag 1", "quadraticflag 0"]
    (directory / "snap.snapparam").write_text("\n".join(params) + "\n")


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


def bayesrace_pair(model: Path, halo: Optional[str]) -> str:
    """pair_style bayesrace (with ``halo`` when given) and its global uncertainty on the thermo line."""
    settings = {None: "", "layer-recompute": " halo layer recompute yes"}.get(halo, f" halo {halo}")
    style = "pair_style bayesrace" + settings
    return f"""{style}
pair_coeff * * {model} {' '.join(TYPES)}
compute ug all bayesrace
thermo_style custom step pe c_ug[1] c_ug[4]"""


def snap_pair(directory: Path) -> str:
    return f"""pair_style snap
pair_coeff * * {directory / 'snap.snapcoeff'} {directory / 'snap.snapparam'} {' '.join(TYPES)}
thermo_style custom step pe"""


def lammps_input(pair: str, periodic: bool, steps: int, thermal: bool = True, thermo_every: int = 10) -> str:
    """NVE from 300 K (``thermal``) or from rest, a 2-step warm-up, then the timed run between
    rank 0's /proc snapshots; thermo (with the pair's global uncertainty) every ``thermo_every`` steps."""
    boundary = "p p p" if periodic else "f f f"
    velocity = "velocity all create 300 4928459 loop geom\n" if thermal else ""
    return f"""units metal
boundary {boundary}
atom_style atomic
read_data data.lmp
{pair}
{velocity}fix nve all nve
timestep 0.0005
thermo {thermo_every}
run 2
{STAT_BEFORE}
run {steps}
{STAT_AFTER}
"""


def rank0_usage(workdir: Path, steps: int) -> dict:
    """Rank 0's system/user ms and page faults per force evaluation of the timed run, and its peak RSS.

    The snapshots bracket the whole ``run`` command, whose setup evaluates the forces once before
    the ``steps`` timed steps: the deltas are divided by steps + 1 evaluations."""
    try:
        before = (workdir / "rank0_before.stat").read_text()
        after_lines = (workdir / "rank0_after.stat").read_text().splitlines()
    except OSError:
        return {}
    # fields after "(comm)": state ppid ... minflt(7) cminflt majflt(9) cmajflt utime(11) stime(12)
    first, last = before.rsplit(")", 1)[1].split(), after_lines[0].rsplit(")", 1)[1].split()
    delta = {name: int(last[i]) - int(first[i]) for name, i in (("minflt", 7), ("majflt", 9), ("utime", 11), ("stime", 12))}
    tick_ms = 1000.0 / os.sysconf("SC_CLK_TCK")
    evaluations = steps + 1
    usage = {
        "rank0_sys_ms_per_step": delta["stime"] * tick_ms / evaluations,
        "rank0_user_ms_per_step": delta["utime"] * tick_ms / evaluations,
        "rank0_minor_faults_per_step": delta["minflt"] / evaluations,
        "rank0_major_faults_per_step": delta["majflt"] / evaluations,
    }
    hwm = [line.split()[1] for line in after_lines[1:] if line.startswith("VmHWM")]
    if hwm:
        usage["rank0_peak_rss_mib"] = int(hwm[0]) / 1024.0
    return usage


def run_case(workdir: Path, pair: str, periodic: bool, steps: int, ranks: int, thermal: bool = True,
             thermo_every: int = 10) -> dict:
    (workdir / "in.lmp").write_text(lammps_input(pair, periodic, steps, thermal, thermo_every))
    # a fresh launcher per case: ru_maxrss of its children is this case's largest process
    started = time.time()
    result = run_lmp(["-in", "in.lmp", "-log", "none", "-nocite"], workdir, ranks,
                     launcher=[sys.executable, "-c", _PEAK_LAUNCHER], check=False)
    wall = time.time() - started
    loops = LOOP.findall(result.output)
    if result.returncode != 0 or len(loops) < 2:
        raise RuntimeError(f"LAMMPS failed (exit {result.returncode}) in {workdir}:\n{result.output[-3000:]}")
    seconds, procs, n_steps, atoms = loops[-1]  # the timed run, after the warm-up
    seconds, n_steps, atoms = float(seconds), int(n_steps), int(atoms)
    peak_kib = int(re.findall(r"PEAK_RSS_KIB (\d+)", result.output)[-1])
    user, system, minflt, majflt = re.findall(r"CHILD_RUSAGE (\S+) (\S+) (\d+) (\d+)", result.output)[-1]
    ghosts = NGHOST.findall(result.output)
    plugins = re.findall(r"Loaded (\d+) plugins? from (\S+)", result.output)
    return {
        "atoms": atoms,
        "ranks": int(procs),
        "steps": n_steps,
        "ms_per_step": 1000.0 * seconds / n_steps,
        "atom_steps_per_s": atoms * n_steps / seconds,
        # ru_maxrss of children only grows: report it where this run raised it
        "peak_rss_mib": peak_kib / 1024.0,
        "ghosts_per_rank": float(ghosts[-1][0]) if ghosts else None,
        "ghosts_max_rank": float(ghosts[-1][1]) if ghosts else None,
        **rank0_usage(workdir, n_steps),
        # the whole launch (start-up, warm-up and timed run), every process together
        "all_processes_user_s": float(user),
        "all_processes_sys_s": float(system),
        "all_processes_minor_faults": int(minflt),
        "all_processes_major_faults": int(majflt),
        "wall_s": wall,
        "plugins_loaded": " ".join(plugins[0]) if plugins else None,
    }


def too_big(system: str, members: int, halo: str) -> bool:
    """Cases that would need tens of GB on this machine: the 3-layer ghost shell beyond 10^3
    atoms with M > 1 or at 10^5 atoms, and layer mode keeping every layer's graph at 10^5."""
    if system.endswith("101080"):
        return halo != "layer-recompute"
    return system.endswith("10206") and members > 1 and halo == "shell"


def measure(rows: list, key: dict, workdir: Path, pair: str, replicate, periodic: bool, steps: int,
            ranks: int, thermal: bool = True) -> None:
    """Run one case in a new ``workdir``, append its row (or its failure) to ``rows`` and print it."""
    workdir.mkdir()
    write_data(workdir / "data.lmp", replicate, periodic)
    label = f"{key['system']:22s} {key['pair']:9s} M={key['members'] or '-'} {key['halo'] or '-':15s} np={ranks}"
    try:
        row = {**key, **run_case(workdir, pair, periodic, steps, ranks, thermal)}
    except RuntimeError as error:
        rows.append({**key, "ranks": ranks, "error": str(error)[-1500:]})
        print(f"{label}: FAILED\n{str(error)[-1500:]}", flush=True)
        return
    rows.append(row)
    ghosts = "-" if row["ghosts_per_rank"] is None else f"{row['ghosts_per_rank']:.0f}"
    print(f"{label}: {row['ms_per_step']:10.2f} ms/step {row['atom_steps_per_s']:12.0f} atom-steps/s  "
          f"ghosts/rank {ghosts:>7s}  peak {row['peak_rss_mib']:7.0f} MiB", flush=True)


def main(argv=None) -> int:
    names = [name for name, *_ in SYSTEMS]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS_DIR / "md_throughput"))
    parser.add_argument("--preset", default="small")
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64", help="the deployables' dtype")
    parser.add_argument("--quick", action="store_true", help="fewer cases and steps (a smoke run)")
    parser.add_argument("--halo", nargs="+", choices=HALOS, default=list(HALOS),
                        help="halo modes of pair_style bayesrace, each case runs in every one (default: both)")
    parser.add_argument("--systems", nargs="+", choices=names, default=None, help="default: all (--quick: the molecule)")
    parser.add_argument("--members", nargs="+", type=int, default=None, help="ensemble sizes M (default 1 4 8; --quick: 1 4)")
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 2], help="MPI rank counts (default 1 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed MD steps of every system (default: per system)")
    parser.add_argument("--no-snap", action="store_true", help="skip the LAMMPS SNAP baseline")
    parser.add_argument("--stem", default="results", help="output files STEM.md and STEM.json (default: results)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    systems = SYSTEMS[:1] if args.quick else SYSTEMS
    member_counts = [1, 4] if args.quick else [1, 4, 8]
    if args.systems:
        systems = [s for s in SYSTEMS if s[0] in args.systems]
    if args.members:
        member_counts = args.members
    meta = {
        "command": command_line("md_throughput.py", argv),
        "commit": git_commit(),
        "uncommitted_changes": uncommitted_changes(),
        "uptime_before": uptime(),
        "preset": args.preset,
        "model": model_config_from(args.preset, avg_num_neighbors=12.0).__dict__,
        "dtype": args.dtype,
        "machine": machine_info(),
        "plugin": plugin_info(),
        "snap": None if args.no_snap else {"twojmax": SNAP_TWOJMAX, "cutoff": SNAP_CUTOFF,
                                          "bispectrum": bispectrum_count(SNAP_TWOJMAX),
                                          "steps_per_bayesrace_step": SNAP_STEPS_PER_STEP},
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    rows, snap_rows = [], []
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp, LoadSampler() as load:
        tmp = Path(tmp)
        models = {}
        for members in member_counts:
            models[members] = tmp / f"model_M{members}.pt"
            make_deployable(members, args.preset, models[members], args.dtype)
        write_snap(tmp)
        for name, replicate, periodic, steps in systems:
            steps = args.steps or steps
            for ranks in [] if args.no_snap else args.ranks:
                workdir = tmp / f"{name}_snap_np{ranks}"
                key = {"system": name, "pair": "snap", "members": None, "halo": None}
                # from rest: random SNAP forces from 300 K blow the cells apart within a picosecond
                measure(snap_rows, key, workdir, snap_pair(tmp), replicate, periodic, steps * SNAP_STEPS_PER_STEP,
                        ranks, thermal=False)
            for members in member_counts:
                for ranks in args.ranks:
                    # halo modes innermost: the runs compared with each other are neighbours in time
                    for halo in args.halo:
                        if too_big(name, members, halo):
                            continue
                        workdir = tmp / f"{name}_M{members}_{halo}_np{ranks}"
                        key = {"system": name, "pair": "bayesrace", "members": members, "halo": halo}
                        pair = bayesrace_pair(models[members], halo)
                        measure(rows, key, workdir, pair, replicate, periodic, steps, ranks)
    meta.update(uptime_after=uptime(), load_during_run=load.summary(), wall_s=round(time.time() - started, 1),
                load_average_at_end=os.getloadavg())
    meta["lammps_plugins_loaded"] = next((r["plugins_loaded"] for r in rows if r.get("plugins_loaded")), None)
    add_ratios(rows, snap_rows)
    write_json(out / f"{args.stem}.json", {"meta": meta, "rows": rows, "snap_rows": snap_rows}, indent=1)
    (out / f"{args.stem}.md").write_text(write_markdown(meta, rows, snap_rows))
    print(f"\nwritten: {out / (args.stem + '.md')}")
    return 1 if any("error" in r for r in rows + snap_rows) else 0


if __name__ == "__main__":
    sys.exit(main())
