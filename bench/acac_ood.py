#!/usr/bin/env python
"""acac out-of-distribution detection by every OOD score, with the proton-transfer path split
by what the training set already covers.

The NEB path of the proton transfer runs from one enol form to the other; its end frames are
ordinary 300 K geometries. A frame is "beyond training" when the transferring proton is closer
to the midpoint between the two oxygens than in any training frame: |d(O1–H) − d(O2–H)|
smaller than the training set's smallest (H = the hydrogen nearest to an oxygen). AUROC of
each score against test_MD_300K (rank-based: a monotone calibration map does not change it).

    python bench/acac_ood.py POSTERIOR [--data ../shared/data/acac] [--out FILE.md]
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


def main(argv=None) -> int:
    import ase.io
    import torch

    from bayesrace.bayes import load_posterior
    from bayesrace.data import read_frames
    from bayesrace.uq import OOD_SCORES, ood_scores, predict_frames
    from bayesrace.uq._metrics import auroc

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("posterior", type=Path)
    parser.add_argument("--data", type=Path, default=ACAC_DIR)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    posterior = load_posterior(args.posterior, dtype=torch.float64).eval()

    nearest = min(abs(proton_asymmetry(a)) for a in ase.io.read(args.data / "train_300K.xyz", ":"))
    path = ase.io.read(args.data / "test_H_transfer.xyz", ":")
    beyond = np.array([abs(proton_asymmetry(a)) < nearest for a in path])
    scores = {}
    for name in ("test_MD_300K",) + OOD_SETS:
        frames = read_frames(args.data / f"{name}.xyz", require_forces=False)
        scores[name] = ood_scores(predict_frames(posterior, frames, dtype=torch.float64, progress=False))
    columns = list(OOD_SETS) + ["H transfer beyond training"]
    lines = ["# acac: OOD detection (AUROC against test_MD_300K)", "",
             f"Command: `{command_line('acac_ood.py', argv)}`; commit `{git_commit()}`; load `{uptime()}`.", "",
             f"Proton-transfer frames beyond training: {int(beyond.sum())} of {len(path)} (|d(O1–H) − d(O2–H)| < "
             f"{nearest:.3f} Å, the training set's smallest).", "",
             "| score | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for score, (label, _) in OOD_SCORES.items():
        values = [auroc(scores["test_MD_300K"][score], scores[name][score]) for name in OOD_SETS]
        values.append(auroc(scores["test_MD_300K"][score], scores["test_H_transfer"][score][beyond]))
        lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
