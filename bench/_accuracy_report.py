"""The report of the acac accuracy benchmark (bench/accuracy.py): results.md, with the
comparison against MACE's published errors written out in words."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict

from _accuracy_history import MACE_REFERENCE, N_ATOMS, TEST_SETS


def _f(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, (list, tuple)):
        return "–".join(_f(v, digits) for v in value)
    return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"


def write_markdown(results: Dict, path: Path) -> None:
    b = results["budget"]
    m = results["machine"]
    lines = [
        "# Accuracy on acetylacetone (acac): single RACE model vs deep ensemble, CPU budget",
        "",
        "Produced by (from the repository root, venv active):",
        "",
        "```",
        results["command"],
        "```",
        "",
        f"Date {results['date']}; commit {results['git_commit']}; installed bayesrace files sha256 "
        f"{results['installed_bayesrace_sha']['start']} (the venv's non-editable install is what ran).",
        "",
        "## Setup",
        "",
        f"- Data: `../shared/data/acac/train_300K.xyz`, {results['data']['n_train']} training / "
        f"{results['data']['n_valid']} validation structures (random split, seed {results['seed']}); "
        "reference energies of the isolated atoms (`isolated_atoms.xyz`). Tests: `test_MD_300K.xyz` "
        "(650, in distribution) and `test_MD_600K.xyz` (650, hotter: partly out of distribution).",
        f"- Model: preset `{b['preset']}` ({results['model_config']}), float64.",
        f"- Budget: **{b['minutes_per_member']} min wall clock per member** (training loop only; the check "
        "runs after each epoch, so a member overshoots by up to one epoch), one torch thread per process. "
        f"Single model: 1 process. Ensemble: {b['members']} members on `mpirun -np {b['ranks']}` "
        f"({math.ceil(b['members'] / b['ranks'])} member(s) per rank, one after another).",
        f"- Optimiser: AdamW, lr {b['lr']}, batch 8, ReduceLROnPlateau(factor 0.5, patience 5 epochs, "
        "min 1e-5) on the validation loss, EMA 0.99 (the EMA weights are validated and kept), gradient "
        "clipping 10, early stopping off (the budget stops training); the kept weights are those of the "
        "best validation loss.",
        f"- Loss: single model pure MSE (λ_E = λ_F = 1, energy per atom); " + (
            "ensemble members NLL_JEF (invariant Cholesky covariance) with `loss.means: mse` from the first "
            "epoch: the energies and forces are trained by the MSE term, the NLL trains the variance heads on "
            "the detached residuals." if b.get("ensemble_means") == "mse" else
            "ensemble members MSE alone for the first 80 % of their budget, then (`loss.means: frozen`) the "
            "network frozen but for the readouts' last linear maps and the log-variance offsets (fitted to the "
            "training residuals first), which learn NLL_JEF on the fixed means' residuals: each member's means "
            "are exactly an MSE model's." if b.get("ensemble_means") == "frozen" else
            f"ensemble members MSE for {b['ensemble_mse_warmup_epochs']} epochs ({b['ensemble_warmup_basis']}), "
            "then NLL_JEF (invariant Cholesky covariance). Switching the loss restarts the best-weights record, "
            "so each member's kept weights are its best under NLL_JEF."),
        "",
        "## Machine and load",
        "",
        f"- {m['cpu']}, {m['cores']} cores (shared with other engineers' jobs), torch {m['torch']}, "
        f"Python {m['python']}. 1-min load average at start: {' '.join(m['load_at_start'])}.",
    ]
    for name in ("single", "ensemble"):
        run = results["runs"].get(name)
        if not run:
            continue
        load = run["training"].get("load", {})
        lines.append(
            f"- {name}: wall {run['training']['wall_s'] / 60:.1f} min, CPU {run['training']['cpu_s'] / 60:.1f} min "
            f"on {run['training']['ranks']} rank(s) (≈{run['training']['cpu_s'] / 60 / len(run['history']):.1f} "
            f"CPU-min per member, data preparation included) → {run['training']['cpu_per_rank_per_wall']} CPU-s per rank "
            f"per wall-s (1.0 = a free core per rank); 1-min load during training mean {load.get('load1_mean')} "
            f"(min {load.get('load1_min')}, max {load.get('load1_max')}); epochs per member "
            f"{[h['epochs'] for h in run['history']]}, s/epoch {[h.get('s_per_epoch') for h in run['history']]}."
        )
    if results.get("load_note"):
        lines.append(f"- **Note:** {results['load_note']}")
    for note in results.get("notes", []):
        lines.append(f"- **Note:** {note}")
    lines += [
        "",
        "## Test errors",
        "",
        "Energies: total per molecule (meV) and per atom (meV/atom, 15 atoms); forces per Cartesian "
        "component. \"members (mean)\" is the average error of the ensemble's members taken one at a time "
        "(what ensembling the members gains is the difference to the ensemble row).",
        "",
        "| set | model | E MAE [meV] | E RMSE [meV] | E MAE [meV/atom] | E RMSE [meV/atom] | F MAE [meV/Å] "
        "| F RMSE [meV/Å] |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in TEST_SETS:
        for label, key in (("single (MSE)", "single"), (f"ensemble of {b['members']} (NLL_JEF)", "ensemble")):
            run = results["runs"].get(key)
            if not run or "test" not in run:
                continue
            h = run["test"][name]["errors"]
            lines.append(
                f"| {name} | {label} | {_f(h['energy_mae_meV'])} | {_f(h['energy_rmse_meV'])} | "
                f"{_f(h['energy_mae_meV_per_atom'])} | {_f(h['energy_rmse_meV_per_atom'])} | "
                f"{_f(h['forces_mae_meV_per_A'])} | {_f(h['forces_rmse_meV_per_A'])} |"
            )
            if key == "ensemble":
                mm = run["test"][name]["members_mean"]
                lines.append(
                    f"| {name} | members (mean of {b['members']}) | {_f(mm['energy_mae_meV'])} | "
                    f"{_f(mm['energy_rmse_meV'])} | – | {_f(mm['energy_rmse_meV_per_atom'])} | "
                    f"{_f(mm['forces_mae_meV_per_A'])} | {_f(mm['forces_rmse_meV_per_A'])} |"
                )
        ref = MACE_REFERENCE.get(name)
        if ref:
            lines.append(
                f"| {name} | MACE, published (long GPU training) | – | ≈{ref['energy_rmse_meV']:g} | – | "
                f"≈{ref['energy_rmse_meV'] / N_ATOMS:.3g} | – | ≈{ref['forces_rmse_meV_per_A']:g} |"
            )
    ens = results["runs"].get("ensemble")
    if ens and "test" in ens:
        lines += [
            "",
            "## Ensemble uncertainty on the test sets",
            "",
            "Mean predicted σ (energy σ per molecule; force σ per component, sqrt(tr Σ_i / 3)), Spearman rank "
            "correlation of |error| with σ (per structure for energies, per atom for forces), and the "
            "fraction of errors inside the central 95 % interval (uncalibrated).",
            "",
            "| set | σ_E [meV] | σ_E epi [meV] | σ_F [meV/Å] | σ_F epi [meV/Å] | σ_F ale [meV/Å] "
            "| ρ_E | ρ_F | cov95 E | cov95 F |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name in TEST_SETS:
            u = ens["test"][name]["uncertainty"]
            lines.append(
                f"| {name} | {_f(u['energy_sigma_mean_meV'])} | {_f(u['energy_sigma_epistemic_mean_meV'])} | "
                f"{_f(u['forces_sigma_mean_meV_per_A'])} | {_f(u['forces_sigma_epistemic_mean_meV_per_A'])} | "
                f"{_f(u['forces_sigma_aleatoric_mean_meV_per_A'])} | {_f(u['spearman_energy'], 2)} | "
                f"{_f(u['spearman_forces'], 2)} | {_f(u['energy_coverage_95'], 2)} | "
                f"{_f(u['forces_coverage_95'], 2)} |"
            )
    lines += [
        "",
        "## How the error falls with training time",
        "",
        "Validation RMSE (50 structures, EMA weights) at the last epoch finished by each time; members: mean "
        "(range) over the ensemble's members. Plot: `learning_curve.png` (log y).",
        "",
        "| minutes | single F RMSE [meV/Å] | members F RMSE [meV/Å] | single E RMSE [meV/atom] "
        "| members E RMSE [meV/atom] |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in results["learning_curve"]:
        lines.append(
            f"| {row['minutes']:g} | {_f(row['single_force_rmse_meV_per_A'])} | "
            f"{_f(row['members_force_rmse_meV_per_A_mean'])} ({_f(row['members_force_rmse_meV_per_A_range'])}) | "
            f"{_f(row['single_energy_rmse_meV_per_atom'])} | {_f(row['members_energy_rmse_meV_per_atom_mean'])} |"
        )
    slope = results.get("per_doubling") or {}
    if slope.get("single") is not None or slope.get("members_mean") is not None:
        improving = (slope.get("single") or slope.get("members_mean") or 1.0) < 0.95
        decayed = [
            f"{name} member {i}: {h['final_lr']:g}"
            for name, run in results["runs"].items() for i, h in enumerate(run["history"])
            if h.get("final_lr") is not None and h["final_lr"] < results["budget"]["lr"]
        ]
        lr_text = (
            "the plateau schedule never lowered the learning rate" if not decayed
            else "final learning rates below the initial one: " + ", ".join(decayed)
        )
        lines += [
            "",
            f"Over the last doubling of training time ({results['budget']['minutes_per_member'] / 2:g} → "
            f"{results['budget']['minutes_per_member']:g} min) the validation force RMSE changed by a factor "
            f"{_f(slope.get('single'))} (single) and {_f(slope.get('members_mean'))} (ensemble members, mean): "
            + ("training was still improving when the budget ran out" if improving
               else "training had nearly stopped improving")
            + f" ({lr_text}).",
        ]
    switches = results.get("loss_switch") or []
    if switches:
        lines += [
            "",
            "Switching the ensemble members from MSE to NLL_JEF disturbs the means: validation RMSE right "
            "before the switch → worst of the next 10 epochs → epochs (minutes) until the force RMSE is back "
            "to its pre-switch value:",
            "",
            "| member | switch at [min] | F RMSE before → peak [meV/Å] | E RMSE before → peak [meV/atom] "
            "| recovered after |",
            "|---:|---:|---:|---:|---:|",
        ]
        for member, sw in enumerate(switches):
            if sw is None:
                continue
            lines.append(
                f"| {member} | {sw['switch_minutes']:g} | {sw['force_rmse_before_meV_per_A']:g} → "
                f"{sw['force_rmse_peak_meV_per_A']:g} | {sw['energy_rmse_before_meV_per_atom']:g} → "
                f"{sw['energy_rmse_peak_meV_per_atom']:g} | "
                + ("not within the budget" if sw["epochs_to_recover_force_rmse"] is None else
                   f"{sw['epochs_to_recover_force_rmse']} epochs ({sw['minutes_to_recover_force_rmse']:g} min)")
                + " |"
            )
    lines += ["", "## Comparison with MACE, and what the numbers say", "", results.get("comparison", ""), ""]
    if results.get("problems"):
        lines += ["## Problems seen", ""] + [f"- {p}" for p in results["problems"]] + [""]
    lines += [
        "## Files",
        "",
        "- `results.json`: everything above, per-member histories summaries, load samples.",
        "- `learning_curve.png`.",
        "- `configs/`: the two training configs (paths relative to that folder; `out` points into the "
        "git-ignored run directory).",
        f"- Run directories (checkpoints, posteriors, logs, prediction arrays): `{results['runs_dir']}` "
        "(not part of the results); each run's `report/` holds the `evaluate_sets` report: `report.md`, "
        "`metrics.json`, `parity_energy.png`, `parity_forces.png`, `error_vs_sigma.png`, "
        "`calibration_curves.png`, `ood_scores.png`, `ood_roc.png`.",
        "",
    ]
    path.write_text("\n".join(lines))


def comparison_text(results: Dict) -> str:
    parts = []
    for key, label in (("single", "the single model"), ("ensemble", "the ensemble")):
        run = results["runs"].get(key)
        if not run or "test" not in run:
            continue
        h = run["test"]["test_MD_300K"]["errors"]
        parts.append(
            f"At 300 K {label} reaches E RMSE {h['energy_rmse_meV']:.3g} meV and F RMSE "
            f"{h['forces_rmse_meV_per_A']:.3g} meV/Å, i.e. {h['energy_rmse_meV'] / 1.0:.1f}× and "
            f"{h['forces_rmse_meV_per_A'] / 5.0:.1f}× MACE's ≈1 meV / ≈5 meV/Å."
        )
    parts.append(
        f"MACE's numbers come from long GPU training of a larger model; here each member had "
        f"{results['budget']['minutes_per_member']} min on one shared CPU core "
        f"(preset `{results['budget']['preset']}`)."
    )
    slope = (results.get("per_doubling") or {}).get("single")
    if slope:
        doublings = math.log(5.0 / results["learning_curve"][-1]["single_force_rmse_meV_per_A"]) / math.log(slope) \
            if slope < 1 and results["learning_curve"][-1]["single_force_rmse_meV_per_A"] else None
        if doublings:
            parts.append(
                f"At the last doubling's rate (×{slope:g} per doubling of time) the single model would need about "
                f"{doublings:.0f} more doublings of training time to reach 5 meV/Å: a power law extrapolated that "
                "far means little (learning-rate decay would speed it up, model capacity would stop it), but it "
                "says the gap is not closed by minutes more of CPU."
            )
    last = results["learning_curve"][-1]
    ens = (results["runs"].get("ensemble") or {}).get("test", {})
    single_300 = (results["runs"].get("single") or {}).get("test", {}).get("test_MD_300K", {}).get("errors")
    if "test_MD_300K" in ens and single_300:
        e300 = ens["test_MD_300K"]
        f_ens, f_mem = e300["errors"]["forces_rmse_meV_per_A"], e300["members_mean"]["forces_rmse_meV_per_A"]
        f_single = single_300["forces_rmse_meV_per_A"]
        verdict = (f"the ensemble is {'better' if f_ens <= f_single else 'worse'} than the single MSE model "
                   f"({f_ens:.3g} vs {f_single:.3g} meV/Å)")
        if f_mem > f_single and results["budget"].get("ensemble_means") in (None, "nll"):
            verdict += (f"; its members are worse than the single model ({f_mem:.3g} meV/Å on average) with the "
                        "same per-member budget: they optimise NLL_JEF rather than the squared error, and lost "
                        "part of their budget recovering from the loss switch (table above)")
        parts.append(
            f"Ensembling: at 300 K the ensemble's mean prediction has F RMSE {f_ens:.3g} meV/Å against "
            f"{f_mem:.3g} for its members on average ({100 * (f_ens / f_mem - 1):+.0f} %); {verdict}."
        )
        u = e300.get("uncertainty") or {}
        if u.get("forces_sigma_mean_meV_per_A") and u.get("energy_sigma_mean_meV"):
            text = (
                f"Uncertainty at 300 K: mean σ_F {u['forces_sigma_mean_meV_per_A']:.3g} meV/Å against an F RMSE of "
                f"{f_ens:.3g} (ratio {u['forces_sigma_mean_meV_per_A'] / f_ens:.2f}); mean σ_E "
                f"{u['energy_sigma_mean_meV']:.3g} meV against an E RMSE of {e300['errors']['energy_rmse_meV']:.3g} "
                f"(ratio {u['energy_sigma_mean_meV'] / e300['errors']['energy_rmse_meV']:.1f}: the energy variance "
                "head is far from calibrated"
                + (f", and its Spearman ρ_E is only {u['spearman_energy']:.2f}" if u.get("spearman_energy") is not None
                   else "")
                + ")."
            )
            e600 = ens.get("test_MD_600K")
            if e600 and e600.get("uncertainty"):
                u6 = e600["uncertainty"]
                text += (
                    f" From 300 K to 600 K the epistemic σ_F grows ×"
                    f"{u6['forces_sigma_epistemic_mean_meV_per_A'] / u['forces_sigma_epistemic_mean_meV_per_A']:.2f} "
                    f"while the ensemble's F RMSE grows ×{e600['errors']['forces_rmse_meV_per_A'] / f_ens:.2f}; "
                    f"the aleatoric σ_F hardly moves (×"
                    f"{u6['forces_sigma_aleatoric_mean_meV_per_A'] / u['forces_sigma_aleatoric_mean_meV_per_A']:.2f})."
                )
            parts.append(text)
    single_test = single_300
    further = single_test and single_test["energy_rmse_meV"] / 1.0 > single_test["forces_rmse_meV_per_A"] / 5.0
    if further and last.get("single_force_rmse_meV_per_A") and last.get("single_energy_rmse_meV_per_atom"):
        e_term = (last["single_energy_rmse_meV_per_atom"] / 1000.0) ** 2
        f_term = (last["single_force_rmse_meV_per_A"] / 1000.0) ** 2
        parts.append(
            f"Energies are further from MACE than forces. With λ_E = λ_F = 1 and the energy term per atom, the "
            f"energy part of the MSE at the end of training is ≈{e_term:.1e} eV² against ≈{f_term:.1e} (eV/Å)² for "
            f"forces ({f_term / e_term:.0f}×), so energies are learned almost only through the forces; a larger "
            "energy weight late in training (as MACE's recipes do) is the obvious next experiment."
        )
    return "\n\n".join(parts)
