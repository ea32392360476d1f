"""QM9 properties with Bayesian RACE property readouts (issue 15), within a CPU budget.

One RACE trunk with a readout per target (the 12 QM9 properties jointly: U0, U, H, G, ZPVE,
Cv, R2, alpha by per-atom sums with per-element references; HOMO, LUMO, gap by means; mu from
charges and an l=1 readout), mean–variance heads, an ensemble of ``--members`` members trained
one after another for ``--minutes`` each on one core. Reports per-target MAE next to published
numbers (at 110k training molecules — none at this size could be checked offline) and the
uncertainty metrics per target: Spearman ρ(|error|, σ), miscalibration area, NLL, for the
ensemble and for its first member alone (the mean–variance model).

    python bench/qm9.py --data /tmp/qm9_1k --minutes 10 --members 2 --out bench/results/qm9/1k

``--data`` is what ``bayesrace data qm9 --out DIR --n N`` writes (train/valid/test.xyz).
Writes results.json and results.md to ``--out``; the ensemble to ``--keep`` (git-ignored).
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

# Published test MAEs at 110k training molecules (SchNet: Schütt et al., J. Chem. Phys. 148, 241722
# (2018); PaiNN: Schütt et al., ICML 2021), in the units of the table below.
PUBLISHED_110K = {
    "mu": (0.033, 0.012), "alpha": (0.235, 0.045), "HOMO": (41, 27.6), "LUMO": (34, 20.4), "gap": (63, 45.7),
    "R2": (0.073, 0.066), "ZPVE": (1.7, 1.28), "U0": (14, 5.85), "U": (19, 5.83), "H": (14, 5.98),
    "G": (14, 7.35), "Cv": (0.033, 0.024),
}
ENERGY_TARGETS = {"U0", "U", "H", "G", "ZPVE", "HOMO", "LUMO", "gap"}  # eV in the files, meV in the table


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="a 'bayesrace data qm9' output folder")
    parser.add_argument("--compare", nargs="+", type=Path, default=None,
                        help="instead of training: result folders of earlier runs, tabulated side by side in "
                             "--out/summary.md with a plot of MAE against training molecules")
    parser.add_argument("--targets", nargs="+", default=None, help="default: every target in the manifest")
    parser.add_argument("--minutes", type=float, default=10.0, help="wall budget of each member")
    parser.add_argument("--members", type=int, default=2)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--loss", default="nll", choices=["mse", "nll"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--posterior", default="ensemble", choices=["ensemble", "swag"])
    parser.add_argument("--out", type=Path, default=Path("bench/results/qm9/run"))
    parser.add_argument("--keep", type=Path, default=RUNS_DIR / "qm9")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def _table(results) -> str:
    lines = [
        f"# QM9 with Bayesian RACE property readouts\n",
        f"`{results['command']}` at commit {results['git_commit']}; {results['n_train']} training, "
        f"{results['n_valid']} validation, {results['n_test']} test molecules; {results['members']} members × "
        f"{results['minutes']} min (one core each, one after another), preset {results['preset']}, loss "
        f"{results['loss']}, posterior {results['posterior']}; load at start {results['machine']['load_at_start']}.\n",
        "MAE on the test molecules (energies in meV, μ in D, α in bohr³, ⟨R²⟩ in bohr², Cv in cal/(mol K)). "
        "Published: SchNet / PaiNN trained on 110k molecules (no published number at this training-set size "
        "could be checked offline). UQ: ensemble σ = √(epistemic + aleatoric); ρ = Spearman(|error|, σ); "
        "area = miscalibration area (0 is perfect, 0.5 worst).\n",
        "| target | unit | ensemble MAE | member-0 MAE | SchNet 110k | PaiNN 110k | ρ ensemble | ρ member 0 | "
        "area ensemble | area member 0 | NLL ensemble |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in results["targets"].items():
        factor = 1000.0 if name in ENERGY_TARGETS else 1.0
        unit = "meV" if name in ENERGY_TARGETS else row["unit"]
        schnet, painn = PUBLISHED_110K.get(name, ("", ""))
        e, m = row["ensemble"], row["member0"]
        lines.append(
            f"| {name} | {unit} | {e['mae'] * factor:.4g} | {m['mae'] * factor:.4g} | {schnet} | {painn} | "
            f"{e['spearman']:.2f} | {m['spearman']:.2f} | {e['miscalibration_area']:.3f} | "
            f"{m['miscalibration_area']:.3f} | {e['nll']:.2f} |")
    return "\n".join(lines) + "\n"


def compare(folders, out: Path, argv) -> int:
    """summary.md and learning_curve.png from the results.json of earlier runs."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = [json.loads((folder / "results.json").read_text()) for folder in folders]
    names = list(runs[0]["targets"])
    labels = [f"{f.name}: {r['n_train']} train, {r['members']}×{r['minutes']:g} min, {r.get('posterior', 'ensemble')}"
              for f, r in zip(folders, runs)]
    lines = [f"# QM9: runs side by side\n", f"`{command_line('qm9.py', argv)}` at commit {git_commit()}.\n",
             "Test MAE (energies meV; other units as in each run's results.md); in brackets Spearman "
             "ρ(|error|, σ) and miscalibration area.\n",
             "| target | " + " | ".join(labels) + " | PaiNN 110k |", "|---|" + "---|" * (len(runs) + 1)]
    for name in names:
        factor = 1000.0 if name in ENERGY_TARGETS else 1.0
        cells = [f"{r['targets'][name]['ensemble']['mae'] * factor:.4g} ({r['targets'][name]['ensemble']['spearman']:.2f}, "
                 f"{r['targets'][name]['ensemble']['miscalibration_area']:.3f})" for r in runs]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {PUBLISHED_110K.get(name, ('', ''))[1]} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    ensembles = [r for r in runs if r.get("posterior", "ensemble") == "ensemble"]
    figure = Figure(figsize=(6.5, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axis = figure.subplots()
    sizes = [r["n_train"] for r in ensembles]
    for k, name in enumerate(names):
        first = ensembles[0]["targets"][name]["ensemble"]["mae"]
        axis.plot(sizes, [r["targets"][name]["ensemble"]["mae"] / first for r in ensembles], "o-", color=f"C{k % 10}",
                  label=name)
    axis.set_xscale("log")
    axis.set_xlabel("training molecules (same wall budget per member)")
    axis.set_ylabel(f"test MAE / MAE at {sizes[0]}")
    axis.legend(fontsize=7, ncol=3)
    figure.savefig(out / "learning_curve.png", dpi=110)
    print("\n".join(lines))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.compare:
        return compare(args.compare, args.out, argv)
    if args.data is None:
        raise SystemExit("qm9.py: --data is required (or --compare)")
    torch.set_num_threads(1)
    from bayesrace.data import QM9_TARGETS, TypeMap
    from bayesrace.model import model_config_from
    from bayesrace.properties import (PropertyEnsemble, PropertyTraining, Target, evaluate, read_property_set,
                                      train_property_ensemble)

    manifest = json.loads((args.data / "manifest.json").read_text())
    names = args.targets or [name for name in manifest["targets"]]
    scalars = [Target(n, QM9_TARGETS[n].pooling, QM9_TARGETS[n].unit) for n in names]
    # the dipole needs no per-element reference; listing it last keeps the columns readable
    targets = [t for t in scalars if t.pooling != "dipole"] + [t for t in scalars if t.pooling == "dipole"]
    config = model_config_from(args.preset)
    type_map = TypeMap(["H", "C", "N", "O", "F"])
    started = time.time()
    sets = {name: read_property_set(args.data / f"{name}.xyz", targets, type_map, config.cutoff)
            for name in ("train", "valid", "test")}
    print(f"read {', '.join(f'{k} {len(v)}' for k, v in sets.items())} molecules in {time.time() - started:.0f} s",
          file=sys.stderr, flush=True)
    results = {
        "command": command_line("qm9.py", argv), "git_commit": git_commit(), "machine": machine_info(),
        "data": str(args.data), "n_train": len(sets["train"]), "n_valid": len(sets["valid"]),
        "n_test": len(sets["test"]), "members": args.members, "minutes": args.minutes,
        "preset": args.preset, "loss": args.loss, "posterior": args.posterior, "targets": {},
    }
    settings = PropertyTraining(loss=args.loss, minutes=args.minutes, batch_size=args.batch_size, seed=args.seed,
                                posterior=args.posterior)
    ensemble = train_property_ensemble(config, type_map.type_names, targets, sets["train"], sets["valid"],
                                       settings, n_members=args.members)
    args.keep.mkdir(parents=True, exist_ok=True)
    ensemble.save(args.keep / "ensemble.pt")
    on_test = evaluate(ensemble, sets["test"])
    # the first trained network alone: for swag, the first member's samples
    per_member = len(ensemble.members) // args.members
    member0 = evaluate(PropertyEnsemble(ensemble.members[:per_member]), sets["test"])
    for target in targets:
        results["targets"][target.name] = {"unit": target.unit, "pooling": target.pooling,
                                           "ensemble": on_test[target.name], "member0": member0[target.name]}
    results["epochs"] = [r["epochs"] for r in ensemble.records]
    results["wall_minutes"] = (time.time() - started) / 60.0
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", results)
    (args.out / "results.md").write_text(_table(results))
    print(_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
