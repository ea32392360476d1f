"""``bayesrace properties train|evaluate``: property and multi-state ensembles from the shell.

    bayesrace properties train --train train.xyz --valid valid.xyz --targets U0 gap mu \\
        --minutes 10 --members 2 --out qm9.pt
    bayesrace properties train --train train.xyz --valid valid.xyz --states 2 --out psb3.pt
    bayesrace properties evaluate qm9.pt test=test.xyz

A target is a QM9 name (its pooling and unit come from ``bayesrace.data.QM9_TARGETS``) or
``NAME:POOLING[:UNIT]`` with POOLING one of sum, mean, extent, dipole; its value is read from
``atoms.info[NAME]``. ``--states S`` adds S electronic states read from ``energy_s0``/
``forces_s0`` … as ``bayesrace data psb3-casscf`` writes them.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import List


class PropertyUsageError(ValueError):
    """A bad command line (the caller prints it as one line)."""


def parse_targets(specs: List[str], n_states: int):
    from ..data import QM9_TARGETS
    from ..properties import POOLINGS, Target, state_targets

    targets = []
    for spec in specs or []:
        name, _, rest = spec.partition(":")
        if not rest:
            if name not in QM9_TARGETS:
                raise PropertyUsageError(f"target {name!r} is not a QM9 name ({', '.join(QM9_TARGETS)}); "
                                         "give others as NAME:POOLING[:UNIT]")
            targets.append(Target(name, QM9_TARGETS[name].pooling, QM9_TARGETS[name].unit))
            continue
        pooling, _, unit = rest.partition(":")
        if pooling not in POOLINGS or pooling == "state":
            raise PropertyUsageError(f"target {spec!r}: pooling {pooling!r}; expected one of "
                                     f"{[p for p in POOLINGS if p != 'state']} (states: --states)")
        targets.append(Target(name, pooling, unit))
    targets += state_targets(n_states) if n_states > 0 else []
    if not targets:
        raise PropertyUsageError("nothing to predict: give --targets and/or --states")
    return targets


def _run_train(args) -> None:
    import torch

    from ..data import TypeMap
    from ..model import model_config_from
    from ..properties import read_property_set, type_map_of
    from ..properties import PropertyTraining, train_property_ensemble

    torch.set_num_threads(1)
    targets = parse_targets(args.targets, args.states)
    config = model_config_from(args.preset, cutoff=args.cutoff) if args.cutoff else model_config_from(args.preset)
    type_map = TypeMap(args.elements) if args.elements else type_map_of([args.train, args.valid])
    train = read_property_set(args.train, targets, type_map, config.cutoff)
    valid = read_property_set(args.valid, targets, type_map, config.cutoff)
    settings = PropertyTraining(loss=args.loss, minutes=args.minutes, batch_size=args.batch_size, lr=args.lr,
                                seed=args.seed, posterior=args.posterior)
    try:
        settings.validate()
    except ValueError as error:
        raise PropertyUsageError(str(error)) from None
    ensemble = train_property_ensemble(config, type_map.type_names, targets, train, valid, settings,
                                       n_members=args.members, progress=not args.quiet)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    ensemble.save(args.out)
    print(f"{args.out}: {args.members} member(s), targets {[t.name for t in targets]}, "
          f"elements {type_map.type_names}")


def _run_evaluate(args) -> None:
    from ..data import TypeMap
    from ..properties import PropertyEnsemble, evaluate
    from ..properties import read_property_set

    try:
        ensemble = PropertyEnsemble.load(args.ensemble)
    except ValueError as error:
        raise PropertyUsageError(str(error)) from None
    for item in args.sets:
        name, _, path = item.rpartition("=")
        name = name or Path(path).stem
        data = read_property_set(path, ensemble.targets, TypeMap(ensemble.type_names), ensemble.cutoff)
        print(f"{name} ({len(data)} structures): target, MAE, RMSE, Spearman(|error|, σ), miscalibration area, NLL")
        for target, m in evaluate(ensemble, data).items():
            print(f"  {target:12s} {m['mae']:.5g} {m['rmse']:.5g} {m['spearman']:.3f} "
                  f"{m['miscalibration_area']:.3f} {m['nll']:.3f}")


def add_properties_parser(sub) -> None:
    parser = sub.add_parser("properties", help="property (QM9) and multi-state ensembles: train, evaluate",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="properties_command", required=True)
    p = commands.add_parser("train", help="train an ensemble of property/multi-state models")
    p.add_argument("--train", required=True)
    p.add_argument("--valid", required=True)
    p.add_argument("--targets", nargs="+", default=[], help="QM9 names or NAME:POOLING[:UNIT]")
    p.add_argument("--states", type=int, default=0, help="electronic states (energy_s<k>, forces_s<k>)")
    p.add_argument("--out", required=True, help="the ensemble file to write")
    p.add_argument("--minutes", type=float, default=5.0, help="wall budget of each member")
    p.add_argument("--members", type=int, default=2)
    p.add_argument("--preset", default="small")
    p.add_argument("--cutoff", type=float, default=None, help="Å (default: the preset's)")
    p.add_argument("--elements", nargs="+", default=None, help="element symbols (default: those in the files)")
    p.add_argument("--loss", default="nll_jef", choices=["mse", "nll", "nll_jef"])
    p.add_argument("--posterior", default="ensemble", choices=["ensemble", "swag"],
                   help="swag: 8 weight sets drawn per member from SWAG moments of its last quarter")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=_run_train)
    p = commands.add_parser("evaluate", help="per-target errors and uncertainty metrics on labelled files")
    p.add_argument("ensemble")
    p.add_argument("sets", nargs="+", help="files, optionally as name=path")
    p.set_defaults(run=_run_evaluate)

