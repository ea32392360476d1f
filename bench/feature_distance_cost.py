"""The MD cost of the feature distance (``c_u[7]``, ``c_ug[9]``): one model with and without a
feature density, uncertainty reported on every step (its worst case), against M members.

Per system, one invocation after another: ``one model`` (M = 1, no density), ``one model +
density`` (the same weights, a density fitted on jittered copies of the system's PSB3 molecule),
and ``mean of M`` (M members, no density: what an ensemble's σ costs). Every case reads
``c_ug[1]`` and ``c_ug[9]`` on every step. Timings are LAMMPS' "Loop time" after a 2-step warm-up
(``md_throughput``'s machinery: untrained weights of the preset, float64, halo layer, one torch
thread per rank); rank 0's system time and page faults per step come with them.

    python bench/feature_distance_cost.py [--systems psb3_lattice_112 psb3_lattice_1120] [--members 4]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, LoadSampler, command_line, git_commit, machine_info  # noqa: E402
from _common import uncommitted_changes, uptime, write_json  # noqa: E402
from md_throughput import SYSTEMS, TYPES, run_case, write_data  # noqa: E402

import torch  # noqa: E402

STEPS = {"psb3_molecule": 200, "psb3_lattice_112": 60, "psb3_lattice_1120": 20}


def make_deployable(members: int, preset: str, path: Path, density: bool) -> None:
    from bayesrace.bayes import Posterior, fit_feature_density
    from bayesrace.data import Frame, TypeMap, build_psb3, frames_to_graphs
    from bayesrace.export import export_posterior
    from bayesrace.model import build_model, model_config_from

    config = model_config_from(preset, avg_num_neighbors=12.0)
    posterior = Posterior([build_model(config, TYPES, seed=seed).eval() for seed in range(members)]).eval()
    if density:
        molecule, rng = build_psb3(), np.random.default_rng(0)
        frames = [Frame(numbers=molecule.numbers.astype(np.int64),
                        positions=molecule.positions + rng.normal(0.0, 0.05, molecule.positions.shape),
                        cell=np.zeros((3, 3)), pbc=np.zeros(3, dtype=bool), source=f"jittered {k}") for k in range(40)]
        graphs = frames_to_graphs(frames, TypeMap(TYPES), posterior.cutoff)
        posterior.feature_density = fit_feature_density(list(posterior.members), graphs)
    export_posterior(posterior, path, training_data_sha256="untrained-benchmark-weights")


def pair(model: Path) -> str:
    return f"""pair_style bayesrace halo layer
pair_coeff * * {model} {' '.join(TYPES)}
compute ug all bayesrace
thermo_style custom step pe c_ug[1] c_ug[9]"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--systems", nargs="+", choices=list(STEPS), default=["psb3_lattice_112", "psb3_lattice_1120"])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--out", default=str(RESULTS_DIR / "feature_distance_cost"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"command": command_line("feature_distance_cost.py", argv), "commit": git_commit(),
            "uncommitted_changes": uncommitted_changes(), "uptime_before": uptime(), "machine": machine_info(),
            "preset": args.preset, "date": time.strftime("%Y-%m-%d %H:%M")}
    rows = []
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp, LoadSampler() as load:
        tmp = Path(tmp)
        cases = [("one model", 1, False), ("one model + density", 1, True), (f"mean of {args.members}", args.members, False)]
        models = {label: tmp / f"model_{k}.pt" for k, (label, _, _) in enumerate(cases)}
        for label, m, density in cases:
            make_deployable(m, args.preset, models[label], density)
        for name, replicate, periodic, _ in [s for s in SYSTEMS if s[0] in args.systems]:
            baseline = None
            for label, m, density in cases:
                work = tmp / f"{name}_{label.replace(' ', '_').replace('+', 'plus')}"
                work.mkdir()
                write_data(work / "data.lmp", replicate, periodic)
                row = run_case(work, pair(models[label]), periodic, STEPS[name], 1, thermo_every=1)
                baseline = baseline or row["ms_per_step"]
                row.update(system=name, case=label, members=m, density=density,
                           ratio_to_one_model=row["ms_per_step"] / baseline)
                rows.append(row)
                print(f"{name:20s} {label:22s} {row['ms_per_step']:9.2f} ms/step  × one model "
                      f"{row['ratio_to_one_model']:.3f}", flush=True)
                write_json(out / "results.json", {"meta": meta, "rows": rows}, indent=1)
    meta.update(uptime_after=uptime(), load_during_run=load.summary(), wall_s=round(time.time() - started, 1),
                load_average_at_end=os.getloadavg())
    write_json(out / "results.json", {"meta": meta, "rows": rows}, indent=1)
    sys_key, fault_key = "rank0_sys_ms_per_step", "rank0_minor_faults_per_step"
    lines = ["# MD cost of the feature distance (one model with and without a density, uncertainty every step)", "",
             f"Command: `{meta['command']}` ({meta['date']}, {meta['wall_s']} s wall).",
             f"Commit `{meta['commit']}`; uncommitted: {', '.join(meta['uncommitted_changes']) or 'none'}.",
             f"Preset `{args.preset}`, float64, halo layer, 1 rank, untrained weights; {meta['machine'].get('cpu', '')}.",
             f"Load before: `{meta['uptime_before']}`; after: `{meta['uptime_after']}`; during: {meta['load_during_run']}.",
             "", "| system | atoms | case | steps | ms/step | × one model | rank 0 sys ms/step | minor faults/step |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['system']} | {r['atoms']} | {r['case']} | {r['steps']} | {r['ms_per_step']:.1f} | "
              f"{r['ratio_to_one_model']:.3f} | {r.get(sys_key, float('nan')):.2f} | {r.get(fault_key, float('nan')):.0f} |"
              for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print(f"\nwritten: {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
