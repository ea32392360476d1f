#!/usr/bin/env python
"""What the threshold margin trades: the fraction of each set's structures a stored threshold
flags, for several ``--threshold-factor`` values, from the predictions bench/uq.py saved.

The stored threshold of a score is factor × its 0.99 quantile over the validation set
(``bayesrace.uq.extrapolation_rule``; ``bayesrace calibrate --threshold-factor``, default 1.5).
For every ``--runs`` folder (one per seed) and every method in it, this applies the rule to
``predictions_valid.npz`` and counts the structures of every other set above it (the posterior
as trained, before recalibration: the feature distance is not recalibrated anyway). Printed per
data set: mean and largest fraction over the runs (methods × seeds), per factor and set.

    python bench/flag_rates.py --runs /work/runs/uq_small/{s0,s1,s2,acac_s0,acac_s1,acac_s2}/runs \\
        --score max_feature_distance --out bench/results/uq_small/flag_rates.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, git_commit, uptime  # noqa: E402

FACTORS = (1.0, 1.1, 1.25, 1.5, 2.0)


def flag_fractions(method_dir: Path, score: str, factors) -> Dict[float, Dict[str, float]]:
    """{factor: {set: fraction above factor × q0.99 of the validation set}} for one trained method
    (``bayesrace.uq.flagged_fractions``, the rule ``bayesrace calibrate`` stores)."""
    from bayesrace.uq import flagged_fractions, ood_scores

    scores = {path.stem[len("predictions_"):]: ood_scores(dict(np.load(path)))
              for path in sorted(method_dir.glob("predictions_*.npz"))}
    if "valid" not in scores or score not in scores["valid"]:
        return {}
    result = {}
    for factor in factors:
        flagged = flagged_fractions(scores, "valid", 0.99, factor)
        if score not in flagged["thresholds"]:
            return {}
        result[factor] = {name: per[score] for name, per in flagged["fraction"].items() if name != "valid"}
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, nargs="+", required=True,
                        help="bench/uq.py --runs folders: <runs>/<dataset>/<method>/predictions_<set>.npz")
    parser.add_argument("--score", default="max_feature_distance", help="a bayesrace.uq.THRESHOLD_SCORES name")
    parser.add_argument("--factors", type=float, nargs="+", default=list(FACTORS))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from bayesrace.uq import OOD_SCORES

    from bayesrace.uq import THRESHOLD_SCORES

    if args.score not in THRESHOLD_SCORES:
        raise SystemExit(f"--score {args.score!r}: expected a score with a stored threshold, one of "
                         f"{', '.join(THRESHOLD_SCORES)}")
    collected: Dict[str, Dict[float, Dict[str, List[float]]]] = {}
    runs_per_dataset: Dict[str, int] = {}
    for runs in args.runs:
        for method_dir in sorted(p.parent for p in runs.glob("*/*/predictions_valid.npz")):
            dataset = method_dir.parent.name
            fractions = flag_fractions(method_dir, args.score, args.factors)
            if not fractions:
                continue
            runs_per_dataset[dataset] = runs_per_dataset.get(dataset, 0) + 1
            for factor, per_set in fractions.items():
                for name, value in per_set.items():
                    collected.setdefault(dataset, {}).setdefault(factor, {}).setdefault(name, []).append(value)
    if not collected:
        raise SystemExit(f"no predictions with {args.score!r} under {', '.join(map(str, args.runs))}")

    lines = ["# Flag rates against the threshold margin (bench/flag_rates.py)", "",
             f"Command: `{command_line('flag_rates.py', argv)}`  ",
             f"Commit: {git_commit()}; load: {uptime()}  ",
             f"Score: `{args.score}` ({OOD_SCORES[args.score][0]}); threshold = factor × its 0.99 quantile over "
             "the validation set; cells: % of the set's structures above it, mean over the runs (largest).", ""]
    for dataset, per_factor in collected.items():
        sets = list(next(iter(per_factor.values())))
        lines += [f"## {dataset} ({runs_per_dataset[dataset]} runs: methods × seeds)", "",
                  "| factor | " + " | ".join(sets) + " |", "|---:|" + "---|" * len(sets)]
        for factor, per_set in per_factor.items():
            lines.append(f"| {factor:g} | " + " | ".join(
                f"{100 * np.mean(per_set[s]):.1f} ({100 * np.max(per_set[s]):.1f})" for s in sets) + " |")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
