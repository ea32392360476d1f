#!/usr/bin/env python
"""acac out-of-distribution detection by every OOD score, with the proton-transfer path split
by what the training set already covers.

The NEB path of the proton transfer runs from one enol form to the other; its end frames are
ordinary 300 K geometries. A frame is "beyond training" when the transferring proton is closer
to the midpoint between the two oxygens than in any training frame: |d(O1–H) − d(O2–H)|
smaller than the training set's smallest (H = the hydrogen nearest to an oxygen). Likewise the
dihedral scan: 300 K MD already twists the scanned C–C bond by up to ~30° (the files' own
``dihedral_angle``), so the scan's first frames are ordinary geometries; a scan frame is "beyond
training" when its twist from planarity exceeds every training frame's. And 600 K MD overlaps
300 K MD: its reference potential energy alone separates the two sets at an AUROC printed as the
"heat oracle" (a score that knew the exact energy); a 600 K frame is "beyond training" when its
reference energy exceeds every training frame's. AUROC of each score against test_MD_300K
(rank-based: a monotone calibration map does not change it).

    python bench/acac_ood.py POSTERIOR [POSTERIOR ...] [--valid VALID ...] [--data ../shared/data/acac]
        [--out FILE.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ACAC_DIR, command_line, git_commit, uptime  # noqa: E402

OOD_SETS = ("test_MD_600K", "test_dihedral", "test_H_transfer")


def proton_asymmetry(atoms) -> float:
    """d(O1–H) − d(O2–H) of the hydrogen nearest to an oxygen."""
    symbols = atoms.get_chemical_symbols()
    oxygens = [i for i, s in enumerate(symbols) if s == "O"]
    if len(oxygens) != 2:
        raise ValueError(f"expected two oxygens (acetylacetone), found {len(oxygens)}")
    distances = atoms.get_all_distances()
    proton = min((i for i, s in enumerate(symbols) if s == "H"), key=lambda h: distances[h, oxygens].min())
    return float(distances[proton, oxygens[0]] - distances[proton, oxygens[1]])


def twist(atoms) -> float:
    """The scanned C–C bond's twist from planarity in degrees, from the data set's
    ``dihedral_angle`` (0–360°): 0 and 360 are both planar."""
    if "dihedral_angle" not in atoms.info:
        raise ValueError("acac frames need the data set's 'dihedral_angle' field (degrees)")
    angle = float(atoms.info["dihedral_angle"]) % 360.0
    return min(angle, 360.0 - angle)


def beyond_training(data: Path):
    """Which frames of each OOD set lie beyond what train_300K covers (module docstring), and
    the heat oracle's AUROC: {set name: bool mask}, oracle, a sentence saying how many."""
    import ase.io

    from bayesrace.data import read_frames
    from bayesrace.uq._metrics import auroc

    training = ase.io.read(data / "train_300K.xyz", ":")
    nearest = min(abs(proton_asymmetry(a)) for a in training)
    largest_twist = max(twist(a) for a in training)
    highest = max(frame.energy for frame in read_frames(data / "train_300K.xyz"))
    masks = {
        "test_H_transfer": np.array([abs(proton_asymmetry(a)) < nearest
                                     for a in ase.io.read(data / "test_H_transfer.xyz", ":")]),
        "test_dihedral": np.array([twist(a) > largest_twist for a in ase.io.read(data / "test_dihedral.xyz", ":")]),
    }
    cool = np.array([frame.energy for frame in read_frames(data / "test_MD_300K.xyz")])
    hot = np.array([frame.energy for frame in read_frames(data / "test_MD_600K.xyz")])
    masks["test_MD_600K"] = hot > highest
    oracle = auroc(cool, hot)
    text = (f"Beyond training: proton transfer {int(masks['test_H_transfer'].sum())} of {len(masks['test_H_transfer'])} "
            f"frames (|d(O1–H) − d(O2–H)| < {nearest:.3f} Å, the training set's smallest); dihedral scan "
            f"{int(masks['test_dihedral'].sum())} of {len(masks['test_dihedral'])} (twist from planarity > "
            f"{largest_twist:.1f}°, the training set's largest); 600 K MD {int(masks['test_MD_600K'].sum())} of "
            f"{len(hot)} (reference energy above the training set's highest). Heat oracle: the reference energy "
            f"alone separates test_MD_600K from test_MD_300K at AUROC {oracle:.3f}.")
    return masks, oracle, text


