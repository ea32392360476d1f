#!/usr/bin/env python
"""Does any per-structure energy σ built from a posterior's heads rank the energy errors?

The model's energy variance of a structure is exp(mean_i s_i) over its atoms' log-variances
s_i (the geometric mean of the atoms' variances), averaged over members. This probe compares,
on the same predictions, that aggregation with the sum of the atoms' variances, the largest
atom's variance, and the members' spread (epistemic): Spearman ρ(|ΔE|/N, σ/N) per set, and
the AUROC with which each score tells an out-of-distribution set from the in-distribution one.
Issue 13's target is ρ ≥ 0.5 in distribution.

A single |ΔE| per structure is a noisy measure of its σ, so even a perfect σ does not reach
ρ = 1: beside each observed ρ the report gives the ρ that score would reach if the errors were
exactly Gaussian with its σ (``expected_spearman``: the mean over seeded draws ΔE_b = σ_b z_b).
That ceiling depends only on how much σ varies across the set. Where the errors are larger than
σ says, part of them is noise the score does not model; the second ceiling
(``spearman_with_floor``) adds that excess as a constant variance, c² = max(0, mean ΔE² − mean σ²),
the same for every structure: what σ could reach if the rest of the error were homoscedastic.

    python bench/energy_sigma.py --posterior RUN/posterior.pt --sets test_id=id.xyz hot=hot.xyz \\
        --id test_id --out bench/results/energy_sigma

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

SCORES = {  # name: what it is
    "geometric": "exp(mean_i s_i), the model's own energy variance (aleatoric)",
    "sum": "Σ_i exp(s_i): the atoms' variances added as if independent (aleatoric)",
    "max": "max_i exp(s_i): the least certain atom (aleatoric)",
    "epistemic": "the variance of the members' energies",
}


def per_structure_scores(posterior, path: str) -> dict:
    """|ΔE|/N and every score's σ/N for each structure of ``path``."""
    import torch

    from bayesrace import keys
    from bayesrace.data import TypeMap, frames_to_graphs, iterate_batches, read_frames

    graphs = frames_to_graphs(read_frames(path), TypeMap(posterior.type_names), posterior.cutoff)
    rows = {name: [] for name in ("error", *SCORES)}
    for member in posterior.members:
        member.eval()
    for batch in iterate_batches(graphs, 16, shuffle=False, dtype=torch.float64):
        predictions = [member(batch) for member in posterior.members]
        energies = torch.stack([p[keys.ENERGY].detach() for p in predictions])
        log_vars = torch.stack([p[keys.ATOMIC_ENERGY_LOG_VAR].detach() for p in predictions])
        structure, n_atoms = batch[keys.BATCH], batch[keys.NUM_ATOMS].double()
        shape = (len(predictions), len(n_atoms))
        per_structure = structure.expand(len(predictions), -1)
        mean_log_var = torch.zeros(shape, dtype=torch.float64).index_add(1, structure, log_vars) / n_atoms
        summed = torch.zeros(shape, dtype=torch.float64).index_add(1, structure, log_vars.exp())
        largest = torch.full(shape, -torch.inf, dtype=torch.float64).scatter_reduce(1, per_structure, log_vars, "amax")
        rows["error"].append((energies.mean(0) - batch[keys.ENERGY]).abs() / n_atoms)
        rows["geometric"].append(mean_log_var.exp().mean(0).sqrt() / n_atoms)
        rows["sum"].append(summed.mean(0).sqrt() / n_atoms)
        rows["max"].append(largest.exp().mean(0).sqrt() / n_atoms)
        rows["epistemic"].append(energies.std(0, unbiased=False) / n_atoms)
    return {name: torch.cat(values).numpy() for name, values in rows.items()}


def expected_spearman(sigma: np.ndarray, floor: float = 0.0, draws: int = 500, seed: int = 0) -> float:
    """The mean Spearman ρ(|s_b z_b|, σ_b), s_b² = σ_b² + floor², over ``draws`` draws of
    z ~ N(0, 1): what σ would reach on this set were it exactly right (``floor`` 0) or right up to
    a constant variance it does not model."""
    from scipy.stats import spearmanr

    rng = np.random.default_rng(seed)
    sigma = np.asarray(sigma, dtype=np.float64)
    spread = np.sqrt(sigma ** 2 + floor ** 2)
    return float(np.mean([spearmanr(np.abs(spread * rng.standard_normal(sigma.size)), sigma)[0]
                          for _ in range(draws)]))


