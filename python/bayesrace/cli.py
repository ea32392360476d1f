"""The ``bayesrace`` command: data, train, evaluate, calibrate, predict, export, al, demo.

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
    from .data import generate_psb3

    if args.dataset != "psb3":
        raise UsageError(f"unknown data set {args.dataset!r}; available: psb3")
    manifest = generate_psb3(args.out, seed=args.seed, scale=args.scale, progress=not args.quiet)
    for name, entry in manifest["files"].items():
        print(f"{Path(args.out) / name}: {entry['frames']} frames")


def cmd_train(args) -> None:
    from .train import load_config
    from .train import train

    config = load_config(args.config)
    if args.out:
        config.out = args.out
    from ._mpi import mpi_world

    path = train(config, progress=not args.quiet)
    if mpi_world()[1] == 0:
        print(f"posterior written to {path}")


def cmd_evaluate(args) -> None:
    from .uq import evaluate_sets, format_summary
    from .bayes import load_posterior

    sets = _parse_sets(args.sets)
    if args.calibrate_on is not None and args.calibrate_on not in sets:
        raise UsageError(f"--calibrate-on {args.calibrate_on!r} is not one of the sets {list(sets)} "
                         "(name a set as name=path)")
    posterior = load_posterior(args.posterior)
    try:
        evaluation = evaluate_sets(
            posterior,
            sets,
            report_dir=args.report,
            energy_key=args.energy_key,
            forces_key=args.forces_key,
            progress=not args.quiet,
            calibrate_on=args.calibrate_on,
            calibration_method=args.calibration_method,
        )
    except ValueError as error:  # e.g. a calibration set without labels
        raise UsageError(str(error)) from error
    print(format_summary(evaluation))
    if args.report:
        print(f"report written to {args.report}")


def cmd_calibrate(args) -> None:
    from . import keys
    from .bayes import CalibrationError
    from .uq import calibrate_posterior_file, describe_calibration

    try:
        result = calibrate_posterior_file(
            args.posterior,
            args.valid_file,
            out_path=args.out,
            method=args.method,
            threshold_quantile=args.threshold_quantile,
            threshold_factor=args.threshold_factor,
            energy_key=args.energy_key,
            forces_key=args.forces_key,
            progress=not args.quiet,
        )
    except CalibrationError as error:
        raise UsageError(str(error)) from error
    print(f"{args.method} calibration fitted on {args.valid_file} "
          f"({result['n_structures']} structures, {result['n_atoms']} atoms)")
    print(describe_calibration(result["calibration"]))
    print(f"extrapolation threshold {keys.ATOMIC_FORCE_STD} = {result['threshold']:.4g} eV/Å "
          f"({args.threshold_factor:g} × the {args.threshold_quantile:g} quantile of each structure's largest σ_F)")
    before, after = result["metrics_before"], result["metrics_after"]
    rows = [(f"{part} {label}", f"{part}_{metric}") for part in ("forces", "energy")
            for label, metric in (("NLL", "nll"), ("miscalibration area", "miscalibration_area"), ("ENCE", "ence"))]
    width = max(len(label) for label, _ in rows)
    print(f"{'validation set':<{width}}  {'uncalibrated':>12}  {'calibrated':>12}")
    for label, metric in rows:
        if metric in before or metric in after:
            print(f"{label:<{width}}  {before.get(metric, float('nan')):>12.4g}  {after.get(metric, float('nan')):>12.4g}")
    print(f"calibrated posterior written to {result['out_path']}")


def cmd_predict(args) -> None:
    import ase.io

    from .calculator import UNCERTAINTY_RESULTS, BayesRaceCalculator
    from .data import read_frames

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


def cmd_laplace(args) -> None:
    """Post-hoc last-layer Laplace posterior of one member of a trained posterior."""
    from . import keys
    from .data import TypeMap, frames_to_graphs, iterate_batches, read_frames
    from .bayes import fit_last_layer_laplace, predictive_covariance, sample_members
    from .bayes import save_posterior

    if args.samples < 2 or args.samples % 2:
        raise UsageError(f"--samples must be a positive even number (antithetic pairs), got {args.samples}")
    if args.prior_precision is not None and not args.prior_precision > 0:
        raise UsageError(f"--prior-precision must be positive, got {args.prior_precision}")
    if args.max_structures is not None and args.max_structures < 1:
        raise UsageError(f"--max-structures must be at least 1, got {args.max_structures}")
    source = _load_posterior_or_usage_error(args.posterior)
    if not 0 <= args.member < len(source.members):
        raise UsageError(f"--member {args.member}: {args.posterior} has members 0..{len(source.members) - 1}")
    model = source.members[args.member]
    info = getattr(source, "record_info", {})
    source_config = info.get("config") if isinstance(info.get("config"), dict) else {}
    data_keys = source_config.get("data") or {}  # label keys the member was trained with
    frames = read_frames(
        args.train_file,
        energy_key=data_keys.get("energy_key", "energy"),
        forces_key=data_keys.get("forces_key", "forces"),
    )
    frames = [f for f in frames if len(f.numbers) > 1]  # isolated atoms carry no forces
    if args.max_structures is not None:
        frames = frames[: args.max_structures]
    if not frames:
        raise UsageError(f"{args.train_file}: no structures with more than one atom to fit on")
    graphs = frames_to_graphs(frames, TypeMap(model.type_names), model.cutoff)
    try:
        laplace = fit_last_layer_laplace(
            model, graphs, prior_precision=args.prior_precision, progress=not args.quiet
        )
        members = sample_members(model, laplace, args.samples, seed=args.seed)
    except ValueError as error:
        raise UsageError(str(error)) from error

    sigma_sum, n_atoms = 0.0, 0
    for batch in iterate_batches(graphs, 8, shuffle=False, dtype=next(model.parameters()).dtype):
        sigma = predictive_covariance(model, laplace, batch)[keys.ATOMIC_FORCE_STD_EPISTEMIC]
        sigma_sum += float(sigma.sum())
        n_atoms += sigma.numel()
    save_posterior(
        args.out,
        members,
        kind="laplace",
        laplace=laplace.summary(),
        data_sha256=info.get("data_sha256"),
        config=info.get("config"),
        laplace_source={"posterior": str(Path(args.posterior).resolve()), "member": args.member,
                        "train_file": str(Path(args.train_file).resolve()), "structures": len(graphs)},
    )
    print(f"prior precision alpha = {laplace.prior_precision:.6g}")
    print(f"log marginal likelihood = {laplace.log_marginal_likelihood:.6g} nats "
          f"({laplace.n_parameters} last-layer weights, {laplace.n_structures} structures)")
    print(f"mean epistemic force sigma on the training set = {sigma_sum / max(n_atoms, 1):.6g} eV/Å")
    print(f"laplace posterior with {len(members)} samples written to {args.out}")


def _load_posterior_or_usage_error(path):
    from .bayes import load_posterior

    try:
        return load_posterior(path)
    except ValueError as error:
        raise UsageError(str(error)) from error


def cmd_al(args) -> None:
    from .active import load_active_config, run_pool_al

    config = load_active_config(args.config)
    if config.mode == "on_the_fly":
        from .active import OTF_LOG, run_on_the_fly

        log = run_on_the_fly(config, progress=not args.quiet)
        for record in log["rounds"]:
            print(f"round {record['round']}: MD steps {record['start_step']} -> {record['step_reached']}"
                  f"{' halted' if record['halted'] else ''}, max force σ {record['max_sigma']:.4g} eV/Å "
                  f"(threshold {record['threshold']:.4g}), {record['labels_added']} labels added")
        print(f"{log['status']}: log written to {Path(config.out) / OTF_LOG}")
        return
    curve = run_pool_al(config, progress=not args.quiet)
    for point in curve["points"]:
        scores = " ".join(f"{name}: F MAE {m['forces_mae_eV_per_A']:.4g} eV/Å" for name, m in point["test"].items()
                          if m.get("forces_mae_eV_per_A") is not None)
        print(f"round {point['round']}: {point['n_labels']} labels {scores}".rstrip())
    print(f"learning curve written to {Path(config.out) / 'learning_curve.json'}")


def cmd_demo(args) -> None:
    from .demo import run_demo

    if args.al_rounds < 0:
        raise SystemExit(f"bayesrace demo: --al-rounds must be >= 0, got {args.al_rounds}")
    run_demo(Path(args.out), members=args.members, minutes=args.minutes, ranks=args.np, quiet=args.quiet,
             al_rounds=args.al_rounds)


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

    p = sub.add_parser("train", help="train a RACE posterior (ensemble, mve, swag, ivon, laplace) from a YAML config (mpirun -np K runs ensemble members in parallel)")
    p.add_argument("config")
    p.add_argument("--out", help="override the config's 'out' directory")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("evaluate", help="errors, calibration and OOD detection of a posterior on labelled files")
    p.add_argument("posterior", help="posterior.pt written by 'bayesrace train'")
    p.add_argument("sets", nargs="+", help="files to evaluate, as path or name=path")
    p.add_argument("--report", help="directory for metrics.json, plots and report.md")
    p.add_argument("--calibrate-on", metavar="NAME",
                   help="refit the σ calibration on this set (a labelled validation set) and report every "
                        "metric before and after it")
    p.add_argument("--calibration-method", choices=("isotonic", "scalar"), default="isotonic",
                   help="with --calibrate-on: monotone map of σ or one NLL-optimal factor (default: isotonic)")
    p.add_argument("--energy-key", default="energy")
    p.add_argument("--forces-key", default="forces")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=cmd_evaluate)

    p = sub.add_parser("calibrate", help="fit the σ calibration and extrapolation threshold on a validation set")
    p.add_argument("posterior", help="posterior.pt written by 'bayesrace train'")
    p.add_argument("valid_file", help="labelled validation structures (not used in training)")
    p.add_argument("--method", choices=("isotonic", "scalar"), default="isotonic",
                   help="isotonic: monotone map of σ; scalar: one NLL-optimal factor (default: isotonic)")
    p.add_argument("--out", help="where to write the calibrated posterior (default: overwrite POSTERIOR)")
    p.add_argument("--threshold-quantile", type=float, default=0.99,
                   help="quantile over structures of the largest calibrated force σ (default 0.99)")
    p.add_argument("--threshold-factor", type=float, default=1.5, help="margin on that quantile (default 1.5)")
    p.add_argument("--energy-key", default="energy")
    p.add_argument("--forces-key", default="forces")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=cmd_calibrate)

    p = sub.add_parser("predict", help="predict energies, forces and uncertainties for structures in a file")
    p.add_argument("posterior")
    p.add_argument("input", help="structures (extxyz or anything ASE reads)")
    p.add_argument("--out", required=True, help="extxyz output")
    p.set_defaults(run=cmd_predict)

    p = sub.add_parser("laplace", help="last-layer Laplace posterior (energies and forces) of one trained member")
    p.add_argument("posterior", help="posterior.pt with the trained member")
    p.add_argument("train_file", help="labelled training structures (energies and forces) for the fit")
    p.add_argument("--out", required=True, help="output posterior file (kind 'laplace')")
    p.add_argument("--member", type=int, default=0, help="which member of POSTERIOR to linearise")
    p.add_argument("--samples", type=int, default=8, help="members drawn in antithetic pairs (even)")
    p.add_argument("--prior-precision", type=float, default=None,
                   help="fixed prior precision alpha (default: maximise the Laplace marginal likelihood)")
    p.add_argument("--max-structures", type=int, default=None, help="fit on the first N structures only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=cmd_laplace)

    # listed for --help; main() hands its arguments to the exporter's own parser
    sub.add_parser("export", help="freeze a posterior into one TorchScript deployable for LAMMPS (bayesrace-export)")

    p = sub.add_parser("al", help="active learning from a YAML config (mode: pool: train, pick by BALD from a "
                                  "pool, label, repeat; mode: on_the_fly: LAMMPS MD halts at high σ, label, "
                                  "retrain, continue; resumes where it stopped)")
    p.add_argument("config")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=cmd_al)

    p = sub.add_parser("demo", help="the main job: PSB3 data, ensemble training, evaluation, report")
    p.add_argument("--out", default="out/demo")
    p.add_argument("--members", type=int, default=4)
    p.add_argument("--minutes", type=float, default=2.0, help="training budget per member")
    p.add_argument("--np", type=int, default=1, help="train members on this many MPI ranks")
    p.add_argument("--al-rounds", type=int, default=2,
                   help="rounds of on-the-fly active learning after the MD (0: none)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=cmd_demo)
    return parser


def _version() -> str:
    from ._version import __version__

    return f"bayesrace {__version__}"


def main(argv: Optional[List[str]] = None) -> int:
    from .train import ConfigError
    from .data import DataError

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export"]:
        from .export import main as export_main

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
