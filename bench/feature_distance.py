#!/usr/bin/env python
"""How far a structure's atoms are from the training atoms in one network's own features, as an OOD score.

A probe, not a deployed score: for a trained posterior's first member it takes the scalar (0e)
channels each layer's readout reads, per atom (the invariant features the energy is built
from), fits one Gaussian per species on the training atoms (standardised, covariance + 1e-3 I),
and scores a structure by the largest and the mean Mahalanobis distance of its atoms. AUROC
against the in-distribution test set, beside the posterior's own max force σ, for each OOD set.
It asks whether one network (cost of one model in MD) could flag what only an ensemble flags
by its σ; nothing in LAMMPS computes it.

    python bench/feature_distance.py --runs /work/runs/uq_small/s0/runs/psb3/mve \\
        --data /work/runs/uq_small/s0/runs/data_psb3 --out bench/results/feature_distance
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, git_commit, machine_info, write_json  # noqa: E402

REGULARISATION = 1e-3  # added to the standardised covariance's diagonal
SETS = ("test_ood_hot", "test_ood_torsion", "test_ood_torsion_thermal")


def atom_features(posterior, path: Path):
    """(features [N, F], atomic numbers [N], structure index [N], max force σ per structure [B])."""
    import torch

    from bayesrace import keys
    from bayesrace.data import TypeMap, frames_to_graphs, iterate_batches, read_frames

    member = posterior.members[0]
    captured: List[torch.Tensor] = []

    def keep_scalars(module, inputs, output):
        irreps = module.irreps_in
        scalars = [inputs[0][:, part] for part, (_, ir) in zip(irreps.slices(), irreps) if ir.l == 0]
        captured.append(torch.cat(scalars, dim=1).detach())

    hooks = [readout.linear_in.register_forward_hook(keep_scalars) for readout in member.readouts]
    frames = read_frames(path, require_energy=False, require_forces=False)  # labels are not used
    graphs = frames_to_graphs(frames, TypeMap(posterior.type_names), posterior.cutoff)
    features, numbers, structure, sigma, before = [], [], [], [], 0
    try:
        for batch in iterate_batches(graphs, 16, shuffle=False, dtype=torch.float64):
            captured.clear()
            out = posterior(batch)
            # the first len(readouts) captures are member 0's (the posterior runs members in turn)
            features.append(torch.cat(captured[: len(member.readouts)], dim=1).numpy())
            numbers.append(batch[keys.ATOMIC_NUMBERS].numpy())
            index = batch[keys.BATCH].numpy()
            structure.append(index + before)
            atom_sigma = out[keys.ATOMIC_FORCE_STD].detach().numpy()
            sigma.append(np.array([atom_sigma[index == b].max() for b in range(int(index.max()) + 1)]))
            before += int(batch[keys.NUM_ATOMS].shape[0])
    finally:
        for hook in hooks:
            hook.remove()
    return np.concatenate(features), np.concatenate(numbers), np.concatenate(structure), np.concatenate(sigma)


def fit_gaussians(features: np.ndarray, numbers: np.ndarray) -> Dict[int, tuple]:
    gaussians = {}
    for z in np.unique(numbers):
        x = features[numbers == z]
        mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-8
        covariance = np.cov(((x - mean) / scale).T) + REGULARISATION * np.eye(x.shape[1])
        gaussians[int(z)] = (mean, scale, np.linalg.inv(covariance))
    return gaussians


def structure_scores(gaussians, features, numbers, structure) -> Dict[str, np.ndarray]:
    distance = np.full(len(features), np.nan)
    for z, (mean, scale, precision) in gaussians.items():
        mask = numbers == z
        x = (features[mask] - mean) / scale
        distance[mask] = np.sqrt(np.einsum("ij,jk,ik->i", x, precision, x))
    if np.isnan(distance).any():
        raise SystemExit("a test atom's species is not in the training set")
    n = int(structure.max()) + 1
    return {"max_distance": np.array([distance[structure == b].max() for b in range(n)]),
            "mean_distance": np.array([distance[structure == b].mean() for b in range(n)])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", type=Path, required=True, help="folders with a posterior.pt")
    parser.add_argument("--data", nargs="+", type=Path, required=True,
                        help="PSB3 data folder per run (or one for all): train.xyz, test_id.xyz and the OOD sets")
    parser.add_argument("--reference", default="test_id", help="in-distribution set: <data>/<NAME>.xyz")
    parser.add_argument("--sets", nargs="+", default=list(SETS), help="OOD sets: <data>/<NAME>.xyz (missing ones skipped)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    import torch

    from bayesrace.bayes import load_posterior
    from bayesrace.uq import auroc

    torch.set_num_threads(1)
    data = args.data * len(args.runs) if len(args.data) == 1 else args.data
    if len(data) != len(args.runs):
        raise SystemExit(f"--data: give one folder or one per run ({len(args.runs)})")
    rows = []
    for run, folder in zip(args.runs, data):
        posterior = load_posterior(run / "posterior.pt")
        train = atom_features(posterior, folder / "train.xyz")
        gaussians = fit_gaussians(train[0], train[1])
        reference = atom_features(posterior, folder / f"{args.reference}.xyz")
        reference_scores = structure_scores(gaussians, *reference[:3])
        for name in args.sets:
            if not (folder / f"{name}.xyz").exists():
                continue
            other = atom_features(posterior, folder / f"{name}.xyz")
            scores = structure_scores(gaussians, *other[:3])
            row = {"run": str(run), "set": name, "max_force_sigma": auroc(reference[3], other[3])}
            row.update({key: auroc(reference_scores[key], scores[key]) for key in scores})
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    command = command_line("feature_distance.py", argv)
    lines = ["# Feature-space distance as an OOD score (bench/feature_distance.py)", "",
             f"Command: `{command}`  ", f"Commit: {git_commit()}  ", "",
             f"AUROC against {args.reference}. max/mean distance: Mahalanobis distance of an atom's readout scalars to "
             "its species' training Gaussian, largest / mean over the structure; max force σ: the posterior's own.",
             "", "| run | OOD set | max force σ | max distance | mean distance |", "|---|---|---:|---:|---:|"]
    lines += [f"| {row['run']} | {row['set']} | {row['max_force_sigma']:.3f} | {row['max_distance']:.3f} | "
              f"{row['mean_distance']:.3f} |" for row in rows]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    write_json(args.out / "results.json", {"command": command, "commit": git_commit(), "machine": machine_info(),
                                           "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
