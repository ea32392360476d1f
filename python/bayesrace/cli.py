"""The ``bayesrace`` command: data, train, evaluate, predict, export, demo.

Errors a user can fix (bad data, bad config, missing files) are printed as one line
naming what is wrong, with exit status 2; nothing prints a Python traceback for them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional


class UsageError(Exception):
    """Bad command-line input."""


def _parse_sets(items: List[str]) -> dict:
    """'name=path' or 'path' (named by its stem) -> {name: path}."""
    sets = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).stem, item
        if name in sets:
            raise UsageError(f"data set name {name!r} given twice; use name=path to tell them apart")
        sets[name] = path
    return sets


def cmd_data(args) -> None:
    from ._psb3 import generate_psb3

    if args.dataset != "psb3":
        raise UsageError(f"unknown data set {args.dataset!r}; available: psb3")
    manifest = generate_psb3(args.out, seed=args.seed, scale=args.scale, progress=not args.quiet)
    for name, entry in manifest["files"].items():
        print(f"{Path(args.out) / name}: {entry['frames']} frames")


def cmd_train(args) -> None:
    from ._config import load_config
    from ._train import train

    config = load_config(args.config)
    if args.out:
        config.out = args.out
    from ._mpi import mpi_world

    path = train(config, progress=not args.quiet)
    if mpi_world()[1] == 0:
        print(f"posterior written to {path}")


def cmd_evaluate(args) -> None:
    from ._evaluate import evaluate_sets, format_table
    from ._posterior import load_posterior

    posterior = load_posterior(args.posterior)
    results = evaluate_sets(
        posterior,
        _parse_sets(args.sets),
        report_dir=args.report,
        energy_key=args.energy_key,
        forces_key=args.forces_key,
        progress=not args.quiet,
    )
    print(format_table(results))
    if args.report:
        print(f"report written to {args.report}")


def cmd_predict(args) -> None:
    import ase.io

    from ._calculator import UNCERTAINTY_RESULTS, BayesRaceCalculator
    from ._data import read_frames

    calculator = BayesRaceCalculator(args.posterior)
    frames = read_frames(args.input, require_energy=False, require_forces=False)
    out = []
    for frame in frames:
        atoms = ase.Atoms(numbers=frame.numbers, positions=frame.positions, cell=frame.cell, pbc=frame.pbc)
        atoms.calc = calculator
        energy = atoms.get_potential_energy()
        forces = atoms.get_forces()
        result = atoms.copy()
        result.info["energy_predicted"] = energy
        result.arrays["forces_predicted"] = forces
        for name in UNCERTAINTY_RESULTS:
            value = calculator.results[name]
            if getattr(value, "ndim", 0) == 0:
                result.info[name] = float(value)
            elif value.shape[0] == len(atoms) and value.ndim == 1:
                result.arrays[name] = value
        out.append(result)
    ase.io.write(args.out, out, format="extxyz")
    print(f"{len(out)} structures with predictions and uncertainties written to {args.out}")


def cmd_demo(args) -> None:
    from ._demo import run_demo

    run_demo(Path(args.out), members=args.members, minutes=args.minutes, ranks=args.np, quiet=args.quiet)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bayesrace", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="generate a built-in data set (psb3: the PSB3 cation with GFN2-xTB labels)")
    p.add_argument("dataset", help="psb3")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="multiplies the number of frames")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=cmd_data)

    p = sub.add_parser("train", help="train a RACE ensemble from a YAML config (mpirun -np K runs members in parallel)")
    p.add_argument("config")
    p.add_argument("--out", help="override the config's 'out' directory")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("evaluate", help="errors and uncertainties of a posterior on labelled files")
    p.add_argument("posterior", help="posterior.pt written by 'bayesrace train'")
    p.add_argument("sets", nargs="+", help="files to evaluate, as path or name=path")
    p.add_argument("--report", help="directory for metrics.json, plots and report.md")
    p.add_argument("--energy-key", default="energy")
    p.add_argument("--forces-key", default="forces")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=cmd_evaluate)

    p = sub.add_parser("predict", help="predict energies, forces and uncertainties for structures in a file")
    p.add_argument("posterior")
    p.add_argument("input", help="structures (extxyz or anything ASE reads)")
    p.add_argument("--out", required=True, help="extxyz output")
    p.set_defaults(run=cmd_predict)

    # listed for --help; main() hands its arguments to the exporter's own parser
    sub.add_parser("export", help="freeze a posterior into one TorchScript deployable for LAMMPS (bayesrace-export)")

    p = sub.add_parser("demo", help="the main job: PSB3 data, ensemble training, evaluation, report")
    p.add_argument("--out", default="out/demo")
    p.add_argument("--members", type=int, default=4)
    p.add_argument("--minutes", type=float, default=2.0, help="training budget per member")
    p.add_argument("--np", type=int, default=1, help="train members on this many MPI ranks")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=cmd_demo)
    return parser


def _version() -> str:
    from . import __version__

    return f"bayesrace {__version__}"


def main(argv: Optional[List[str]] = None) -> int:
    from ._config import ConfigError
    from ._data import DataError

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export"]:
        from ._export import main as export_main

        return export_main(argv[1:], prog="bayesrace export")
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (UsageError, ConfigError, DataError, FileNotFoundError, RuntimeError) as error:
        print(f"bayesrace {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
