"""``bayesrace data NAME``: the built-in data sets, one subcommand each.

psb3         the PSB3 cation with GFN2-xTB energies and forces (the main job's data)
qm9          molecules and the 12 QM9 properties from the ``qm9pack`` table, in eV/Å units
psb3-casscf  PSB3 geometries with SA-2-CASSCF(6,6) energies and forces of S0 and S1 (PySCF)
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _print_manifest(out, manifest: dict) -> None:
    for name, entry in manifest["files"].items():
        print(f"{Path(out) / name}: {entry['frames']} frames")


def _run_psb3(args) -> None:
    from ..data import generate_psb3

    _print_manifest(args.out, generate_psb3(args.out, seed=args.seed, scale=args.scale, progress=not args.quiet))


def _run_qm9(args) -> None:
    from ..data import write_qm9

    manifest = write_qm9(args.out, n=args.n, targets=args.targets, seed=args.seed, source=args.source,
                         progress=not args.quiet)
    _print_manifest(args.out, manifest)


def _run_psb3_casscf(args) -> None:
    from ..data import generate_psb3_casscf

    manifest = generate_psb3_casscf(args.out, n_frames=args.n, basis=args.basis, workers=args.workers,
                                    seed=args.seed, progress=not args.quiet)
    _print_manifest(args.out, manifest)


def add_data_parser(sub) -> None:
    data = sub.add_parser("data", help="generate a built-in data set: psb3 (GFN2-xTB), qm9 (from qm9pack), "
                          "psb3-casscf (two states, SA-2-CASSCF with PySCF)",
                          description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    datasets = data.add_subparsers(dest="dataset", required=True, metavar="{psb3,qm9,psb3-casscf}")

    p = datasets.add_parser("psb3", help="the PSB3 cation with GFN2-xTB labels (the main job's data)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="multiplies the number of frames")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=_run_psb3)

    p = datasets.add_parser("qm9", help="QM9 molecules and properties (qm9pack), split into train/valid/test")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n", type=int, default=None, help="molecules to draw (default: all 130 831)")
    p.add_argument("--targets", nargs="+", default=None, help="properties to keep (default: all 12)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random draw and split")
    p.add_argument("--source", default=None, help="a CSV in qm9pack's format instead of the qm9pack package")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=_run_qm9)

    p = datasets.add_parser("psb3-casscf", help="PSB3 geometries labelled with SA-2-CASSCF(6,6): S0 and S1 "
                            "energies and forces (PySCF); resumes where a killed run stopped")
    p.add_argument("--out", required=True, help="output directory (labels so far are kept there)")
    p.add_argument("--n", type=int, default=200, help="geometries to label")
    p.add_argument("--basis", default="sto-3g", help="Gaussian basis set (PySCF name); sto-3g by default: "
                   "one frame takes ~14 s on one core, vs ~37 s with 3-21g and ~55 s with 6-31g")
    p.add_argument("--workers", type=int, default=1, help="labelling processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=_run_psb3_casscf)
