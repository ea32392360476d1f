#!/usr/bin/env python
"""Uncertainty benchmark: eight posteriors on PSB3 and acetylacetone, before and after recalibration.

Methods (one training config each, everything else equal: preset, data, epochs, seed):

  mve            one model with NLL_JEF heads (mean-variance estimation)
  de_nll         deep ensemble, conventional NLL (Gaussian energies, forces by MSE)
  de_nll_jef     deep ensemble, NLL_JEF (energies and force vectors, Cholesky Σ_i)
  de_nll_jef_eq  deep ensemble, NLL_JEF with the equivariant Σ_i
  swag           SWAG (diagonal + low rank) around one NLL_JEF model
  ivon           IVON variational training of one NLL_JEF model
  laplace        last-layer Laplace (energies and forces) on one NLL_JEF model
  shallow        shallow ensemble: the mve model's trunk with --members readout heads
                 (heads 2.. trained on the frozen trunk for a quarter of the epochs)

Data:
  psb3  the built-in PSB3 set (GFN2-xTB): train 400 / valid 100; in distribution test_id
        (300–600 K); out of distribution ood_hot (1000–1500 K), ood_torsion (C=C twist scan,
        partially relaxed) and ood_torsion_thermal (300 K MD with the twist held at 0–120°)
  acac  ../shared/data/acac: train_300K split 450 / 50 (seed 0); in distribution test_MD_300K;
        out of distribution test_MD_600K, test_H_transfer (proton transfer), test_dihedral, and
        test_dihedral_thermal / test_H_transfer_thermal (300 K xTB MD with the twist or the proton
        held beyond training; unlabelled: AUROCs only; _common.acac_thermal_sets)

Each posterior is evaluated with ``bayesrace evaluate``'s machinery, recalibrated on the
validation set (isotonic map by default), and the numbers go to ``--out`` (default
``bench/results/uq``): results.json, results.md (one table per data set, every metric before
and after recalibration, the CPU time each method cost) and, per data set and method, the
evaluation report (plots, metrics.json) goes with its training run to ``--runs`` (default
``bench/runs/uq``: ``<dataset>/<method>/report/``), out of the results.

    python bench/uq.py                                   # both data sets, all methods
    python bench/uq.py --datasets psb3 --methods mve swag --epochs 3 --out /tmp/uq --runs /tmp/uq_runs

``--evaluate-only`` re-evaluates posteriors already trained in ``--runs`` (e.g. after a test set
was added) and keeps the training cost recorded in ``--out``'s results.json.

Every OOD table also has a "low |F|" column: the AUROC of −mean_i ‖F_i‖ (predicted), which
uses no uncertainty at all. A set it separates (AUROC near 1, as for relaxed scans against
thermal MD) can be "detected" by any score that divides by ‖F‖; read such AUROCs with care.
And a "ref. E" column: the AUROC of the reference (labelled) energy per atom, no model at all.
For a set drawn from the same molecule's canonical ensemble at a higher temperature T' than
the reference's T (hot MD), the Boltzmann likelihood ratio p_T'(x)/p_T(x) ∝ exp(−E(x)(1/kT' −
1/kT)) is monotone in E, so no function of the geometry separates the two better: that column
is the ceiling an OOD score can reach there (up to sampling noise; approximately so where either
set mixes temperatures, as PSB3's do). For other sets it is only a reference.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402  (bench helpers: bench/ is not a package)
    ACAC_DIR, BENCH_DIR, acac_thermal_sets, cli_command, command_line, git_commit, machine_info, psb3_data,
    run_jobs, write_config, write_frames, write_json,
)

from bayesrace.uq import OOD_SCORES  # noqa: E402

METHODS = ("mve", "de_nll", "de_nll_jef", "de_nll_jef_eq", "swag", "ivon", "laplace", "shallow")
DATASETS = ("psb3", "acac")

# the numbers shown in the tables: (header, metric name in evaluate's per-set results)
TABLE_METRICS = (
    ("E RMSE [meV/at]", "energy_rmse_meV_per_atom"),
    ("F RMSE [meV/Å]", "forces_rmse_eV_per_A"),
    ("NLL E", "energy_nll"),
    ("NLL F", "forces_nll"),
    ("MA E", "energy_miscalibration_area"),
    ("MA F", "forces_miscalibration_area"),
    ("ENCE E", "energy_ence"),
    ("ENCE F", "forces_ence"),
    ("cov95 F", "forces_coverage_95"),
    ("sharp F [meV/Å]", "forces_sharpness_eV_per_A"),
    ("ρ F", "spearman_forces"),
    ("σF epi/ale", None),  # ratio of mean epistemic to aleatoric force σ
)


# ----------------------------------------------------------------------------------------
# data


def prepare_psb3(runs: Path) -> Dict:
    data = psb3_data(runs / "data_psb3")
    return {
        "train": data / "train.xyz",
        "valid": data / "valid.xyz",
        "isolated": data / "isolated_atoms.xyz",
        "test": {
            "test_id": data / "test_id.xyz",
            "ood_hot": data / "test_ood_hot.xyz",
            "ood_torsion": data / "test_ood_torsion.xyz",
            "ood_torsion_thermal": thermal_torsion(data),
        },
    }


def thermal_torsion(data: Path) -> Path:
    """The thermal torsion set beside the PSB3 data (written once, ~25 s of xTB MD)."""
    from bayesrace.data import TORSION_THERMAL_FILE, write_thermal_torsion

    path = data / TORSION_THERMAL_FILE
    if not path.exists():
        write_thermal_torsion(data, progress=False)
    return path


def prepare_acac(runs: Path) -> Dict:
    import ase.io

    data = runs / "data_acac"
    train, valid = data / "train.xyz", data / "valid.xyz"
    if not valid.exists():
        frames = ase.io.read(ACAC_DIR / "train_300K.xyz", ":")
        order = np.random.default_rng(0).permutation(len(frames))
        write_frames(valid, [frames[k] for k in order[:50]])
        write_frames(train, [frames[k] for k in order[50:]])
    return {
        "train": train,
        "valid": valid,
        "isolated": ACAC_DIR / "isolated_atoms.xyz",
        "test": {
            "test_MD_300K": ACAC_DIR / "test_MD_300K.xyz",
            "test_MD_600K": ACAC_DIR / "test_MD_600K.xyz",
            "test_H_transfer": ACAC_DIR / "test_H_transfer.xyz",
            "test_dihedral": ACAC_DIR / "test_dihedral.xyz",
            **acac_thermal_sets(data),
        },
    }


# ----------------------------------------------------------------------------------------
# configs


def method_config(method: str, data: Dict, run_dir: Path, args) -> Dict:
    """The training config of one method; all methods share data, model, epochs and seed."""
    ensemble = method.startswith("de_")
    loss = {"de_nll": "nll", "de_nll_jef_eq": "nll_jef_equivariant"}.get(method, "nll_jef")
    config = {
        "out": str(run_dir),
        "seed": args.seed,
        "data": {
            "train": str(data["train"]),
            "valid": str(data["valid"]),
            "reference_energies": "isolated",
            "isolated_atoms": str(data["isolated"]),
        },
        "model": {"preset": args.preset},
        "loss": {"kind": loss, "mse_warmup_epochs": args.warmup},
        "training": {
            "batch_size": 8,
            "lr": args.lr,
            "max_epochs": args.epochs,
            "early_stopping_patience": 10 * args.epochs,  # off: every method gets every epoch
            "lr_patience": 5,
            "threads": 1,
        },
    }
    if method == "de_nll_jef_eq":
        config["model"]["covariance"] = "equivariant"
    if ensemble:
        config["posterior"] = {"kind": "ensemble"}
        config["ensemble"] = {"members": args.members}
    elif method == "mve":
        config["posterior"] = {"kind": "mve"}
    elif method == "swag":
        # the last third of the epochs collects snapshots at a constant learning rate
        start = max(args.warmup + 1, args.epochs - max(1, args.epochs // 3))
        config["posterior"] = {
            "kind": "swag",
            "samples": args.samples,
            "swag": {"start_epoch": start, "collect_every": 10, "rank": 10},
        }
    elif method == "ivon":
        config["posterior"] = {"kind": "ivon", "samples": args.samples}
    elif method == "laplace":
        config["posterior"] = {"kind": "laplace", "samples": args.samples}
    elif method == "shallow":
        config["posterior"] = {"kind": "shallow", "shallow": {"heads": args.members}}
    else:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    return config


# ----------------------------------------------------------------------------------------
# evaluation


def evaluate_method(posterior_path: Path, data: Dict, report_dir: Path, method: str) -> Dict:
    """Every metric on the test sets before and after recalibration on the validation set."""
    from bayesrace.uq import evaluate_sets
    from bayesrace.bayes import load_posterior

    posterior = load_posterior(posterior_path)
    if posterior.feature_density is None:  # trained before training fitted one: fit it as training now does
        from bayesrace.bayes import fit_feature_density_on_file

        posterior.feature_density = fit_feature_density_on_file(posterior, data["train"])
    sets = {name: str(path) for name, path in data["test"].items()}
    sets["valid"] = str(data["valid"])
    evaluation = evaluate_sets(
        posterior, sets, report_dir=report_dir, calibrate_on="valid", calibration_method="isotonic", progress=False
    )
    # the prediction arrays (MBs per method) stay with the runs, not in the results
    for path in report_dir.glob("predictions_*.npz"):
        path.replace(posterior_path.parent / path.name)
    return evaluation


def low_force_auroc(run_dir: Path, sets: list) -> Dict:
    """{OOD set: AUROC of −mean_i ‖F_i‖}, the first set as the in-distribution reference:
    how well "small predicted forces" alone tells each set apart (a confound check)."""
    from bayesrace.uq import auroc

    def mean_force(name):
        prediction = np.load(run_dir / f"predictions_{name}.npz")
        norms = np.linalg.norm(prediction["forces"], axis=1)
        return np.bincount(prediction["batch"], weights=norms) / np.bincount(prediction["batch"])

    reference = mean_force(sets[0])
    return {name: auroc(-reference, -mean_force(name)) for name in sets[1:] if name != "valid"}


def reference_energy_auroc(test_sets: Dict[str, Path]) -> Dict:
    """{OOD set: AUROC of the reference energy per atom}, the first set as the in-distribution
    reference; sets without energies (unlabelled) are left out. No model: the ceiling for a set
    that differs from the reference in temperature only (module docstring)."""
    from bayesrace.data import read_frames
    from bayesrace.uq import auroc

    def energies(path):
        frames = read_frames(path, require_energy=False, require_forces=False)
        if any(frame.energy is None for frame in frames):
            return None
        return np.array([frame.energy / frame.num_atoms for frame in frames])

    names = list(test_sets)
    reference = energies(test_sets[names[0]])
    result = {}
    for name in names[1:]:
        values = energies(test_sets[name])
        if reference is not None and values is not None:
            result[name] = auroc(reference, values)
    return result


def _cell(metrics: Dict, name: str) -> str:
    if name is None:
        epi = metrics.get("forces_sigma_epistemic_mean_eV_per_A")
        ale = metrics.get("forces_sigma_aleatoric_mean_eV_per_A")
        if epi is None or not ale:
            return "–" if epi is None else "∞"
        return f"{epi / ale:.2f}"
    value = metrics.get(name)
    if value is None:
        return "–"
    if name == "forces_rmse_eV_per_A" or name.endswith("sharpness_eV_per_A"):
        return f"{1000 * value:.1f}"
    return f"{value:.3g}"


def _flagged_table(dataset: str, per_method: Dict, sets: list) -> list:
    """Fractions of each set's structures above the thresholds ``bayesrace calibrate`` would store
    (1.5 × the 99th percentile over the validation set, of the recalibrated scores)."""
    from bayesrace.uq import THRESHOLD_SCORES

    rows = [(m, e["flagged"]) for m, e in per_method.items() if e.get("flagged")]
    if not rows:
        return []
    shown = [n for n in sets if n != "valid"]
    lines = ["", f"### {dataset}: flagged by the stored default thresholds", "",
             "Fraction of each set's structures above τ = 1.5 × the 99th percentile over the validation set "
             "(recalibrated scores; what `bayesrace calibrate` stores and `fix halt` can use); columns: "
             + ", ".join(shown) + ".", "",
             "| method | score (LAMMPS) | τ | " + " | ".join(shown) + " |", "|" + "---|" * (3 + len(shown))]
    for method, flagged in rows:
        for score, tau in flagged["thresholds"].items():
            fractions = [flagged["fraction"].get(n, {}).get(score) for n in shown]
            lines.append(f"| {method} | {OOD_SCORES[score][0]} ({THRESHOLD_SCORES[score]}) | {tau:.3g} | "
                         + " | ".join("–" if f is None else f"{f:.2f}" for f in fractions) + " |")
    return lines


def write_markdown(results: Dict, path: Path) -> None:
    lines = ["# Uncertainty benchmark (bench/uq.py)", ""]
    lines += [
        "Commands: " + "; ".join(f"`{c}`" for c in results["commands"]) + "  ",
        f"Commit: {results['commit']}  ",
        f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, torch "
        f"{results['machine']['torch']}  ",
        f"Budget: preset `{results['settings']['preset']}`, {results['settings']['epochs']} epochs per model "
        f"({results['settings']['warmup']} MSE warm-up), ensembles of {results['settings']['members']}, "
        f"{results['settings']['samples']} weight sets for SWAG/IVON/Laplace, seed {results['settings']['seed']}.",
        "",
        "Metric names: NLL is the Gaussian negative log-likelihood (energies per structure in eV, forces per "
        "component in eV/Å, constant included); MA the miscalibration area; ENCE the expected normalised "
        "calibration error; cov95 the coverage of the 95 % interval; sharp the RMS predicted force σ; ρ the "
        "Spearman correlation of |ΔF_i| and σ_F,i; σF epi/ale the ratio of mean epistemic to aleatoric force σ. "
        "`a → b`: before → after recalibration (isotonic map fitted on the validation set).",
        "",
    ]
    for dataset, unordered in results["datasets"].items():
        per_method = {m: unordered[m] for m in METHODS if m in unordered}
        lines += [f"## {dataset}", ""]
        sets = results["sets"][dataset]
        for set_name in sets:
            lines += [f"### {dataset}: {set_name}", ""]
            header = ["method"] + [h for h, _ in TABLE_METRICS]
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "---|" * len(header))
            for method, entry in per_method.items():
                if "error" in entry:
                    lines.append(f"| {method} | failed: {entry['error']} |")
                    continue
                before = entry["before"].get(set_name, {})
                after = entry["after"].get(set_name, {})
                cells = []
                for _, name in TABLE_METRICS:
                    a, b = _cell(before, name), _cell(after, name)
                    cells.append(a if a == b else f"{a} → {b}")
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
            lines.append("")
        lines += [f"### {dataset}: out-of-distribution detection (AUROC against the in-distribution test set)", "",
                  "Scores per structure, of the posterior as trained (results.json also has them after recalibration); "
                  "`epi` = the epistemic part alone.",
                  ""]
        ood_rows = []
        for method, entry in per_method.items():
            for pair, scores in (entry.get("ood") or {}).items():
                ood_rows.append((method, pair, scores))
        score_names = [name for name in OOD_SCORES if any(name in scores for _, _, scores in ood_rows)]
        lines.append("| method | OOD set | " + " | ".join(OOD_SCORES[n][0] for n in score_names)
                     + " | low ‖F‖ | ref. E |")
        lines.append("|" + "---|" * (4 + len(score_names)))
        ceiling = results.get("reference_energy_auroc", {}).get(dataset, {})
        for method, pair, scores in ood_rows:
            confound = (per_method[method].get("ood_low_force") or {}).get(pair)
            lines.append(f"| {method} | {pair} | " + " | ".join(_cell(scores, s) for s in score_names)
                         + f" | {'–' if confound is None else f'{confound:.3g}'}"
                         + f" | {'–' if pair not in ceiling else f'{ceiling[pair]:.3g}'} |")
        lines += ["", "ref. E: AUROC of the labelled energy per atom, no model; for hot MD of the same molecule "
                  "the best any function of the geometry can reach (module docstring)."]
        lines += _flagged_table(dataset, per_method, sets)
        lines += ["", f"### {dataset}: cost", "", "| method | members | wall s | CPU s |", "|---|---:|---:|---:|"]
        for method, entry in per_method.items():
            lines.append(f"| {method} | {entry.get('members', '–')} | {entry.get('wall_s', '–')} | "
                         f"{entry.get('cpu_s', '–')} |")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------


def _previous_results(path: Path, settings: Dict) -> Dict:
    """Results of earlier runs with the same settings (a run of some methods adds to them)."""
    if path.exists():
        previous = json.loads(path.read_text())
        if previous.get("settings") == settings:
            return previous
        print(f"{path}: written with other settings; starting a new table", flush=True)
    return {"sets": {}, "datasets": {}}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--preset", default="small")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="MSE warm-up epochs before the NLL loss")
    parser.add_argument("--lr", type=float, default=0.005)
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slots", type=int, default=2, help="processes (ranks) running at once")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "uq")
    parser.add_argument("--runs", type=Path, default=BENCH_DIR / "runs" / "uq")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="re-evaluate posteriors already trained in --runs; keep the recorded training cost")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.runs.mkdir(parents=True, exist_ok=True)
    started = time.time()
    prepare = {"psb3": prepare_psb3, "acac": prepare_acac}
    data = {name: prepare[name](args.runs) for name in args.datasets}

    jobs = []
    for dataset in args.datasets:
        for method in args.methods:
            run_dir = args.runs / dataset / method
            run_dir.mkdir(parents=True, exist_ok=True)
            config = write_config(method_config(method, data[dataset], run_dir, args),
                                  args.out / "configs" / dataset / f"{method}.yaml")
            ranks = args.slots if method.startswith("de_") else 1
            jobs.append(dict(name=f"{dataset}/{method}", dataset=dataset, method=method, config=config,
                             command=cli_command("train", config, min(ranks, args.slots)), log=run_dir / "train.log",
                             ranks=ranks, run_dir=run_dir))
    # ensembles first (they take every slot), then single models side by side
    jobs.sort(key=lambda job: -job["ranks"])
    command = command_line("uq.py", argv)
    settings = {k: getattr(args, k) for k in ("preset", "epochs", "warmup", "lr", "members", "samples", "seed")}
    results = _previous_results(args.out / "results.json", settings)
    if args.evaluate_only:
        for job in jobs:
            recorded = results["datasets"].get(job["dataset"], {}).get(job["method"], {})
            if not (job["run_dir"] / "posterior.pt").exists() or "cpu_s" not in recorded:
                raise SystemExit(f"--evaluate-only: {job['name']} has no trained posterior in {job['run_dir']} "
                                 f"or no recorded cost in {args.out / 'results.json'}")
            job.update(wall_s=recorded["wall_s"], cpu_s=recorded["cpu_s"], returncode=0)
    else:
        print(f"training {len(jobs)} posteriors", flush=True)
        run_jobs(jobs, args.slots)

    results.update(command=command, commit=git_commit(), machine=machine_info(), settings=settings)
    results["commands"] = results.get("commands", []) + [command]
    for d in args.datasets:
        results["sets"][d] = list(data[d]["test"]) + ["valid"]
        results["datasets"].setdefault(d, {})
        results.setdefault("reference_energy_auroc", {})[d] = reference_energy_auroc(data[d]["test"])
    for job in jobs:
        entry = {"wall_s": job["wall_s"], "cpu_s": job["cpu_s"], "config": str(job["config"])}
        if job["returncode"] != 0:
            entry["error"] = f"training exit status {job['returncode']}"
        else:
            print(f"evaluating {job['name']}", flush=True)
            report = job["run_dir"] / "report"  # plots and per-method metrics: bulky, kept with the run
            try:
                metrics = evaluate_method(job["run_dir"] / "posterior.pt", data[job["dataset"]], report, job["method"])
                ood = metrics["ood"]
                entry.update(before=metrics["sets"], after=metrics.get("recalibrated") or {},
                             ood=ood["auroc"], ood_recalibrated=ood.get("auroc_recalibrated"),
                             calibration=metrics.get("calibration"), flagged=ood.get("flagged"),
                             ood_low_force=low_force_auroc(job["run_dir"], list(data[job["dataset"]]["test"])))
                from bayesrace.bayes import load_posterior

                entry["members"] = len(load_posterior(job["run_dir"] / "posterior.pt").members)
            except Exception as error:  # one broken method must not lose the others' numbers
                entry["error"] = f"evaluation failed: {error}"
        results["datasets"][job["dataset"]][job["method"]] = entry
    results["wall_s"] = round(time.time() - started, 1)
    write_json(args.out / "results.json", results, indent=1, default=str)
    write_markdown(results, args.out / "results.md")
    print(f"results: {args.out / 'results.md'} ({results['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
