"""Uncertainty on demand: the MD cost of an M-member posterior driven by one member
(``pair_style bayesrace dynamics member 0``) against one model and against the mean of M.

With ``dynamics member K`` the pair style evaluates member K alone on steps that do not
report uncertainty and every member on steps that do (a ``compute bayesrace`` read by thermo,
``fix halt`` or a dump). Per system, in one invocation and one after another:

  one model        M = 1, thermo with the global uncertainty every 10 steps
  mean of M        M members, dynamics mean (every member every step), thermo every 10
  member 0, every N   M members, dynamics member 0, uncertainty read every N steps (N = 10, 100)

Every timing is LAMMPS' "Loop time" of an NVE run after a 2-step warm-up (``md_throughput``'s
machinery: untrained weights of the preset, float64, one torch thread per rank). A timed run
of S steps reports uncertainty at its first step, every N-th and its last: the column
``uq steps`` counts them. The ratio is ms/step over the one model's, measured minutes apart
on the same machine (the load is in the results).

    python bench/member_alone.py [--members 4] [--systems psb3_lattice_112 psb3_lattice_1120] [--ranks 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, LoadSampler, command_line, git_commit, machine_info  # noqa: E402
from _common import uncommitted_changes, uptime, write_json  # noqa: E402
from md_throughput import SYSTEMS, TYPES, make_deployable, run_case, write_data  # noqa: E402

import torch  # noqa: E402

STEPS = {"psb3_molecule": 400, "psb3_lattice_112": 100, "psb3_lattice_1120": 40, "psb3_lattice_10206": 20}


def pair(model: Path, halo: str, dynamics: str) -> str:
    return f"""pair_style bayesrace halo {halo} dynamics {dynamics}
pair_coeff * * {model} {' '.join(TYPES)}
compute ug all bayesrace
thermo_style custom step pe c_ug[1] c_ug[6]"""


def uq_steps(steps: int, every: int) -> int:
    """Force evaluations of the timed run (steps 2..2+steps, the setup's included) that report uncertainty."""
    first, last = 2, 2 + steps
    return len({first, last} | {s for s in range(first, last + 1) if s % every == 0})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--systems", nargs="+", choices=list(STEPS), default=["psb3_lattice_112", "psb3_lattice_1120"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[1])
    parser.add_argument("--halo", choices=["layer", "shell"], default="layer")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--every", nargs="+", type=int, default=[10, 100], help="uncertainty every N steps")
    parser.add_argument("--out", default=str(RESULTS_DIR / "member_alone"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"command": command_line("member_alone.py", argv), "commit": git_commit(),
            "uncommitted_changes": uncommitted_changes(), "uptime_before": uptime(), "machine": machine_info(),
            "preset": args.preset, "halo": args.halo, "date": time.strftime("%Y-%m-%d %H:%M")}
    rows = []
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp, LoadSampler() as load:
        tmp = Path(tmp)
        models = {m: tmp / f"model_M{m}.pt" for m in (1, args.members)}
        for m, path in models.items():
            make_deployable(m, args.preset, path)
        for name, replicate, periodic, _ in [s for s in SYSTEMS if s[0] in args.systems]:
            steps = STEPS[name]
            for ranks in args.ranks:
                cases = [("one model", 1, "mean", 10), (f"mean of {args.members}", args.members, "mean", 10)]
                cases += [(f"member 0, every {n}", args.members, "member 0", n) for n in args.every]
                baseline = None
                for label, m, dynamics, every in cases:
                    work = tmp / f"{name}_{label.replace(' ', '_').replace(',', '')}_np{ranks}"
                    work.mkdir()
                    write_data(work / "data.lmp", replicate, periodic)
                    row = run_case(work, pair(models[m], args.halo, dynamics), periodic, steps, ranks,
                                   thermo_every=every)
                    baseline = baseline or row["ms_per_step"]
                    row.update(system=name, case=label, members=m, dynamics=dynamics, uq_every=every,
                               uq_steps=uq_steps(steps, every), ratio_to_one_model=row["ms_per_step"] / baseline)
                    rows.append(row)
                    print(f"{name:20s} np={ranks} {label:20s} {row['ms_per_step']:9.2f} ms/step  "
                          f"× one model {row['ratio_to_one_model']:.2f}  (uq on {row['uq_steps']} of "
                          f"{row['steps'] + 1} evaluations)", flush=True)
                    write_json(out / "results.json", {"meta": meta, "rows": rows}, indent=1)
    meta.update(uptime_after=uptime(), load_during_run=load.summary(), wall_s=round(time.time() - started, 1),
                load_average_at_end=os.getloadavg())
    write_json(out / "results.json", {"meta": meta, "rows": rows}, indent=1)
    lines = ["# MD cost of dynamics member 0 (uncertainty on demand) against one model", "",
             f"Command: `{meta['command']}` ({meta['date']}, {meta['wall_s']} s wall).",
             f"Commit `{meta['commit']}`; uncommitted: {', '.join(meta['uncommitted_changes']) or 'none'}.",
             f"Preset `{args.preset}`, float64, halo {args.halo}, untrained weights; {meta['machine'].get('cpu', '')}.",
             f"Load before: `{meta['uptime_before']}`; after: `{meta['uptime_after']}`; during: {meta['load_during_run']}.",
             "", "| system | atoms | ranks | case | steps | uq steps | ms/step | × one model |",
             "|---|---:|---:|---|---:|---:|---:|---:|"]
    lines += [f"| {r['system']} | {r['atoms']} | {r['ranks']} | {r['case']} | {r['steps']} | {r['uq_steps']} | "
              f"{r['ms_per_step']:.1f} | {r['ratio_to_one_model']:.2f} |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print(f"\nwritten: {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
