"""How far a hot on-the-fly run's σ is from the training temperature's, round by round.

For each round r of an on-the-fly run folder (``bench/al_otf.py --runs``): one unhalted MD run
at the training temperature (``--control-temperature``, ``--control-steps``) and one at the hot
temperature, both from the start structure with the round's deployable; per dumped frame the
largest calibrated epistemic force σ (LAMMPS, ``c_u[2]``) and, on every ``--every``-th frame, the
largest relative one σ_epi,i / (|F_i| + 1 eV/Å) from the round's calibrated posterior (Python).
Prints and writes the quantiles; a run of S steps completes only if its largest value over all
checks stays under τ, so the maxima are what matter.

    python bench/al_otf_sigma_levels.py /work/runs/otf800_ahead2 --rounds 0 2 4 6 8 10 --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def run_levels(runs: Path, r: int, temperature: float, steps: int, seed: int, every: int, workdir: Path) -> dict:
    import ase.io

    from bayesrace.active import MDSection
    from bayesrace.calculator import BayesRaceCalculator
    from bayesrace.export import read_metadata
    from bayesrace.lammps import lammps_data_text, read_dump, run_md_segment
    from bayesrace.lammps._segment import DUMP_FILE

    round_dir = runs / "otf" / f"round_{r}"
    start = ase.io.read(runs / "data" / "start.xyz")
    model = round_dir / "model.pt"
    type_names = list(read_metadata(model)["type_names"])
    md = MDSection(structure=str(runs / "data" / "start.xyz"), box=40.0, temperature=temperature,
                   thermostat="langevin", damping=0.1, timestep=0.0005, n_steps=steps, dump_every=10,
                   halt_on="epistemic")
    run_md_segment(model, type_names, md, 1e9, workdir, lammps_data_text(start, type_names, md.box), 0,
                   first_segment=True, molecule=True, segment_seed=seed)
    frames = [f for f in read_dump(workdir / DUMP_FILE) if f["step"] > 0]
    sigma = [float(np.max(f["columns"]["c_u[2]"])) for f in frames]
    calc = BayesRaceCalculator(round_dir / "posterior_calibrated.pt")
    relative = []
    for frame in frames[::every]:
        columns = frame["columns"]
        order = np.argsort(columns["id"])
        atoms = start.copy()
        atoms.positions = np.stack([columns["xu"], columns["yu"], columns["zu"]], 1)[order]
        atoms.calc = calc
        atoms.get_forces()
        relative.append(float(calc.results["forces_std_relative"].max()))
    return dict(max_sigma=sigma, max_relative=relative)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="a bench/al_otf.py --runs folder (otf/round_*, data/start.xyz)")
    parser.add_argument("--rounds", type=int, nargs="+", default=[0])
    parser.add_argument("--control-temperature", type=float, default=300.0)
    parser.add_argument("--control-steps", type=int, default=4000)
    parser.add_argument("--hot-temperature", type=float, default=800.0)
    parser.add_argument("--hot-steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=4, help="relative σ on every N-th dumped frame")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for r in args.rounds:
        for label, temperature, steps, seed in (("control", args.control_temperature, args.control_steps, 11),
                                                ("hot", args.hot_temperature, args.hot_steps, 12)):
            levels = run_levels(args.runs, r, temperature, steps, seed, args.every,
                                args.out / "md" / f"round{r}_{label}")
            results[f"round{r}_{label}"] = dict(round=r, temperature=temperature, steps=steps, **levels)
            quantiles = {name: np.round(np.quantile(values, [0.5, 0.9, 0.99, 1.0]), 3).tolist()
                         for name, values in levels.items()}
            print(f"round {r} {temperature:g} K ({steps} steps): q50/q90/q99/max  σ_epi {quantiles['max_sigma']}"
                  f"  relative {quantiles['max_relative']}", flush=True)
            (args.out / "levels.json").write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
