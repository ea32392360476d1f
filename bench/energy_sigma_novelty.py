#!/usr/bin/env python
"""Would a feature-distance term make the energy σ grow where the members agree but are wrong?

On acac's relaxed proton-transfer path the NLL_JEF ensemble is confidently wrong: its σ_E/N sits
below the in-distribution median while the per-atom feature distance separates the set
perfectly. This probe adds a novelty variance to the posterior's energy variance,

    σ_E² = σ_E,epi² + σ_E,ale² + a² Σ_i max(0, d_i − d_0)^p,

with d_0 a quantile of the fitting set's atom distances, and picks a by the Gaussian NLL of the
energies of a labelled fitting set (as a calibration would). It reports the fitted a, the NLL
gain, Spearman ρ(|ΔE|/N, σ/N) on the in-distribution set and the AUROC of σ_E/N for each other
set, with and without the term. It reads the ``predictions_<set>.npz`` files bench/uq.py writes
next to each posterior, so it needs no network evaluation.

    python bench/energy_sigma_novelty.py --run RUNS/acac/de_nll_jef --fit valid --id test_MD_300K \\
        --sets test_MD_600K test_H_transfer ... --out bench/results/energy_sigma/novelty_acac_s1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from _common import command_line, git_commit, machine_info, uptime, write_json  # noqa: E402

VARIANTS = [(0.0, 2), (0.5, 2), (0.9, 2), (0.99, 2), (0.99, 1)]  # (quantile of d_0, power p)


def load_set(run: Path, name: str) -> dict:
    path = run / f"predictions_{name}.npz"
    if not path.is_file():
        raise SystemExit(f"{path}: no predictions for set {name!r} (bench/uq.py writes them next to posterior.pt)")
    z = np.load(path)
    if "atomic_feature_distance" not in z.files:
        raise SystemExit(f"{path}: no atomic_feature_distance (the posterior has no feature density)")
    return dict(n=z["num_atoms"].astype(np.float64), structure=z["batch"], distance=z["atomic_feature_distance"],
                variance=z["energy_var_epistemic"] + z["energy_var_aleatoric"],
                # the thermal sets are unlabelled: they need no error, only σ
                error=np.abs(z["energy"] - z["reference_energy"]) if "reference_energy" in z.files else None)


def novelty(rows: dict, d0: float, power: int) -> np.ndarray:
    excess = np.maximum(0.0, rows["distance"] - d0) ** power
    return np.bincount(rows["structure"], weights=excess, minlength=len(rows["n"]))


def main(argv=None) -> None:
    from scipy.optimize import minimize_scalar

    from bayesrace.uq import auroc, gaussian_nll, spearman

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a bench/uq.py run folder with predictions_<set>.npz")
    parser.add_argument("--fit", default="valid", help="the labelled set a is fitted on")
    parser.add_argument("--id", default="test_MD_300K", help="the in-distribution set (ρ and AUROC reference)")
    parser.add_argument("--sets", nargs="+", required=True, help="the other sets (AUROC against --id)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    run = Path(args.run)
    load_before = uptime()
    data = {name: load_set(run, name) for name in dict.fromkeys([args.fit, args.id, *args.sets])}
    fit, reference = data[args.fit], data[args.id]
    for name in (args.fit, args.id):
        if data[name]["error"] is None:
            raise SystemExit(f"{run / f'predictions_{name}.npz'}: set {name!r} has no reference energies to fit "
                             "or rank against")

    def sigma_per_atom(rows: dict, a2: float, d0: float, power: int) -> np.ndarray:
        return np.sqrt(rows["variance"] + a2 * novelty(rows, d0, power)) / rows["n"]

    variants = []
    for quantile, power in VARIANTS:
        d0 = float(np.quantile(fit["distance"], quantile)) if quantile > 0 else 0.0
        extra = novelty(fit, d0, power)
        best = minimize_scalar(lambda log_a: gaussian_nll(fit["error"], np.sqrt(fit["variance"]
                                                                                 + np.exp(2 * log_a) * extra)),
                               bounds=(-20.0, 5.0), method="bounded")
        a2 = float(np.exp(2 * best.x))
        row = dict(d0_quantile=quantile, d0=d0, power=power, a=float(np.sqrt(a2)),
                   nll_fit=gaussian_nll(fit["error"], np.sqrt(fit["variance"] + a2 * extra)),
                   nll_fit_without=gaussian_nll(fit["error"], np.sqrt(fit["variance"])), auroc={}, auroc_without={})
        for tag, scale in (("", a2), ("_without", 0.0)):
            own = sigma_per_atom(reference, scale, d0, power)
            row["spearman_id" + tag] = spearman(reference["error"] / reference["n"], own)
            for name in args.sets:
                row["auroc" + tag][name] = auroc(own, sigma_per_atom(data[name], scale, d0, power))
        variants.append(row)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = dict(command=command_line(Path(__file__).name, argv), commit=git_commit(), machine=machine_info(),
                   load=load_before, run=str(run), fit=args.fit, id=args.id, variants=variants)
    write_json(out / "results.json", results)
    lines = ["# Energy σ with a feature-distance term", "", "```", results["command"], "```", "",
             f"Commit {results['commit']}; load {load_before}; a fitted by the energy NLL of `{args.fit}`; "
             f"ρ and AUROC against `{args.id}`. Cells: with the term (without).", "",
             "| d_0 (quantile) | p | a | NLL fit | ρ id | " + " | ".join(args.sets) + " |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(args.sets)]
    for row in variants:
        lines.append(f"| {row['d0']:.3g} (q{row['d0_quantile']}) | {row['power']} | {row['a']:.3g} | "
                     f"{row['nll_fit']:.3f} ({row['nll_fit_without']:.3f}) | "
                     f"{row['spearman_id']:.3f} ({row['spearman_id_without']:.3f}) | "
                     + " | ".join(f"{row['auroc'][n]:.3f} ({row['auroc_without'][n]:.3f})" for n in args.sets) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
