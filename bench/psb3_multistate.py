"""Multi-state PSB3 (S0 and S1 from SA-2-CASSCF) with a two-state Bayesian RACE (issue 15).

Trains two-state models (shared layers, per-state energy and force readouts with mean–variance
heads) on the same split and budget per member: deep ensembles with the conventional NLL
(energies by NLL, forces by MSE) and with NLL_JEF (energies and forces by their joint NLL, per
state), each ensemble's first member alone (a mean–variance model), and a SWAG posterior
(NLL_JEF) — and reports for each: test errors of both states' energies and forces and of the gap
S1−S0, their uncertainty metrics (Spearman ρ(|error|, σ), miscalibration area, NLL), and how
well σ flags the twisted geometries (``test_torsion.xyz``) against the in-distribution test set
(AUROC of the per-structure max force σ of S1, of the gap σ and of the energy σ of each state).

    python bench/psb3_multistate.py --data bench/runs/psb3_casscf --minutes 4 --members 3 \\
        --out bench/results/psb3_multistate

``--data`` is what ``bayesrace data psb3-casscf --out DIR`` writes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RUNS_DIR, command_line, git_commit, machine_info, write_json  # noqa: E402

RUNS = ("nll:ensemble", "nll_jef:ensemble", "nll_jef:swag")
NEAR_CROSSING_EV = 2.0  # a twisted frame with an S1−S0 gap below this counts as near the crossing


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path, help="a 'bayesrace data psb3-casscf' output folder")
    parser.add_argument("--minutes", type=float, default=4.0, help="wall budget of each member")
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS,
                        help="LOSS:POSTERIOR; an ensemble run also reports its first member alone (MVE)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/psb3_multistate"))
    parser.add_argument("--keep", type=Path, default=RUNS_DIR / "psb3_multistate")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def ood_scores(ensemble, data):
    """Per structure: max over atoms of S1's force σ, the gap σ, and each state's energy σ."""
    pred = ensemble.predict(data)
    force_var = pred["forces_var_epistemic"] + pred["forces_var_aleatoric"]  # [N, S, 3]
    per_atom_s1 = np.sqrt(force_var[:, -1].mean(axis=-1))
    sizes = [g.num_atoms for g in data.graphs]
    max_force = np.array([part.max() for part in np.split(per_atom_s1, np.cumsum(sizes)[:-1])])
    scores = {"max force σ (S1)": max_force}
    if "gap" in pred:
        scores["gap σ"] = np.sqrt(pred["gap_var_epistemic"] + pred["gap_var_aleatoric"])
        scores["gap σ epistemic"] = np.sqrt(pred["gap_var_epistemic"])
    for s, name in enumerate(ensemble.state_names):
        scores[f"{name} energy σ"] = np.sqrt(pred["energy_var_epistemic"][:, s] + pred["energy_var_aleatoric"][:, s])
    return scores


def torsion_figure(ensemble, data, angles, path) -> None:
    """Both states' energies along the twist (reference points, prediction ± 2σ) and the σ's."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pred = ensemble.predict(data)
    order = np.argsort(angles)
    origin = data.state_energies[:, 0].min()
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    for s, name in enumerate(ensemble.state_names):
        sigma = np.sqrt(pred["energy_var_epistemic"][:, s] + pred["energy_var_aleatoric"][:, s])
        left.plot(angles[order], data.state_energies[order, s] - origin, "o", ms=4, color=f"C{s}",
                  label=f"{name} SA-CASSCF")
        left.errorbar(angles[order], pred["energy"][order, s] - origin, yerr=2 * sigma[order], fmt="x", ms=4,
                      color=f"C{s}", alpha=0.6, label=f"{name} RACE ± 2σ")
    left.set_xlabel("C2-C3=C4-C5 torsion (deg, 180 = trans)")
    left.set_ylabel("energy − min S0 (eV)")
    left.legend(fontsize=8)
    gap_sigma = np.sqrt(pred["gap_var_epistemic"] + pred["gap_var_aleatoric"])
    gap_error = np.abs(pred["gap"] - (data.state_energies[:, 1] - data.state_energies[:, 0]))
    right.semilogy(angles[order], gap_sigma[order], "o-", ms=3, label="gap σ (ensemble)")
    right.semilogy(angles[order], np.sqrt(pred["gap_var_epistemic"][order]), "s-", ms=3, label="gap σ epistemic")
    right.semilogy(angles[order], gap_error[order], "k.", label="|gap error|")
    right.set_xlabel("C2-C3=C4-C5 torsion (deg)")
    right.set_ylabel("eV")
    right.legend(fontsize=8)
    figure.savefig(path, dpi=110)


