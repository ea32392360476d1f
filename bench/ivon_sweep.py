#!/usr/bin/env python
"""IVON's posterior width against its effective sample size (issue 13: "fix IVON or show why not").

IVON's weight noise is std ≈ 1/sqrt(ess·(h + δ)); the Bayesian ess for our losses is half the
number of training atoms (``train/_optim.default_ivon_ess``). This sweep divides that ess by
10, 100, ... (a "warm" posterior) and asks whether a wider IVON posterior becomes useful: does
its epistemic force σ grow to the scale of the errors, does it flag hot and twisted PSB3, and
what does it cost in accuracy.

1. one MVE model (NLL_JEF, preset ``--preset``, ``--base-epochs`` epochs) on PSB3's train set;
2. for each ess factor f: IVON from that model's weights (``training.init_from``,
   ``ivon.start_epoch: 0``) for ``--ivon-epochs`` epochs with ess = f × the default;
3. each posterior (and the MVE model itself, f = 0: no weight noise) is evaluated on test_id,
   ood_hot, the torsion frames beyond the training twists and valid, recalibrated on valid by
   ``--calibration`` (``bayesrace.uq.evaluate_sets``).

Outputs in ``--out`` (default bench/results/ivon_sweep): results.json, results.md.

    python bench/ivon_sweep.py                      # ~15 min on one core
    python bench/ivon_sweep.py --factors 1 0.01 --ivon-epochs 2 --out /tmp/ivon --runs /tmp/ivon_runs
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402  (bench helpers: bench/ is not a package)
    BENCH_DIR, cli_command, command_line, git_commit, machine_info, psb3_data, write_config, write_json,
)

SCORES = ("max_atomic_force_sigma_epistemic_eV_per_A", "energy_sigma_epistemic_meV_per_atom",
          "max_atomic_force_sigma_eV_per_A")


def training_config(args, data: Path, out: Path, kind: str, epochs: int, **extra) -> dict:
    config = {
        "out": str(out), "seed": 0,
        "data": {"train": str(data / "train.xyz"), "valid": str(data / "valid.xyz"),
                 "reference_energies": "isolated", "isolated_atoms": str(data / "isolated_atoms.xyz")},
        "model": {"preset": args.preset},
        "loss": {"kind": "nll_jef", "mse_warmup_epochs": 0 if kind == "ivon" else args.warmup},
        "posterior": {"kind": kind, "samples": args.samples},
        "training": {"batch_size": 8, "lr": args.lr, "max_epochs": epochs, "threads": 1,
                     "early_stopping_patience": 10 * epochs},
    }
    for key, value in extra.items():
        section, name = key.split(".")
        config.setdefault(section, {})[name] = value
    return config


def train(config: dict, path: Path, log: Path) -> float:
    write_config(config, path)
    started = time.perf_counter()
    with open(log, "w") as stream:
        subprocess.run(cli_command("train", path), check=True, stdout=stream, stderr=subprocess.STDOUT)
    return time.perf_counter() - started


def evaluate(posterior_path: Path, sets: dict, calibration: str) -> dict:
    from bayesrace.bayes import load_posterior
    from bayesrace.uq import evaluate_sets

    evaluation = evaluate_sets(load_posterior(posterior_path), sets, progress=False, calibrate_on="valid",
                               calibration_method=calibration)
    test = evaluation["sets"]["test_id"]
    after = evaluation["recalibrated"]["test_id"]
    return {
        "forces_rmse_meV_per_A": 1000 * test["forces_rmse_eV_per_A"],
        "energy_rmse_meV_per_atom": test["energy_rmse_meV_per_atom"],
        "sigma_epistemic_over_aleatoric": (test["forces_sigma_epistemic_mean_eV_per_A"]
                                           / test["forces_sigma_aleatoric_mean_eV_per_A"]),
        "sigma_epistemic_mean_meV_per_A": 1000 * test["forces_sigma_epistemic_mean_eV_per_A"],
        "forces_nll_recalibrated": after["forces_nll"],
        "forces_nll": test["forces_nll"],
        "auroc": {name: {score: values[score] for score in SCORES}
                  for name, values in evaluation["ood"]["auroc_recalibrated"].items()},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="a PSB3 data folder (default: bench/runs/uq/data_psb3)")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--base-epochs", type=int, default=30)
    parser.add_argument("--ivon-epochs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.005)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--factors", type=float, nargs="+", default=[1.0, 0.1, 0.01, 0.001])
    parser.add_argument("--calibration", default="split")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "ivon_sweep")
    parser.add_argument("--runs", type=Path, default=BENCH_DIR / "runs" / "ivon_sweep")
    args = parser.parse_args(argv)
    from bayesrace.data import read_frames, write_torsion_beyond_training

    started = time.perf_counter()
    machine = machine_info()  # the load before this script's own work
    data = (args.data or psb3_data(BENCH_DIR / "runs" / "uq" / "data_psb3")).resolve()
    runs, out = args.runs.resolve(), args.out.resolve()
    runs.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    beyond = write_torsion_beyond_training(data)
    sets = {"test_id": data / "test_id.xyz", "ood_hot": data / "test_ood_hot.xyz",
            "ood_torsion_beyond": Path(beyond["path"]), "valid": data / "valid.xyz"}
    # train/_optim.default_ivon_ess: half the number of training atoms
    ess0 = 0.5 * sum(len(frame.numbers) for frame in read_frames(data / "train.xyz"))

    base = runs / "mve"
    results = {"base_seconds": 0.0, "runs": {}}
    if not (base / "posterior.pt").is_file():
        results["base_seconds"] = train(training_config(args, data, base, "mve", args.base_epochs),
                                        runs / "mve.yaml", runs / "mve.log")
    results["runs"]["mve (no weight noise)"] = dict(factor=0.0, ess=None, **evaluate(base / "posterior.pt", sets,
                                                                                     args.calibration))
    for factor in args.factors:
        name = f"ivon_ess_x{factor:g}"
        run = runs / name
        seconds = 0.0
        if not (run / "posterior.pt").is_file():
            config = training_config(args, data, run, "ivon", args.ivon_epochs,
                                     **{"training.init_from": str(base / "posterior.pt")})
            config["posterior"]["ivon"] = {"start_epoch": 0, "ess": factor * ess0}
            seconds = train(config, runs / f"{name}.yaml", runs / f"{name}.log")
        results["runs"][name] = dict(factor=factor, ess=factor * ess0, train_seconds=seconds,
                                     **evaluate(run / "posterior.pt", sets, args.calibration))
        write_json(out / "results.json", results)
        print(name, results["runs"][name])
    machine["load_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
    results.update(command=command_line("ivon_sweep.py"), commit=git_commit(), machine=machine,
                   wall_s=time.perf_counter() - started, default_ess=ess0, n_beyond=beyond["n_frames"])
    write_json(out / "results.json", results)
    write_report(out, results, args)
    return 0


def write_report(out: Path, results: dict, args) -> None:
    lines = ["# IVON: posterior width against the effective sample size", "",
             f"Command: `{results['command']}`  ", f"Commit {results['commit']}; {results['machine']['cpu']}, "
             f"{results['machine']['cores']} cores, load {' '.join(results['machine']['load_at_start'])} at the start, "
             f"{' '.join(results['machine']['load_at_end'])} at the end; wall {results['wall_s']:.0f} s.", "",
             f"PSB3 (GFN2-xTB), preset `{args.preset}`. MVE base: {args.base_epochs} epochs NLL_JEF; each IVON run "
             f"starts from its weights (`init_from`, `start_epoch: 0`) for {args.ivon_epochs} epochs, ess = factor × "
             f"{results['default_ess']:.0f} (half the training atoms), {args.samples} samples. σ's recalibrated on "
             f"valid ({args.calibration}) for NLL and AUROC; RMSE and σ_epi/σ_ale as predicted. Torsion: the "
             f"{results['n_beyond']} scan frames beyond the training twists.", "",
             "| posterior | ess | test_id F RMSE [meV/Å] | E RMSE [meV/atom] | mean σ_F,epi [meV/Å] | σ_F epi/ale | F NLL (recal.) | "
             "AUROC hot: max σ_F,epi / σ_E,epi/N | AUROC torsion: max σ_F,epi / σ_E,epi/N |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for name, r in results["runs"].items():
        ratio = r["sigma_epistemic_over_aleatoric"] if r["factor"] > 0 else None
        hot, tor = r["auroc"]["ood_hot"], r["auroc"]["ood_torsion_beyond"]
        lines.append(f"| {name} | {r['ess'] or 0:.3g} | {r['forces_rmse_meV_per_A']:.1f} | "
                     f"{r['energy_rmse_meV_per_atom']:.2f} | {r['sigma_epistemic_mean_meV_per_A']:.1f} | "
                     f"{'–' if ratio is None else f'{ratio:.3f}'} | "
                     f"{r['forces_nll_recalibrated']:.3f} | {hot[SCORES[0]]:.3f} / {hot[SCORES[1]]:.3f} | "
                     f"{tor[SCORES[0]]:.3f} / {tor[SCORES[1]]:.3f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
