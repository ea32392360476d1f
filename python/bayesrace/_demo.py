"""The main job on the embedded default data: PSB3 → ensemble → calibration on the
validation set → evaluation (before/after recalibration, OOD detection) → report →
export of the calibrated posterior → LAMMPS MD under mpirun with per-atom uncertainty
and fix halt.

Each step is skipped when its output already exists and matches, so an interrupted demo
picks up where it stopped (training resumes from its checkpoints).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from ._mpi import mpirun_executable

DEMO_SEED = 0


def _step(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def demo_config(data_dir: Path, run_dir: Path, members: int, minutes: float) -> dict:
    """The training config of the demo: a small RACE ensemble with NLL_JEF heads."""
    return {
        "out": str(run_dir),
        "seed": DEMO_SEED,
        "data": {
            "train": str(data_dir / "train.xyz"),
            "valid": str(data_dir / "valid.xyz"),
            "reference_energies": "isolated",
            "isolated_atoms": str(data_dir / "isolated_atoms.xyz"),
        },
        "model": {"preset": "small"},
        "loss": {"kind": "nll_jef", "mse_warmup_epochs": 5},
        "training": {"batch_size": 8, "lr": 0.005, "max_epochs": 300, "max_minutes": minutes},
        "ensemble": {"members": members},
    }


def run_demo(out: Path, members: int = 4, minutes: float = 2.0, ranks: int = 1, quiet: bool = False) -> dict:
    from . import keys
    from ._calibration import calibrate_posterior_file
    from ._evaluate import _jsonable, evaluate_sets, format_summary
    from ._export import export_posterior
    from ._lammps_example import run_psb3_example
    from ._posterior import load_posterior
    from ._psb3 import generate_psb3

    started = time.time()
    # absolute: the training config written below resolves paths against its own folder
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_dir = out / "data"
    run_dir = out / "run"

    _step("1/4 PSB3 data: GFN2-xTB molecular dynamics (tblite)")
    manifest_path = data_dir / "manifest.json"
    if manifest_path.exists() and json.loads(manifest_path.read_text()).get("seed") == DEMO_SEED:
        print(f"reusing {data_dir}")
    else:
        generate_psb3(data_dir, seed=DEMO_SEED, progress=not quiet)
    manifest = json.loads(manifest_path.read_text())
    for name, entry in manifest["files"].items():
        print(f"  {name}: {entry['frames']} frames")

    _step(f"2/4 training an ensemble of {members} RACE members (NLL_JEF) on {ranks} MPI rank(s)")
    config_path = out / "config.yaml"
    config_path.write_text(yaml.safe_dump(demo_config(data_dir, run_dir, members, minutes), sort_keys=False))
    command = [sys.executable, "-m", "bayesrace.cli", "train", str(config_path)] + (["--quiet"] if quiet else [])
    if ranks > 1:
        command = [mpirun_executable(), "-np", str(ranks)] + command
    if subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode != 0:
        raise RuntimeError(f"training failed (see its message above); command: {' '.join(command)}")

    _step("3/4 calibration on the validation set, evaluation: in-distribution vs out-of-distribution")
    # isotonic map of σ fitted on the validation set (not used for gradients); the calibrated
    # copy of the posterior also carries the default extrapolation threshold, and is what
    # gets exported
    calibrated_path = run_dir / "posterior_calibrated.pt"
    calibrated = calibrate_posterior_file(run_dir / "posterior.pt", data_dir / "valid.xyz", calibrated_path,
                                          method="isotonic", progress=not quiet)
    print(f"calibrated posterior: {calibrated_path} (force σ threshold {calibrated['threshold']:.3g} eV/Å)")
    valid_name = "valid (calibration set)"
    sets = {
        "test_id (300-600 K)": str(data_dir / "test_id.xyz"),
        "ood_hot (1000-1500 K)": str(data_dir / "test_ood_hot.xyz"),
        "ood_torsion (C=C twist)": str(data_dir / "test_ood_torsion.xyz"),
        valid_name: str(data_dir / "valid.xyz"),
    }
    report_dir = out / "report"
    # the uncalibrated posterior, recalibrated on the validation set inside evaluate_sets
    # (the same fit as above), so the report shows every number before and after
    evaluation = evaluate_sets(load_posterior(run_dir / "posterior.pt"), sets, report_dir=report_dir,
                               progress=not quiet, calibrate_on=valid_name, calibration_method="isotonic")
    print(format_summary(evaluation))
    print(f"\nreport: {report_dir / 'report.md'} (plots and metrics.json beside it)")

    _step(f"4/4 export and LAMMPS: PSB3 heated under mpirun -np {ranks}, halted when the model is unsure")
    deployable = out / "psb3_ensemble.pt"
    # calibration and threshold come from the calibrated posterior's record
    metadata = export_posterior(load_posterior(calibrated_path), deployable)
    threshold = float(metadata[keys.META_THRESHOLDS][keys.ATOMIC_FORCE_STD])
    print(f"deployable: {deployable} ({metadata[keys.META_N_MEMBERS]} members, calibrated σ's, "
          f"force σ threshold {threshold:.3g} eV/Å)")
    md = run_psb3_example(deployable, out / "lammps", nprocs=ranks)
    steps, sigma, temperature = md["thermo"]["Step"], md["thermo"]["c_ug[1]"], md["thermo"]["Temp"]
    print(f"{'step':>6} {'T [K]':>8} {'max force σ [eV/Å]':>19}")
    for k in range(0, len(steps), max(1, len(steps) // 12)):
        print(f"{int(steps[k]):>6} {temperature[k]:>8.0f} {sigma[k]:>19.4f}")
    if md["halted"]:
        print(f"fix halt stopped the run at step {md['halt_step']}: max force σ {sigma[-1]:.3g} eV/Å "
              f"> {threshold:.3g} at {temperature[-1]:.0f} K")
    else:
        print(f"the run completed {md['steps_run']} steps without crossing the threshold")
    print(f"per-atom σ dump: {md['dump']}; LAMMPS log: {md['log']}")
    summary = {
        "evaluation": evaluation,
        "calibration": {"posterior": str(calibrated_path), "threshold": calibrated["threshold"],
                        "calibration": calibrated["calibration"]},
        "lammps": {k: md[k] for k in ("steps_run", "halted", "halt_step", "max_force_std", "max_temperature")},
    }
    (report_dir / "main_job.json").write_text(json.dumps(_jsonable(summary), indent=1, default=str))
    print(f"main job finished in {time.time() - started:.0f} s")
    return evaluation