def _markdown(results) -> str:
    lines = [
        "# Two-state PSB3 (SA-2-CASSCF) with Bayesian RACE\n",
        f"`{results['command']}` at commit {results['git_commit']}; data {results['data_method']}; "
        f"{results['sizes']}; ensembles of {results['members']} members, SWAG from one, {results['minutes']} min "
        f"per member (one core, one after another), preset {results['preset']}; load at start {results['machine']['load_at_start']}.\n",
        "Errors on the in-distribution test set (energies meV, forces meV/Å); ρ = Spearman(|error|, σ); "
        "area = miscalibration area (0 perfect, 0.5 worst); σ = √(epistemic + aleatoric).\n",
        "| run | quantity | MAE | RMSE | ρ | area | NLL |", "|---|---|---|---|---|---|---|",
    ]
    for loss, run in results["runs"].items():
        for name, m in run["test"].items():
            lines.append(f"| {loss} | {name} | {m['mae'] * 1000:.1f} | {m['rmse'] * 1000:.1f} | {m['spearman']:.2f} | "
                         f"{m['miscalibration_area']:.3f} | {m['nll']:.2f} |")
    lines += ["", "OOD: AUROC of each score for telling `test_torsion.xyz` from `test.xyz` (1 = perfect, 0.5 = chance).\n",
              "| run | " + " | ".join(next(iter(results["runs"].values()))["auroc"]) + " |",
              "|---|" + "---|" * len(next(iter(results["runs"].values()))["auroc"])]
    for loss, run in results["runs"].items():
        lines.append(f"| {loss} | " + " | ".join(f"{v:.2f}" for v in run["auroc"].values()) + " |")
    for loss, run in results["runs"].items():
        if run["auroc_near_crossing"]:
            lines.append(f"| {loss}, the {run['near_crossing_frames']} twisted frames with gap < {NEAR_CROSSING_EV} eV | "
                         + " | ".join(f"{v:.2f}" for v in run["auroc_near_crossing"].values()) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    from bayesrace.data import TypeMap
    from bayesrace.model import model_config_from
    from bayesrace.properties import (PropertyEnsemble, PropertySet, PropertyTraining, evaluate, read_property_set,
                                      state_targets, train_property_ensemble)
    from bayesrace.uq import auroc

    manifest = json.loads((args.data / "manifest.json").read_text())
    targets = state_targets(2)
    config = model_config_from(args.preset)
    type_map = TypeMap(["H", "C", "N"])
    sets = {name: read_property_set(args.data / f"{name}.xyz", targets, type_map, config.cutoff)
            for name in ("train", "valid", "test", "test_torsion")}
    results = {
        "command": command_line("psb3_multistate.py", argv), "git_commit": git_commit(), "machine": machine_info(),
        "data": str(args.data), "data_method": f"{manifest.get('method', '?')}/{manifest.get('basis', '?')}",
        "sizes": ", ".join(f"{k} {len(v)}" for k, v in sets.items()), "members": args.members,
        "minutes": args.minutes, "preset": args.preset, "runs": {},
    }
    torsion_gap = sets["test_torsion"].state_energies[:, 1] - sets["test_torsion"].state_energies[:, 0]
    near = torsion_gap < NEAR_CROSSING_EV  # the twisted frames nearest the S1/S0 crossing

    def record(ensemble, started=None):
        scores_in, scores_out = ood_scores(ensemble, sets["test"]), ood_scores(ensemble, sets["test_torsion"])
        return {
            "test": evaluate(ensemble, sets["test"]),
            "test_torsion": evaluate(ensemble, sets["test_torsion"]),
            "auroc": {name: auroc(scores_in[name], scores_out[name]) for name in scores_in},
            "auroc_near_crossing": {name: auroc(scores_in[name], scores_out[name][near]) for name in scores_in}
            if near.any() else {},
            "near_crossing_frames": int(near.sum()),
            "epochs": [r.get("epochs") for r in ensemble.records],
            "wall_minutes": (time.time() - started) / 60.0 if started else None,
        }

    for run in args.runs:
        loss, _, kind = run.partition(":")
        started = time.time()
        settings = PropertyTraining(loss=loss, minutes=args.minutes, seed=args.seed, batch_size=8, posterior=kind)
        members = args.members if kind == "ensemble" else 1
        ensemble = train_property_ensemble(config, type_map.type_names, targets, sets["train"], sets["valid"],
                                           settings, n_members=members)
        (args.keep / run.replace(":", "_")).mkdir(parents=True, exist_ok=True)
        ensemble.save(args.keep / run.replace(":", "_") / "ensemble.pt")
        results["runs"][f"{loss}, {kind}"] = record(ensemble, started)
        if run == "nll_jef:ensemble":  # every frame of the torsion kind, in and out of distribution
            import ase.io

            twisted = [(name, k) for name in ("test", "test_torsion")
                       for k, atoms in enumerate(ase.io.read(args.data / f"{name}.xyz", ":"))
                       if atoms.info.get("config_type") == "torsion"]
            angles = np.array([ase.io.read(args.data / f"{name}.xyz", k).info["torsion_deg"] for name, k in twisted])
            along = [sets[name].subset([k]) for name, k in twisted]
            merged = along[0]
            for part in along[1:]:
                merged = PropertySet(merged.graphs + part.graphs, np.concatenate([merged.values, part.values]),
                                     np.concatenate([merged.state_energies, part.state_energies]),
                                     merged.state_forces + part.state_forces)
            args.out.mkdir(parents=True, exist_ok=True)
            torsion_figure(ensemble, merged, angles, args.out / "torsion.png")
        if kind == "ensemble":  # its first member alone: a mean–variance model (aleatoric σ only)
            results["runs"][f"{loss}, one member (MVE)"] = record(PropertyEnsemble(ensemble.members[:1], ensemble.records[:1]))
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "results.json", results)  # partial results as each run finishes
        (args.out / "results.md").write_text(_markdown(results))
    print(_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
