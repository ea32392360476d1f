#!/usr/bin/env python
"""Recalibration of the total σ (isotonic) against calibration by parts (split), on the same
posterior and the same validation set, measured on in- and out-of-distribution test sets.

The question it answers: does a map fitted in distribution make the σ's of an
out-of-distribution set worse, and does mapping the epistemic and aleatoric parts
separately (the epistemic factor floored at 1) avoid it? Every set is predicted once,
uncalibrated; each calibration is fitted on the validation set's predictions and applied to
every set's predictions.

    python bench/calibration_parts.py --posterior RUN/posterior.pt --valid valid.xyz \\
        --sets test_id=test.xyz ood_hot=hot.xyz --out bench/results/calibration_parts

Writes results.json and results.md (with the command, commit and load) to --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from _common import command_line, git_commit, machine_info, uptime, write_json  # noqa: E402

METHODS = ("none", "isotonic", "split")
COLUMNS = (  # (header, metric, scale)
    ("NLL F", "forces_nll", 1.0), ("MA F", "forces_miscalibration_area", 1.0), ("cov95 F", "forces_coverage_95", 1.0),
    ("sharp F [meV/Å]", "forces_sharpness_eV_per_A", 1000.0), ("NLL E", "energy_nll", 1.0),
    ("MA E", "energy_miscalibration_area", 1.0), ("cov95 E", "energy_coverage_95", 1.0),
    ("ρ(|ΔE|, σ_E)", "energy_spearman", 1.0), ("median σ_E/N [meV/atom]", "energy_std_per_atom_median", 1000.0),
    ("σ_E/N > ID median", "energy_std_above_id_median", 1.0),
)
ID_SET = "test_id"  # the in-distribution set whose median σ_E/N the others are compared with


def coverage_95(error: np.ndarray, sigma: np.ndarray) -> float:
    return float(np.mean(np.abs(error) <= 1.959963984540054 * sigma))


def metrics_of(prediction) -> dict:
    from scipy.stats import spearmanr

    from bayesrace import keys
    from bayesrace.uq._calibration import uncertainty_metrics
    from bayesrace.uq._predict import energy_std, reference_key

    metrics = uncertainty_metrics(prediction)
    force_error = prediction[keys.FORCES] - prediction[reference_key(keys.FORCES)]
    metrics["forces_coverage_95"] = coverage_95(force_error, prediction[keys.ATOMIC_FORCE_STD][:, None])
    energy_error = prediction[keys.ENERGY] - prediction[reference_key(keys.ENERGY)]
    sigma = energy_std(prediction)
    metrics["energy_coverage_95"] = coverage_95(energy_error, sigma)
    metrics["energy_spearman"] = float(spearmanr(np.abs(energy_error), sigma)[0])
    metrics["energy_std_per_atom"] = sigma / prediction[keys.NUM_ATOMS]
    metrics["energy_std_per_atom_median"] = float(np.median(metrics["energy_std_per_atom"]))
    return metrics


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--posterior", required=True)
    parser.add_argument("--valid", required=True, help="labelled validation set the calibrations are fitted on")
    parser.add_argument("--sets", nargs="+", required=True, metavar="NAME=PATH")
    parser.add_argument("--energy-key", default="energy")
    parser.add_argument("--forces-key", default="forces")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "calibration_parts")
    parser.add_argument("--note", default="", help="where the posterior came from (written into results.md)")
    args = parser.parse_args(argv)

    import torch

    from bayesrace.bayes import calibrate_prediction, load_posterior
    from bayesrace.data import read_frames
    from bayesrace.uq import fit_calibration
    from bayesrace.uq._calibration import describe_calibration
    from bayesrace.uq._predict import predict_frames

    torch.set_num_threads(1)
    load_before = uptime()
    posterior = load_posterior(args.posterior, dtype=torch.float64)
    posterior.calibration = {}
    sets = {"valid": args.valid, **dict(item.split("=", 1) for item in args.sets)}
    predictions = {}
    for name, path in sets.items():
        frames = read_frames(path, energy_key=args.energy_key, forces_key=args.forces_key)
        predictions[name] = predict_frames(posterior, frames, dtype=torch.float64)
        print(f"predicted {name}: {len(frames)} structures", flush=True)
    calibrations = {"none": {}, **{m: fit_calibration(predictions["valid"], m) for m in METHODS[1:]}}
    for method in METHODS[1:]:
        print(f"{method}:\n  " + describe_calibration(calibrations[method]).replace("\n", "\n  "), flush=True)
    results = {"command": command_line("calibration_parts.py", argv), "commit": git_commit(),
               "machine": machine_info(), "load": {"before": load_before, "after": uptime()},
               "posterior": str(args.posterior), "sets": sets, "calibrations": calibrations, "metrics": {}}
    for name, prediction in predictions.items():
        results["metrics"][name] = {m: metrics_of(calibrate_prediction(prediction, calibrations[m])) for m in METHODS}
    # how well each calibrated score tells every other set from the in-distribution one
    from bayesrace.uq import auroc, ood_scores

    results["aurocs"] = {}
    if ID_SET in predictions:
        for method in METHODS:
            scored = {name: ood_scores(calibrate_prediction(prediction, calibrations[method]))
                      for name, prediction in predictions.items()}
            results["aurocs"][method] = {
                name: {score: auroc(scored[ID_SET][score], values) for score, values in scored[name].items()}
                for name in predictions if name not in (ID_SET, "valid")}
    # the fraction of each set's σ_E/N above the in-distribution set's median, per calibration
    for method in METHODS:
        reference = results["metrics"].get(ID_SET, {}).get(method, {}).get("energy_std_per_atom_median")
        for name in predictions:
            row = results["metrics"][name][method]
            per_atom = row.pop("energy_std_per_atom")
            if reference is not None:
                row["energy_std_above_id_median"] = float(np.mean(per_atom > reference))
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", results)
    lines = ["# Total-σ recalibration (isotonic) against calibration by parts (split)", "",
             f"Command: `{results['command']}`  ", f"Commit: {results['commit']}  ",
             f"Load: {results['load']['before']} → {results['load']['after']}  ",
             f"Posterior: `{args.posterior}`; both calibrations fitted on `valid` ({sets['valid']}).",
             *([args.note] if args.note else []), "",
             "NLL per force component / per structure (eV/Å, eV; constant included), MA the miscalibration area, "
             "cov95 the fraction of errors inside ±1.96σ, sharp the RMS force σ, ρ the Spearman rank correlation "
             f"of |ΔE| and σ_E, and the last column the fraction of structures whose σ_E/N exceeds {ID_SET}'s "
             "median under the same calibration.", ""]
    for name in predictions:
        lines += [f"## {name}", "", "| calibration | " + " | ".join(h for h, _, _ in COLUMNS) + " |",
                  "|---|" + "---|" * len(COLUMNS)]
        for method in METHODS:
            row = results["metrics"][name][method]
            cells = [f"{scale * row[key]:.3g}" if key in row else "–" for _, key, scale in COLUMNS]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    for method, per_set in results["aurocs"].items():
        if not per_set:
            continue
        scores = list(next(iter(per_set.values())))
        lines += [f"## OOD AUROC against {ID_SET}, calibration {method}", "",
                  "| set | " + " | ".join(scores) + " |", "|---|" + "---|" * len(scores)]
        lines += [f"| {name} | " + " | ".join(f"{row[score]:.3f}" for score in scores) + " |"
                  for name, row in per_set.items()]
        lines.append("")
    (args.out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
