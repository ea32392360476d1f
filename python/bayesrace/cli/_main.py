"""The ``bayesrace`` command: data, train, evaluate, calibrate, predict, export, al, demo.

Errors a user can fix (bad data, bad config, missing files) are printed as one line
naming what is wrong, with exit status 2; nothing prints a Python traceback for them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

# bayes.METHODS, spelt out so that --help does not import torch (a test keeps the two equal)
CALIBRATION_METHODS = ("isotonic", "scalar", "split")


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


def cmd_train(args) -> None:
    from ..train import load_config, train

    config = load_config(args.config)
    if args.out:
        config.out = args.out
    from .._mpi import mpi_world

    path = train(config, progress=not args.quiet)
    if mpi_world()[1] == 0:
        print(f"posterior written to {path}")


def cmd_evaluate(args) -> None:
    from ..bayes import load_posterior
    from ..uq import evaluate_sets, format_summary

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
    from .. import keys
    from ..bayes import CalibrationError
    from ..uq import calibrate_posterior_file, describe_calibration

    if args.control_md:
        _check_control_arguments(args)
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
            feature_density_from=args.feature_density_from,
        )
    except CalibrationError as error:
        raise UsageError(str(error)) from error
    print(f"{args.method} calibration fitted on {args.valid_file} "
          f"({result['n_structures']} structures, {result['n_atoms']} atoms)")
    print(describe_calibration(result["calibration"]))
    print(f"extrapolation threshold {keys.ATOMIC_FORCE_STD} = {result['threshold']:.4g} eV/Å "
          f"({args.threshold_factor:g} × the {args.threshold_quantile:g} quantile of each structure's largest σ_F)")
    units = {keys.ATOMIC_FORCE_STD_EPISTEMIC: "eV/Å (compute bayesrace column 6)",
             keys.ENERGY_STD_EPISTEMIC_PER_ATOM: "eV/atom (compute bayesrace column 7)",
             keys.ATOMIC_FORCE_STD_RELATIVE: "(unit-free, compute bayesrace column 8)",
             keys.ATOMIC_FEATURE_DISTANCE: "(unit-free, compute bayesrace column 9)"}
    for name, unit in units.items():
        if name in result["thresholds"]:
            print(f"extrapolation threshold {name} = {result['thresholds'][name]:.4g} {unit}, by the same rule")
    before, after = result["metrics_before"], result["metrics_after"]
    rows = [(f"{part} {label}", f"{part}_{metric}") for part in ("forces", "energy")
            for label, metric in (("NLL", "nll"), ("miscalibration area", "miscalibration_area"), ("ENCE", "ence"))]
    width = max(len(label) for label, _ in rows)
    print(f"{'validation set':<{width}}  {'uncalibrated':>12}  {'calibrated':>12}")
    for label, metric in rows:
        if metric in before or metric in after:
            print(f"{label:<{width}}  {before.get(metric, float('nan')):>12.4g}  {after.get(metric, float('nan')):>12.4g}")
    if args.control_md:
        _control_thresholds(args, result["out_path"])
    print(f"calibrated posterior written to {result['out_path']}")


def _check_control_arguments(args) -> None:
    """--control-md's companions, checked before the calibration's costly prediction."""
    if args.control_temperature is None or args.control_temperature <= 0:
        raise UsageError("--control-md needs --control-temperature (K, > 0): the temperature of the training data")
    if args.control_steps < 1 or args.control_margin < 1:
        raise UsageError(f"--control-steps must be >= 1 and --control-margin >= 1, got {args.control_steps} and "
                         f"{args.control_margin}")
    if not Path(args.control_md).is_file():
        raise UsageError(f"--control-md {args.control_md}: no such file")
    from ..active._config import MIN_CONTROL_FRAMES

    fewest = 10 * MIN_CONTROL_FRAMES  # steps: the control run is checked every 10
    if args.control_run_steps is not None and (args.control_run_steps < 10 or args.control_steps < fewest):
        raise UsageError(f"--control-run-steps must be >= 10 (one check) and needs --control-steps >= {fewest} "
                         f"({MIN_CONTROL_FRAMES} checked frames for the tail fit), got {args.control_run_steps} "
                         f"and {args.control_steps}")
    if not 0 < args.control_false_halts < 1:
        raise UsageError(f"--control-false-halts must lie in (0, 1), got {args.control_false_halts}")


def _control_thresholds(args, posterior_path) -> None:
    """--control-md: replace the force σ thresholds by margin × the largest σ of a control run."""
    from ..active import THRESHOLD_KEYS, control_thresholds
    from ..bayes import read_posterior_record, update_posterior_file
    from ..lammps import HALT_MAXIMA

    workdir = Path(posterior_path).with_name(Path(posterior_path).stem + "_control")
    result = control_thresholds(posterior_path, args.control_md, args.control_temperature, args.control_steps,
                                args.control_margin, workdir=workdir, run_steps=args.control_run_steps,
                                false_halts=args.control_false_halts)
    stored = dict(read_posterior_record(posterior_path).get("thresholds") or {})
    update_posterior_file(posterior_path, thresholds={**stored, **result["thresholds"]})
    print(f"control run: {args.control_steps} steps of Langevin MD at {args.control_temperature:g} K from "
          f"{args.control_md} ({result['n_frames']} checked frames; {workdir})")
    for part, name in THRESHOLD_KEYS.items():
        if name in result["thresholds"]:
            q50, q99 = result["quantiles"][part]
            level = (f"the largest {result['maxima'][part]:.4g}" if args.control_run_steps is None else
                     f"{result['levels'][part]:.4g}, exceeded {args.control_false_halts:g} times in expectation by an "
                     f"in-distribution run of {args.control_run_steps} steps (largest seen {result['maxima'][part]:.4g})")
            print(f"control threshold {name} = {result['thresholds'][name]:.4g} ({HALT_MAXIMA[part]}) = "
                  f"{args.control_margin:g} × {level} (frames' median {q50:.4g}, q0.99 {q99:.4g}); replaces the rule "
                  f"above")


def _load_posterior_or_usage_error(path):
    from ..bayes import load_posterior

    try:
        return load_posterior(path)
    except ValueError as error:  # e.g. a truncated file: the message names it, no traceback
        raise UsageError(str(error)) from error


def cmd_predict(args) -> None:
    import ase.io

    from ..calculator import UNCERTAINTY_RESULTS, BayesRaceCalculator
    from ..data import read_frames

    calculator = BayesRaceCalculator(_load_posterior_or_usage_error(args.posterior))
    frames = read_frames(args.input, require_energy=False, require_forces=False)
    out = []
    for frame in frames:
        atoms = ase.Atoms(numbers=frame.numbers, positions=frame.positions, cell=frame.cell, pbc=frame.pbc)
        atoms.calc = calculator
        try:
            energy = atoms.get_potential_energy()
        except ValueError as error:  # e.g. an element the model does not know
            raise UsageError(str(error)) from None
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
        for name in ("forces_std_relative", "contact_ratio", "feature_distance"):  # where the posterior has them
            if name in calculator.results:
                result.arrays[name] = calculator.results[name]
        out.append(result)
    ase.io.write(args.out, out, format="extxyz")
    print(f"{len(out)} structures with predictions and uncertainties written to {args.out}")


def cmd_laplace(args) -> None:
    """Post-hoc last-layer Laplace posterior of one member of a trained posterior."""
    from ..bayes import laplace_posterior_file

    if args.samples < 2 or args.samples % 2:
        raise UsageError(f"--samples must be a positive even number (antithetic pairs), got {args.samples}")
    if args.prior_precision is not None and not args.prior_precision > 0:
        raise UsageError(f"--prior-precision must be positive, got {args.prior_precision}")
    if args.max_structures is not None and args.max_structures < 1:
        raise UsageError(f"--max-structures must be at least 1, got {args.max_structures}")
    try:
        result = laplace_posterior_file(
            args.posterior, args.train_file, args.out, member=args.member, n_samples=args.samples,
            prior_precision=args.prior_precision, max_structures=args.max_structures, seed=args.seed,
            progress=not args.quiet,
        )
    except IndexError as error:  # a member the posterior does not have
        raise UsageError(f"--member {args.member}: {error}") from error
    except ValueError as error:  # an unreadable posterior, no structures to fit on, a failed fit
        raise UsageError(str(error)) from error
    laplace = result.laplace
    print(f"prior precision alpha = {laplace.prior_precision:.6g}")
    print(f"log marginal likelihood = {laplace.log_marginal_likelihood:.6g} nats "
          f"({laplace.n_parameters} last-layer weights, {laplace.n_structures} structures)")
    print(f"mean epistemic force sigma on the training set = {result.mean_epistemic_force_std:.6g} eV/Å")
    print(f"laplace posterior with {result.n_members} samples written to {args.out}")


def cmd_al(args) -> None:
    from ..active import load_active_config, run_pool_al

    config = load_active_config(args.config)
    if config.mode == "on_the_fly":
        from ..active import OTF_LOG, run_on_the_fly

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
    from ..demo import run_demo

    if args.al_rounds < 0:
        raise SystemExit(f"bayesrace demo: --al-rounds must be >= 0, got {args.al_rounds}")
    run_demo(Path(args.out), members=args.members, minutes=args.minutes, ranks=args.np, quiet=args.quiet,
             al_rounds=args.al_rounds)


def build_parser() -> argparse.ArgumentParser:
    from ._data import add_data_parser
    from ._properties import add_properties_parser

    parser = argparse.ArgumentParser(prog="bayesrace", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)

    add_data_parser(sub)
    add_properties_parser(sub)

    p = sub.add_parser("train", help="train a RACE posterior (ensemble, mve, swag, ivon, laplace, shallow) from a YAML config (mpirun -np K runs ensemble members in parallel)")
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
    p.add_argument("--calibration-method", choices=CALIBRATION_METHODS, default="isotonic",
                   help="with --calibrate-on: monotone map of σ, one NLL-optimal factor, or one map per part "
                        "(split: epistemic and aleatoric; default: isotonic)")
    p.add_argument("--energy-key", default="energy")
    p.add_argument("--forces-key", default="forces")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=cmd_evaluate)

    p = sub.add_parser("calibrate", help="fit the σ calibration and extrapolation threshold on a validation set")
    p.add_argument("posterior", help="posterior.pt written by 'bayesrace train'")
    p.add_argument("valid_file", help="labelled validation structures (not used in training)")
    p.add_argument("--method", choices=CALIBRATION_METHODS, default="isotonic",
                   help="isotonic: monotone map of the total σ; scalar: one NLL-optimal factor; split: one "
                        "map for the epistemic and one for the aleatoric σ, the epistemic never narrowed "
                        "(default: isotonic)")
    p.add_argument("--out", help="where to write the calibrated posterior (default: overwrite POSTERIOR)")
    p.add_argument("--threshold-quantile", type=float, default=0.99,
                   help="quantile over structures of the largest calibrated force σ (default 0.99)")
    p.add_argument("--threshold-factor", type=float, default=1.5, help="margin on that quantile (default 1.5)")
    p.add_argument("--control-md", metavar="STRUCTURE",
                   help="instead of that rule, set the force σ thresholds from a control run: unhalted Langevin MD "
                        "of the calibrated model from this structure; threshold = margin × the largest σ seen "
                        "(a bound per run of that length, not per structure)")
    p.add_argument("--control-temperature", type=float, help="K: the training data's temperature")
    p.add_argument("--control-steps", type=int, default=4000, help="steps of 0.5 fs, dumped every 10 (default 4000)")
    p.add_argument("--control-margin", type=float, default=1.25, help="default 1.25")
    p.add_argument("--control-run-steps", type=int,
                   help="threshold for production runs of this many steps (checked every 10): margin × the σ such a "
                        "run at the control's conditions exceeds --control-false-halts times in expectation, "
                        "extrapolated from the control run's upper tail (default: margin × its largest σ)")
    p.add_argument("--control-false-halts", type=float, default=0.1, help="with --control-run-steps (default 0.1)")
    p.add_argument("--feature-density-from", metavar="TRAIN_FILE",
                   help="fit the feature density (compute bayesrace/atom column 7) on these training structures "
                        "first: for a posterior trained before bayesrace fitted one")
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

    # listed for --help; main() hands its arguments to the export parser (_export_command)
    sub.add_parser("export", help="freeze a posterior into one deployable for LAMMPS, TorchScript or AOTInductor "
                   ".pt2 (bayesrace-export)")

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
    p.add_argument("--al-rounds", type=int, default=3,
                   help="rounds of on-the-fly active learning after the MD (0: none)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=cmd_demo)
    return parser


def _version() -> str:
    from .._version import __version__

    return f"bayesrace {__version__}"


def main(argv: Optional[List[str]] = None) -> int:
    from ..train import ConfigError
    from ..data import DataError
    from ._properties import PropertyUsageError

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export"]:
        return _export_command(argv[1:], prog="bayesrace export")
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (UsageError, ConfigError, DataError, PropertyUsageError, FileNotFoundError, RuntimeError) as error:
        print(f"bayesrace {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


# -- export: its own parser and error handling, shared by 'bayesrace export' and 'bayesrace-export'


def export_main(argv: Optional[List[str]] = None) -> int:
    """The ``bayesrace-export`` command: an alias of ``bayesrace export``."""
    return _export_command(sys.argv[1:] if argv is None else argv, prog="bayesrace-export")


def _export_command(argv: List[str], prog: str) -> int:
    """Export as ``argv`` says; returns the exit status (2 for errors a user can fix)."""
    from ..export import ExportError

    args = _export_parser(prog).parse_args(argv)
    try:
        _run_export(args)
    except (ExportError, ValueError, FileNotFoundError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    return 0


def _export_parser(prog: str) -> argparse.ArgumentParser:
    from .. import keys
    from ..export import DEFAULT_THRESHOLD_FACTOR, DTYPES

    parser = argparse.ArgumentParser(prog=prog, description="Freeze a bayesrace posterior into a LAMMPS deployable.")
    parser.add_argument("posterior", help="posterior.pt written by 'bayesrace train'")
    parser.add_argument("out", help="deployable to write for pair_style bayesrace (.pt; .pt2 with --format aoti)")
    parser.add_argument("--format", choices=[keys.FORMAT_TORCHSCRIPT, keys.FORMAT_AOTI], default=keys.FORMAT_TORCHSCRIPT,
                        help="torchscript (default: shell and layer mode, any CPU or GPU) or aoti: an AOTInductor "
                        "package compiled here (about a minute per model; shell mode only; runs only with this "
                        "torch version on CPUs with this machine's instruction set)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float64",
                        help="precision of the deployable (default float64)")
    parser.add_argument("--force-std-scale", type=float, default=None,
                        help="calibration: the scale s_F of every force σ, c = s_F·g_F(σ) (default: the "
                        "record's, else 1); the map g_F, if any, comes from the record ('bayesrace calibrate')")
    parser.add_argument("--energy-std-scale", type=float, default=None,
                        help="calibration: the scale s_E of every energy σ (default: the record's, else 1); "
                        "the map g_E, if any, comes from the record")
    parser.add_argument("--force-threshold", type=float, default=None, metavar="EV_PER_A",
                        help="default extrapolation threshold on the calibrated per-atom force σ "
                        "(compute bayesrace counts atoms over it)")
    parser.add_argument("--threshold-from", default=None, metavar="FILE",
                        help="set the threshold from in-distribution structures (extxyz or any ASE "
                        "format): a quantile of their largest atomic force σ")
    parser.add_argument("--threshold-quantile", type=float, default=0.99,
                        help="quantile used with --threshold-from (default 0.99)")
    parser.add_argument("--threshold-factor", type=float, default=DEFAULT_THRESHOLD_FACTOR,
                        help=f"margin multiplying that quantile (default {DEFAULT_THRESHOLD_FACTOR})")
    return parser


def _run_export(args) -> dict:
    """Export as ``args`` says and print a one-line summary (errors raise ExportError etc.)."""
    import torch

    from .. import keys
    from ..bayes import load_posterior
    from ..export import (check_aoti_toolchain, export_posterior, export_posterior_aoti, resolve_calibration,
                         threshold_from_structures)

    if args.format == keys.FORMAT_AOTI:
        check_aoti_toolchain()  # before loading anything

    calibration = {}
    if args.force_std_scale is not None:
        calibration[keys.META_FORCE_STD_SCALE] = args.force_std_scale
    if args.energy_std_scale is not None:
        calibration[keys.META_ENERGY_STD_SCALE] = args.energy_std_scale
    thresholds = {}
    if args.force_threshold is not None:
        thresholds[keys.ATOMIC_FORCE_STD] = args.force_threshold
    posterior = load_posterior(args.posterior, dtype=torch.float64)
    if args.force_threshold is None and args.threshold_from:
        import ase.io

        path = Path(args.threshold_from)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such structure file (--threshold-from)")
        # the threshold applies to calibrated σ: measure them with the calibration this export writes
        thresholds[keys.ATOMIC_FORCE_STD] = threshold_from_structures(
            posterior, ase.io.read(path, ":"), args.threshold_quantile, args.threshold_factor,
            calibration=resolve_calibration(posterior, calibration),
        )
    if args.format == keys.FORMAT_AOTI:
        meta = export_posterior_aoti(posterior, args.out, calibration=calibration, thresholds=thresholds,
                                     dtype=args.dtype, log=lambda line: print(f"{args.out}: {line}", flush=True))
    else:
        meta = export_posterior(posterior, args.out, calibration=calibration, thresholds=thresholds,
                                dtype=args.dtype)
    print(
        f"{args.out}: {meta[keys.META_N_MEMBERS]} members ({meta[keys.META_POSTERIOR]}), "
        f"elements {' '.join(meta[keys.META_TYPE_NAMES])}, cutoff {meta[keys.META_CUTOFF]} Å x "
        f"{meta[keys.META_N_LAYERS]} layers, {meta[keys.META_DTYPE]}, {args.format}, force σ threshold "
        f"{meta[keys.META_THRESHOLDS][keys.ATOMIC_FORCE_STD]:.4g} eV/Å"
    )
    return meta