COLUMNS = {  # column -> (set, beyond training only)
    "600 K": ("test_MD_600K", False), "dihedral": ("test_dihedral", False), "H transfer": ("test_H_transfer", False),
    "600 K beyond": ("test_MD_600K", True), "dihedral beyond": ("test_dihedral", True),
    "H transfer beyond": ("test_H_transfer", True),
}


def _cell(values) -> str:
    values = np.asarray(values, dtype=float)
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"


def main(argv=None) -> int:
    import torch

    from bayesrace.bayes import load_posterior
    from bayesrace.data import read_frames
    from bayesrace.uq import OOD_SCORES, ood_scores, predict_frames
    from bayesrace.uq._ood import extrapolation_rule
    from bayesrace.uq._metrics import auroc

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("posteriors", type=Path, nargs="+", help="one per seed: the table shows mean ± std")
    parser.add_argument("--valid", type=Path, nargs="*", default=[],
                        help="each posterior's validation frames: the stored-threshold rule (1.5 × q0.99 over them) "
                             "then gives the fraction of each set flagged")
    parser.add_argument("--data", type=Path, default=ACAC_DIR)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.valid and len(args.valid) != len(args.posteriors):
        parser.error(f"--valid needs one file per posterior ({len(args.posteriors)}), got {len(args.valid)}")
    torch.set_num_threads(1)
    masks, _, beyond_text = beyond_training(args.data)
    frames = {name: read_frames(args.data / f"{name}.xyz", require_forces=False) for name in ("test_MD_300K",) + OOD_SETS}
    aurocs = {score: {column: [] for column in COLUMNS} for score in OOD_SCORES}
    flagged = {score: {column: [] for column in ("test_MD_300K",) + tuple(COLUMNS)} for score in OOD_SCORES}
    # each OOD set's median over the in-distribution median (issue: σ_E/N of every OOD set above it)
    median_ratio = {score: {name: [] for name in OOD_SETS} for score in OOD_SCORES}
    for index, path in enumerate(args.posteriors):
        posterior = load_posterior(path, dtype=torch.float64).eval()
        scores = {name: ood_scores(predict_frames(posterior, group, dtype=torch.float64, progress=False))
                  for name, group in frames.items()}
        thresholds = {}
        if args.valid:
            valid = ood_scores(predict_frames(posterior, read_frames(args.valid[index]), dtype=torch.float64))
            thresholds = {score: extrapolation_rule(valid[score]) for score in OOD_SCORES}
        for score in OOD_SCORES:
            for name in OOD_SETS:
                median_ratio[score][name].append(np.median(scores[name][score]) / np.median(scores["test_MD_300K"][score]))
            for column, (name, beyond) in COLUMNS.items():
                values = scores[name][score][masks[name]] if beyond else scores[name][score]
                aurocs[score][column].append(auroc(scores["test_MD_300K"][score], values))
                if thresholds:
                    flagged[score][column].append(float(np.mean(values > thresholds[score])))
            if thresholds:
                flagged[score]["test_MD_300K"].append(float(np.mean(scores["test_MD_300K"][score] > thresholds[score])))
    lines = [f"# acac: OOD detection (AUROC against test_MD_300K{', mean ± std over ' + str(len(args.posteriors)) + ' posteriors' if len(args.posteriors) > 1 else ''})",
             "", f"Command: `{command_line('acac_ood.py', argv)}`; commit `{git_commit()}`; load `{uptime()}`.", "",
             beyond_text, "", "| score | " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for score, (label, _) in OOD_SCORES.items():
        lines.append(f"| {label} | " + " | ".join(_cell(aurocs[score][column]) for column in COLUMNS) + " |")
    lines += ["", "Median of each OOD set's score over test_MD_300K's median (> 1: the set's typical structure "
              "scores above the typical in-distribution one):", "",
              "| score | " + " | ".join(OOD_SETS) + " |", "|---|" + "---:|" * len(OOD_SETS)]
    for score, (label, _) in OOD_SCORES.items():
        lines.append(f"| {label} | " + " | ".join(_cell(median_ratio[score][name]) for name in OOD_SETS) + " |")
    if args.valid:
        lines += ["", "Fraction flagged at the stored-threshold rule (1.5 × q0.99 of the score over each posterior's "
                  "validation frames, as `bayesrace calibrate` stores it):", "",
                  "| score | test_MD_300K | " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * (len(COLUMNS) + 1)]
        for score, (label, _) in OOD_SCORES.items():
            lines.append(f"| {label} | " + " | ".join(_cell(flagged[score][column]) for column in flagged[score]) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
