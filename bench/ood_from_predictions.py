#!/usr/bin/env python
"""OOD AUROC of every score (bayesrace.uq.OOD_SCORES) from the predictions bench/uq.py saved,
mean ± std over seeds: a new score is measured on trained posteriors without predicting again.

Reads ``<runs>/<dataset>/<method>/predictions_<set>.npz`` (the posterior as trained, before
recalibration) for every ``--runs`` folder (one per seed) and prints a markdown table per data set.

    python bench/ood_from_predictions.py --runs /work/runs/uq_shallow/s{0,1,2}/runs --out FILE.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, git_commit, uptime  # noqa: E402

# in-distribution set, then the OOD sets, of each data set (bench/uq.py's names)
SETS = {"psb3": ("test_id", ("ood_hot", "ood_torsion")),
        "acac": ("test_MD_300K", ("test_MD_600K", "test_dihedral", "test_H_transfer"))}


def aurocs(method_dir: Path, dataset: str) -> dict:
    from bayesrace.uq import OOD_SCORES, ood_aurocs, ood_scores

    inside, outside = SETS[dataset]
    scores = {name: ood_scores(dict(np.load(method_dir / f"predictions_{name}.npz")))
              for name in (inside, *outside)}
    table = ood_aurocs(scores, inside, outside)
    return {(ood, score): table[ood][score] for ood in outside for score in OOD_SCORES}


def main(argv=None) -> int:
    from bayesrace.uq import OOD_SCORES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="bench/uq.py --runs folders, one per seed")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    lines = ["# OOD AUROC by every score, from saved predictions (posteriors as trained)", "",
             f"Command: `{command_line('ood_from_predictions.py', argv)}`; commit `{git_commit()}`; load `{uptime()}`.", ""]
    for dataset, (inside, outside) in SETS.items():
        methods = sorted({p.name for runs in args.runs for p in (runs / dataset).glob("*")
                          if (p / f"predictions_{inside}.npz").is_file()})
        if not methods:
            continue
        lines += [f"## {dataset} (against {inside}; mean ± std over seeds)", "",
                  "| method | seeds | OOD set | " + " | ".join(OOD_SCORES[s][0] for s in OOD_SCORES) + " |",
                  "|---|---:|---|" + "---:|" * len(OOD_SCORES)]
        for method in methods:
            found = [aurocs(runs / dataset / method, dataset) for runs in args.runs
                     if (runs / dataset / method / f"predictions_{inside}.npz").is_file()]
            for ood in outside:
                cells = []
                for score in OOD_SCORES:
                    values = np.array([seed[(ood, score)] for seed in found])
                    cells.append(f"{values.mean():.2f} ± {values.std():.2f}" if len(values) > 1 else f"{values[0]:.2f}")
                lines.append(f"| {method} | {len(found)} | {ood} | " + " | ".join(cells) + " |")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
