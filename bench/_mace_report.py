"""The results of bench/accuracy_vs_mace.py: test errors from the prediction files, the
learning-curve plot of both models, and results.md."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

MODELS = {"mace": "MACE", "race": "RACE (bayesrace)"}
ERROR_KEYS = [
    ("energy_mae_meV", "E MAE [meV/molecule]"), ("energy_rmse_meV", "E RMSE [meV/molecule]"),
    ("energy_mae_meV_per_atom", "E MAE [meV/atom]"), ("energy_rmse_meV_per_atom", "E RMSE [meV/atom]"),
    ("forces_mae_meV_per_A", "F MAE [meV/Å]"), ("forces_rmse_meV_per_A", "F RMSE [meV/Å]"),
]


def reference(path: Path) -> Dict[str, np.ndarray]:
    """Reference energies [n], forces [n, atoms, 3] and atom counts of a test file."""
    import ase.io

    energies, forces, counts = [], [], []
    for atoms in ase.io.read(path, ":"):
        results = atoms.calc.results if atoms.calc is not None else {}
        energies.append(results.get("energy", atoms.info.get("energy")))
        forces.append(np.asarray(results.get("forces", atoms.arrays.get("forces"))))
        counts.append(len(atoms))
    return {"energy": np.array(energies, dtype=float), "forces": np.array(forces, dtype=float),
            "atoms": np.array(counts)}


def errors(prediction: Path, ref: Dict[str, np.ndarray]) -> Dict:
    with np.load(prediction) as p:
        de = p["energy"] - ref["energy"]
        df = p["forces"] - ref["forces"]
    per_atom = de / ref["atoms"]
    values = {
        "energy_mae_meV": np.mean(np.abs(de)), "energy_rmse_meV": np.sqrt(np.mean(de**2)),
        "energy_mae_meV_per_atom": np.mean(np.abs(per_atom)), "energy_rmse_meV_per_atom": np.sqrt(np.mean(per_atom**2)),
        "forces_mae_meV_per_A": np.mean(np.abs(df)), "forces_rmse_meV_per_A": np.sqrt(np.mean(df**2)),
    }
    # the signed mean: how much of the energy error is one constant offset
    values["energy_mean_error_meV_per_atom"] = np.mean(per_atom)
    return {k: round(1000.0 * float(v), 4) for k, v in values.items()} | {"structures": int(len(de))}


def at_minutes(rows: List[Dict], minutes: float, key: str = "valid_force_rmse", clock: str = "cpu_s") -> Optional[float]:
    """``key`` of the last row within ``minutes`` on ``clock`` (None if none)."""
    done = [r for r in rows if r.get(clock) is not None and r[clock] <= 60.0 * minutes + 1e-9]
    return done[-1][key] if done else None


def curve_table(histories: Dict[str, List[Dict]], minutes: float) -> List[Dict]:
    """Both validation errors at fixed CPU minutes, up to the last epoch of either model."""
    last = max([r["cpu_s"] / 60.0 for rows in histories.values() for r in rows if r.get("cpu_s") is not None]
               + [minutes])
    marks = [t for t in (0.5, 1, 2, 5, 10, 20, 40, 80) if t < last]
    marks.append(round(last, 2))
    table = []
    for t in marks:
        row = {"cpu_minutes": t}
        for name, rows in histories.items():
            f = at_minutes(rows, t)
            e = at_minutes(rows, t, "valid_energy_rmse_per_atom")
            row[f"{name}_force_rmse_meV_per_A"] = None if f is None else round(1000 * f, 2)
            row[f"{name}_energy_rmse_meV_per_atom"] = None if e is None else round(1000 * e, 3)
        table.append(row)
    return table


def plot(histories: Dict[str, List[Dict]], path: Path, minutes: float, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.3), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2)
    colours = {"mace": "C3", "race": "C0"}
    right = minutes
    for name, rows in histories.items():
        rows = [r for r in rows if r.get("cpu_s") is not None]
        if not rows:
            continue
        t = np.array([r["cpu_s"] for r in rows]) / 60.0
        right = max(right, float(t.max()))
        axes[0].plot(t, [1000 * r["valid_force_rmse"] for r in rows], "-o", markersize=2.5, color=colours[name],
                     label=MODELS[name])
        axes[1].plot(t, [1000 * r["valid_energy_rmse_per_atom"] for r in rows], "-o", markersize=2.5,
                     color=colours[name], label=MODELS[name])
    for axis, ylabel in zip(axes, ("validation force RMSE [meV/Å]", "validation energy RMSE [meV/atom]")):
        axis.set_yscale("log")
        axis.set_xlabel("CPU minutes of the training process (setup included)")
        axis.set_ylabel(ylabel)
        axis.set_xlim(0, right * 1.03)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    axes[0].set_title("forces, 50 validation structures")
    axes[1].set_title(title)
    figure.savefig(path, dpi=120)


def _f(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"


def _ratio(a, b) -> Optional[float]:
    return None if a is None or b in (None, 0) else round(a / b, 3)


def comparisons(results: Dict) -> Dict:
    """RACE / MACE for every test error and for the time per call (below 1: RACE better / faster)."""
    out = {"test": {}, "speed": {}}
    test = results.get("test", {})
    for set_name in test.get("race", {}):
        if set_name in test.get("mace", {}):
            out["test"][set_name] = {k: _ratio(test["race"][set_name][k], test["mace"][set_name][k])
                                     for k, _ in ERROR_KEYS}
    speed = results.get("speed", {})
    for name in speed.get("race", {}):
        if name in speed.get("mace", {}):
            out["speed"][name] = {k: _ratio(speed["race"][name][k], speed["mace"][name][k])
                                  for k in ("median_wall_s", "median_cpu_s")}
    return out


def write_markdown(results: Dict, path: Path) -> None:
    m, b = results["machine"], results["budget"]
    env = results.get("mace_env", {})
    lines = [
        "# Accuracy and speed on acetylacetone: RACE (bayesrace) vs MACE, trained side by side",
        "", "Produced by (from the repository root, bayesrace venv active):", "", "```", results["command"], "```", "",
        f"Date {results['date']}; commit {results['git_commit']}; installed bayesrace files sha256 "
        f"{results['installed_bayesrace_sha']}.", "",
        "## Setup", "",
        f"- Data: `../shared/data/acac/train_300K.xyz`, {results['data']['n_train']} training / "
        f"{results['data']['n_valid']} validation structures (bayesrace's split, seed {results['seed']}, written to "
        "train.xyz / valid.xyz in the run directory; both models train on these files); reference energies of the "
        "isolated atoms (`isolated_atoms.xyz`) for both (MACE `--E0s`, bayesrace `reference_energies`). Tests: "
        "`test_MD_300K.xyz`, `test_MD_600K.xyz`.",
        f"- Budget: **{b['minutes']} min wall clock of training per model**, both processes started together, one "
        "core and one torch thread each. bayesrace checks its budget after each epoch; MACE (no wall-clock option) "
        "is stopped by this script a few seconds after its first epoch that ends past the budget (budget counted "
        f"from its 'Started training' line), at the latest {b['mace_grace_minutes']} min past the budget. "
        "Each model keeps its weights of the best validation loss (EMA weights for both).",
        f"- MACE: mace-torch {env.get('versions', {}).get('mace-torch')} in its own venv "
        f"(`{results['mace_venv']}`, torch {env.get('versions', {}).get('torch')}, e3nn "
        f"{env.get('versions', {}).get('e3nn')}; "
        + ("reused" if env.get("reused") else f"created in {env.get('created_s')} s") + "). Options: `"
        + " ".join(f"--{k}" if v is True else f"--{k} {v}" for k, v in results["mace_settings"].items())
        + (" " + " ".join(results["mace_extra"]) if results.get("mace_extra") else "") + "`.",
        f"- RACE: `bayesrace train` with preset `{b['preset']}` ({results['race_model_config']}), float64, "
        f"one member, MSE loss (λ_E {results['race_config']['loss']['energy_weight']}, λ_F "
        f"{results['race_config']['loss']['force_weight']}), AdamW lr {results['race_config']['training']['lr']}, "
        "batch 8, " + (
            f"lr constant, then a half cosine to 1e-5 over the last "
            f"{results['race_config']['training'].get('decay_fraction', 0.25):g} of the budget (`schedule: cosine`)"
            if results['race_config']['training'].get('schedule') == "cosine" else "ReduceLROnPlateau(0.5, 5)")
        + ", EMA 0.99, as bench/accuracy.py's single model otherwise.",
        "", "## Machine and load", "",
        f"- {m['cpu']}, {m['cores']} cores (shared), torch {m['torch']}, Python {m['python']}.",
        f"- Load averages before: {results['load']['before']}; after: {results['load'].get('after')}.",
    ]
    training = results.get("training", {})
    for name in ("mace", "race"):
        t = training.get(name)
        if t:
            lines.append(f"- {MODELS[name]} training process: {t['wall_s']} s wall, {t['cpu_s']} CPU s "
                         f"(CPU/wall {t['cpu_per_wall']}), {t['epochs']} epochs, exit {t['returncode']}"
                         + (" (stopped by the monitor)" if t["stopped_by_monitor"] else "") + ".")
    clock = results.get("training_clock", {})
    if clock.get("mace_training_minutes") is not None:
        lines.append(f"- Training time: MACE {clock['mace_training_minutes']} min from its 'Started training' line "
                     f"(after {clock['mace_training_started_after_s']} s of setup); RACE "
                     f"{clock.get('race_training_minutes')} min by its own clock (last epoch).")
    if results.get("mace_finish", {}).get("checkpoint_epoch"):
        lines.append(f"- MACE model: its checkpoint after epoch {results['mace_finish']['checkpoint_epoch']} "
                     "(the best validation loss so far).")
    lines += ["", "## Test errors", "",
              "| set | model | " + " | ".join(label for _, label in ERROR_KEYS) + " |",
              "|---|---|" + "---:|" * len(ERROR_KEYS)]
    ratios = results.get("ratios", {})
    for set_name in results.get("test_sets", []):
        for name in ("mace", "race"):
            e = results.get("test", {}).get(name, {}).get(set_name)
            if e:
                lines.append(f"| {set_name} | {MODELS[name]} | " + " | ".join(_f(e[k]) for k, _ in ERROR_KEYS) + " |")
        r = ratios.get("test", {}).get(set_name)
        if r:
            lines.append(f"| {set_name} | **RACE / MACE** | " + " | ".join(_f(r[k]) for k, _ in ERROR_KEYS) + " |")
    lines += ["", "Energies per molecule and per atom; forces per Cartesian component."]
    for name in ("mace", "race"):
        for set_name, e in results.get("test", {}).get(name, {}).items():
            bias = e.get("energy_mean_error_meV_per_atom")
            if bias is not None and abs(bias) > 0.8 * e["energy_rmse_meV_per_atom"] and abs(bias) > 1.0:
                lines.append(f"{MODELS[name]}'s energy error on {set_name} is mostly one constant offset (mean "
                             f"error {bias:.4g} meV/atom of RMSE {e['energy_rmse_meV_per_atom']:.4g})"
                             + (": MACE's model has no mean energy shift when E0s are given, so its readouts must "
                                "learn the ≈ −4.9 eV/atom atomisation energy of acac with energy weight "
                                f"{results['mace_settings']['energy_weight']} against forces "
                                f"{results['mace_settings']['forces_weight']}." if name == "mace" else "."))
    lines += ["",
              "## Speed (ASE calculator, energy + forces, one thread, float64)", "",
              "| structure | model | atoms | median s/call | atom-steps/s | median CPU s/call | atom-steps/CPU-s |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for name in results.get("speed_structures", []):
        for model in ("mace", "race"):
            s = results.get("speed", {}).get(model, {}).get(name)
            if s:
                lines.append(f"| {name} | {MODELS[model]} | {s['atoms']} | {s['median_wall_s']:.4g} | "
                             f"{s['atom_steps_per_s']:.4g} | {s['median_cpu_s']:.4g} | {s['atom_steps_per_cpu_s']:.4g} |")
        r = ratios.get("speed", {}).get(name)
        if r:
            lines.append(f"| {name} | **RACE / MACE** (time per call) | | {_f(r['median_wall_s'])} | | "
                         f"{_f(r['median_cpu_s'])} | |")
    lines += ["", "The 960-atom box is `../shared/data/bench/acac_64_box.xyz` in a 30 Å cubic periodic cell; "
              "`acac_1.xyz` is one molecule without a cell. Each timing: one warm-up call, then the median of the "
              "timed calls (neighbour list rebuilt every call); the models are timed one after the other, one "
              "process and one thread each, on a machine shared with other jobs: the CPU seconds per call "
              "(time.process_time) are the steadier measure when the load is high. MACE's calculator "
              "computes the stress on every call; bayesrace's in periodic cells.",
              "", "## Learning curves", "", "![learning curve](learning_curve.png)", "",
              "Validation errors after each epoch, against CPU minutes of each training process (sampled every "
              "2 s, so within one sample of the epoch's end).", "",
              "| CPU min | MACE F RMSE [meV/Å] | RACE F RMSE [meV/Å] | MACE E RMSE [meV/atom] | RACE E RMSE [meV/atom] |",
              "|---:|---:|---:|---:|---:|"]
    for row in results.get("learning_curve", []):
        lines.append(f"| {row['cpu_minutes']} | {_f(row.get('mace_force_rmse_meV_per_A'))} | "
                     f"{_f(row.get('race_force_rmse_meV_per_A'))} | {_f(row.get('mace_energy_rmse_meV_per_atom'))} | "
                     f"{_f(row.get('race_energy_rmse_meV_per_atom'))} |")
    if results.get("problems"):
        lines += ["", "## Problems", ""] + [f"- {p}" for p in results["problems"]]
    path.write_text("\n".join(lines) + "\n")