def unexplained_floor(errors: np.ndarray, sigma: np.ndarray) -> float:
    """c with c² = max(0, mean ΔE² − mean σ²): the error variance σ leaves unexplained."""
    return float(np.sqrt(max(0.0, np.mean(np.square(errors)) - np.mean(np.square(sigma)))))


def main(argv=None) -> None:
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    from bayesrace import load_posterior

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--posterior", required=True)
    parser.add_argument("--sets", nargs="+", required=True, metavar="NAME=FILE")
    parser.add_argument("--id", default="test_id", help="the in-distribution set (AUROC reference)")
    parser.add_argument("--out", default=str(BENCH_DIR / "results" / "energy_sigma"))
    args = parser.parse_args(argv)
    sets = dict(item.split("=", 1) for item in args.sets)
    if args.id not in sets:
        parser.error(f"--id {args.id!r} is not one of --sets ({', '.join(sets)})")
    load_before = uptime()
    posterior = load_posterior(args.posterior)
    scores = {name: per_structure_scores(posterior, path) for name, path in sets.items()}
    spearman = {name: {score: float(spearmanr(rows["error"], rows[score])[0]) for score in SCORES}
                for name, rows in scores.items()}
    ceiling = {name: {score: expected_spearman(rows[score]) for score in SCORES} for name, rows in scores.items()}
    floors = {name: {score: unexplained_floor(rows["error"], rows[score]) for score in SCORES}
              for name, rows in scores.items()}
    with_floor = {name: {score: expected_spearman(rows[score], floors[name][score]) for score in SCORES}
                  for name, rows in scores.items()}
    reference = scores[args.id]
    auroc = {}
    for name, rows in scores.items():
        if name == args.id:
            continue
        labels = np.r_[np.zeros(len(reference["error"])), np.ones(len(rows["error"]))]
        auroc[name] = {score: float(roc_auc_score(labels, np.r_[reference[score], rows[score]])) for score in SCORES}
    mean_error = {name: float(1e3 * rows["error"].mean()) for name, rows in scores.items()}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = dict(command=command_line(Path(__file__).name, argv), commit=git_commit(), machine=machine_info(),
                   load=load_before, posterior=args.posterior, sets=sets, spearman=spearman,
                   spearman_if_exact=ceiling, spearman_with_floor=with_floor,
                   floor_meV_per_atom={n: {k: 1e3 * v for k, v in f.items()} for n, f in floors.items()}, auroc=auroc,
                   mean_abs_error_meV_per_atom=mean_error)
    write_json(out / "results.json", results)
    lines = [
        "# Which energy σ ranks the energy errors?", "", "```", results["command"], "```", "",
        f"Commit {results['commit']}; load {load_before}; posterior `{args.posterior}` "
        f"({len(posterior.members)} members).", "", "Scores (per structure, divided by its number of atoms N):", "",
        *[f"- `{name}`: {text}" for name, text in SCORES.items()], "",
        "## Spearman ρ(|ΔE|/N, σ/N): observed (if the errors were exactly N(0, σ²); "
        "with the unexplained variance as a constant floor)", "",
        "| set | mean |ΔE|/N [meV/atom] | " + " | ".join(SCORES) + " |",
        "|---|---:|" + "---:|" * len(SCORES),
        *[f"| {name} | {mean_error[name]:.2f} | "
          + " | ".join(f"{spearman[name][s]:.2f} ({ceiling[name][s]:.2f}; {with_floor[name][s]:.2f})"
                       for s in SCORES) + " |"
          for name in scores], "",
        f"## AUROC against `{args.id}`", "", "| set | " + " | ".join(SCORES) + " |", "|---|" + "---:|" * len(SCORES),
        *[f"| {name} | " + " | ".join(f"{auroc[name][s]:.2f}" for s in SCORES) + " |" for name in auroc], "",
    ]
    (out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
