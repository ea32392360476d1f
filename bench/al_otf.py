#!/usr/bin/env python
"""On-the-fly active learning demonstration (issue #5): a PSB3 model trained only on 300 K data
runs hot Langevin MD in LAMMPS; the MD halts where the calibrated max force σ exceeds the
threshold, the most informative recent frames are labelled by GFN2-xTB (tblite, charge +1),
the ensemble is retrained (warm start) and recalibrated, and the MD goes on from the halt.

Steps (runs in ``--runs``, default bench/runs/al_otf; report in ``--out``, default
bench/results/al_otf):

1. data: the 300 K frames (``atoms.info["temperature_K"] == 300``) of
   bench/runs/uq/data_psb3/train.xyz and valid.xyz (made by ``bayesrace.data.generate_psb3(seed=0)``);
   the MD starts from the first 300 K training frame (positions only).
2. round-0 posterior: ``bayesrace train`` on the 300 K training frames (``--base-epochs``),
   ensemble of ``--members`` NLL_JEF members, validated on the 300 K validation frames.
3. ``bayesrace al`` with ``mode: on_the_fly``: ``posterior`` = step 2, every round calibrated
   (isotonic) on the 300 K validation frames, threshold = the deployable's own
   (1.5 × q_0.99 of the validation max calibrated σ) of round 0, kept fixed; after a halt the
   MD restarts from the last frame below τ; retraining
   warm-started for ``--round-epochs`` epochs on the 300 K set plus every label acquired.
4. the force errors of round 0 and of the last round on test_ood_hot.xyz (1000/1500 K) and
   test_id.xyz, each posterior with its own calibration (``predict_frames`` + ``set_metrics``);
5. validation: fresh full-length MD runs (``--validation-seeds``) from the start structure with
   the round-0 and the final deployable at the loop's τ, without labelling: does each halt?

Outputs: al_otf.yaml (the config), otf_log.json, otf_sigma.png, results.json, results.md.

    python bench/al_otf.py                      # the demonstration (~8 min on 2 cores)
    python bench/al_otf.py --report-only        # rewrite the report from an existing run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BENCH_DIR, PSB3_DIR, REPO, cli_command, command_line, psb3_data, write_config  # noqa: E402

TEMPERATURE_TAG = "temperature_K"  # atoms.info of every _psb3 MD frame


def write_300k_data(data_dir: Path) -> dict:
    """The 300 K frames of train/valid and the MD start structure; returns the paths and counts."""
    import ase
    import ase.io

    psb3_data(PSB3_DIR)
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in ("train", "valid"):
        frames = [a for a in ase.io.read(PSB3_DIR / f"{name}.xyz", ":") if a.info.get(TEMPERATURE_TAG) == 300.0]
        if not frames:
            raise RuntimeError(f"{PSB3_DIR / name}.xyz has no frame with {TEMPERATURE_TAG}=300")
        paths[name] = data_dir / f"{name}_300K.xyz"
        ase.io.write(paths[name], frames)
        paths[f"n_{name}"] = len(frames)
        if name == "train":
            first = frames[0]
            paths["start"] = data_dir / "start.xyz"
            ase.io.write(paths["start"], ase.Atoms(numbers=first.numbers, positions=first.positions))
    return paths


def training_section(args, data: dict, epochs: int, lr: float) -> dict:
    loss = {"kind": "nll_jef", "mse_warmup_epochs": args.warmup, **({"means": args.means} if args.means else {}),
            **({"refit_energy_zero": True} if args.refit_energy_zero else {}),
            **({"force_huber": args.force_huber} if args.force_huber else {})}
    return {
        "seed": args.seed,
        "data": {"valid": str(data["valid"]), "reference_energies": "isolated",
                 "isolated_atoms": str(PSB3_DIR / "isolated_atoms.xyz")},
        "model": {"preset": args.preset},
        "loss": loss,
        "posterior": {"kind": "ensemble"},
        "ensemble": {"members": args.members},
        "training": {"batch_size": 8, "lr": lr, "max_epochs": epochs,
                     "early_stopping_patience": 10 * epochs, "lr_patience": 5, "threads": 1},
    }


def run_logged(command, log_path: Path) -> float:
    started = time.perf_counter()
    with open(log_path, "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    return time.perf_counter() - started


def train_base(args, data: dict, runs: Path) -> tuple:
    """Round-0 posterior trained on the 300 K frames only; returns (path, seconds)."""
    base = runs / "base_300K"
    posterior = base / "posterior.pt"
    if not posterior.is_file() and args.base_from is not None:
        # the same base for another temperature or setting: copied, not trained again
        source = args.base_from.resolve()
        if not (source / "base_300K" / "posterior.pt").is_file():
            raise SystemExit(f"--base-from {source}: no base_300K/posterior.pt there")
        shutil.copytree(source / "base_300K", base)
        shutil.copyfile(source / "base_time.json", runs / "base_time.json")
    if posterior.is_file():
        return posterior, json.loads((runs / "base_time.json").read_text())["seconds"]
    config = training_section(args, data, args.base_epochs, args.lr)
    config["out"] = str(base)
    config["data"]["train"] = str(data["train"])
    config_path = write_config(config, runs / "base_300K.yaml")
    seconds = run_logged(cli_command("train", config_path, quiet=False), runs / "base_300K.log")
    (runs / "base_time.json").write_text(json.dumps({"seconds": seconds}))
    return posterior, seconds


def al_config(args, data: dict, posterior: Path, runs: Path) -> dict:
    config = {
        "mode": "on_the_fly", "out": str(runs / "otf"), "initial": str(data["train"]), "posterior": str(posterior),
        "valid": str(data["valid"]), "calibration_method": args.calibration,
        # calibration: round 0's own (1.5 × q0.99 of the 300 K validation max calibrated σ), kept fixed;
        # control: each round's own, margin × the largest σ of an unhalted control run at 300 K
        "threshold": None,
        "threshold_from": args.threshold_from,
        "candidate_fraction": 0.5,
        "strategy": "bald_f",
        "batch_size": args.batch_size,
        "n_rounds": args.rounds,
        "warm_start": not args.fresh_rounds,
        "acquired_repeats": args.acquired_repeats,
        "label_halting_frame": args.label_halting_frame,
        "training": training_section(args, data, args.round_epochs, args.round_lr or args.lr),
        "oracle": {"kind": "tblite", "method": "GFN2-xTB", "charge": 1.0},
        "md": {"structure": str(data["start"]), "box": 40.0, "temperature": args.temperature,
               "thermostat": "langevin", "damping": 0.1, "timestep": 0.0005, "n_steps": args.steps,
               "dump_every": args.dump_every, "seed": 1 + args.seed, "ranks": 1, "restart_from": "last_trusted",
               "halt_on": args.halt_on, "look_ahead": args.look_ahead, "look_ahead_limit": args.look_ahead_limit,
               "control_temperature": args.control_temperature, "control_steps": args.control_steps,
               "control_margin": args.control_margin, "control_rule": args.control_rule,
               "control_false_halts": args.control_false_halts},
    }
    return config


def evaluate_rounds(otf_dir: Path, round_indices, sets: dict) -> dict:
    """Force/energy errors of each round's calibrated posterior on the named sets."""
    import torch

    from bayesrace.data import read_frames
    from bayesrace.uq import predict_frames, set_metrics
    from bayesrace.bayes import load_posterior

    frames = {name: read_frames(path) for name, path in sets.items()}
    results = {}
    for r in round_indices:
        path = otf_dir / f"round_{r}" / "posterior_calibrated.pt"
        posterior = load_posterior(path, dtype=torch.float64)
        posterior.eval()
        results[r] = {name: set_metrics(predict_frames(posterior, f, dtype=torch.float64)) for name, f in frames.items()}
    return results


def _fresh_md(args, data: dict, n_steps: int):
    """The MD section of the runs after the loop (from the start structure, the loop's
    temperature and σ) and the start structure."""
    import ase.io

    from bayesrace.active import MDSection

    md = MDSection(structure=str(data["start"]), box=40.0, temperature=args.temperature, thermostat="langevin",
                   damping=0.1, timestep=0.0005, n_steps=n_steps, dump_every=args.dump_every, halt_on=args.halt_on)
    return md, ase.io.read(data["start"])


def _first_and_last_models(otf_dir: Path, log: dict):
    """(round, deployable, type names) of round 0 and the last round."""
    from bayesrace.export import read_metadata

    for r in sorted({log["rounds"][0]["round"], log["rounds"][-1]["round"]}):
        model = otf_dir / f"round_{r}" / "model.pt"
        yield r, model, list(read_metadata(model)["type_names"])


def _round_threshold(log: dict, round_index: int) -> float:
    """The τ round ``round_index`` halted at (round 0's for every round unless --threshold-from control)."""
    return next(r["threshold"] for r in log["rounds"] if r["round"] == round_index)


def validation_runs(otf_dir: Path, log: dict, args, data: dict, runs: Path) -> list:
    """Fresh MD runs of the full length from the start structure (new velocities and Langevin
    seeds) with the round-0 and the final deployable at the loop's threshold: does each halt?"""
    from bayesrace.lammps import lammps_data_text, run_md_segment

    md, start = _fresh_md(args, data, args.steps)
    results = []
    for r, model, type_names in _first_and_last_models(otf_dir, log):
        threshold = _round_threshold(log, r)
        for seed in args.validation_seeds:
            segment = run_md_segment(model, type_names, md, threshold, runs / "validation" / f"round{r}_seed{seed}",
                                     lammps_data_text(start, type_names, md.box), 0, first_segment=True,
                                     molecule=True, segment_seed=seed)
            results.append(dict(round=r, seed=seed, halted=segment["halted"], step_reached=segment["step_reached"],
                                max_sigma=segment["max_sigma"], threshold=threshold))
    return results


def free_runs(otf_dir: Path, log: dict, args, data: dict, runs: Path) -> list:
    """MD that does not halt (``--free-steps`` from the start structure, the first validation
    seed) with the round-0 and the final deployable: the fraction of the dumped frames whose
    max σ exceeds the loop's τ, and the first such step. A run of S steps passes only if no one
    of its S / dump_every checks does; this fraction says how far a model is from that."""
    import numpy as np

    from bayesrace.lammps import frame_max_sigma, halting_column, lammps_data_text, read_dump, run_md_segment
    from bayesrace.lammps._segment import DUMP_FILE

    md, start = _fresh_md(args, data, args.free_steps)
    round0 = _round_threshold(log, log["rounds"][0]["round"])
    results = []
    for r, model, type_names in _first_and_last_models(otf_dir, log):
        threshold = _round_threshold(log, r)
        seed = args.validation_seeds[0]
        workdir = runs / "free" / f"round{r}"
        failure = None
        try:
            run_md_segment(model, type_names, md, 1e9, workdir, lammps_data_text(start, type_names, md.box), 0,
                           first_segment=True, molecule=True, segment_seed=seed)
        except Exception as error:  # e.g. LAMMPS "Lost atoms": the model let the molecule fly apart
            text = str(error)
            failure = text[text.index("ERROR"):].splitlines()[0] if "ERROR" in text else text.splitlines()[-1]
        frames = [f for f in read_dump(workdir / DUMP_FILE) if f["step"] > 0]
        sigmas = np.array([frame_max_sigma(f, halting_column(md)) for f in frames])
        over = np.flatnonzero(sigmas > threshold)
        results.append(dict(round=r, seed=seed, steps=frames[-1]["step"] if frames else 0, failure=failure,
                            checks=len(sigmas),
                            fraction_over=float(np.mean(sigmas > threshold)) if len(sigmas) else None,
                            first_over=int(frames[over[0]]["step"]) if len(over) else None,
                            median_sigma=float(np.median(sigmas)) if len(sigmas) else None, threshold=threshold,
                            # the same frames against round 0's τ: with --threshold-from control each round has
                            # its own τ, and this tells learning from a looser τ
                            round0_threshold=round0,
                            fraction_over_round0=float(np.mean(sigmas > round0)) if len(sigmas) else None))
    return results


def _sigma_unit(info: dict) -> str:
    """" eV/Å", or "" for the unit-free σ of md.halt_on relative and feature."""
    from bayesrace.active._onthefly import SIGMA_UNITS
    return SIGMA_UNITS[info.get("halt_on", "total")]


def _threshold_text(info: dict) -> str:
    from bayesrace.active._onthefly import SIGMA_NAMES
    halt_on, calibration = info.get("halt_on", "total"), info.get("calibration", "isotonic")
    if info.get("threshold_from") in ("control", "control_first"):
        level, whose = ("the largest" if info.get("control_rule", "largest") == "largest" else f"(extrapolated: `control_rule: run_length`, α = {info['control_false_halts']:g}) the run-length level of",
                        "round 0's, kept for every round" if info["threshold_from"] == "control_first" else "each round's own")
        return (f"Threshold τ: {whose}, {info['control_margin']:g} × {level} the {SIGMA_NAMES[halt_on]} of an "
                f"unhalted {info['control_steps']}-step control run of that round's model at "
                f"{info['control_temperature']:g} K from the start structure (`threshold_from: {info['threshold_from']}`; each "
                f"round's posterior is recalibrated, {calibration}, on the 300 K validation set first).")
    return (f"Threshold τ: round 0's own (1.5 × q0.99 of the max calibrated {SIGMA_NAMES[halt_on]} on the 300 K "
            f"validation set; the MD halts on that σ), kept for every round (each round's posterior is still "
            f"recalibrated, {calibration}, on that set).")


def write_report(out: Path, log: dict, evaluation: dict, info: dict) -> None:
    rounds = log["rounds"]
    unit = f" [{_sigma_unit(info).strip()}]" if _sigma_unit(info) else " (unit-free)"
    lines = ["# On-the-fly active learning: PSB3, 300 K model, hot Langevin MD", ""]
    lines += [f"Command: `{info['command']}`  ", f"Wall time of that invocation before its validation runs: {info['wall_s']:.0f} s (on-the-fly "
              f"loop {info['otf_s']:.0f} s); base training "
              f"{info['base_train_s']:.0f} s (in the first invocation with these --runs; later ones reuse it); "
              f"2 shared CPU cores, torch 1 thread.", ""]
    lines += [f"Initial data: {info['n_train']} train / {info['n_valid']} valid frames at 300 K only "
              f"(`temperature_K` tag of bench/runs/uq/data_psb3/{{train,valid}}.xyz). Model: preset "
              f"`{info['preset']}`, {info['members']} NLL_JEF members (loss.means: {info.get('means') or 'default'}"
              f"{', refit_energy_zero' if info.get('refit_energy_zero') else ''}"
              f"{', force_huber ' + format(info['force_huber'], 'g') + ' eV/Å' if info.get('force_huber') else ''}); "
              f"base training {info['base_epochs']} epochs, every later round {info['round_epochs']} epochs "
              f"{'from a fresh initialisation' if info.get('fresh_rounds') else 'warm-started'} (lr {info.get('round_lr') or info['lr']}, each acquired frame ×{info.get('acquired_repeats', 1)}). "
              f"Oracle: tblite GFN2-xTB, charge +1. "
              f"MD: LAMMPS `pair_style bayesrace`, Langevin {info['temperature']:.0f} K (damping 0.1 ps), 0.5 fs, "
              f"{info['steps']} steps in total, dump/halt check every {info['dump_every']} steps. "
              + _threshold_text(info) + " Labels per halt: "
              f"{info['batch_size']} (bald_f among the segment's dumped frames with max σ > 0.5 τ). After a halt the "
              f"next segment restarts from the last dumped frame with max σ ≤ τ (`md.restart_from: last_trusted`)."
              + (f" Look-ahead: after each halt {info['look_ahead']} more MD steps from the halting frame (stopping "
                 f"at {info.get('look_ahead_limit', 3.0):g} τ); their frames with max σ > 0.5 τ join the candidates "
                 f"(`md.look_ahead`)." if info.get("look_ahead") else "")
              + (" The halting frame is always one of the labels (`label_halting_frame`)."
                 if info.get("label_halting_frame") else ""), ""]
    lines += [f"| round | start step | halt step / completed | restart step | max σ{unit} | threshold τ{unit} | "
              f"control run median / max σ{unit} | "
              "candidates (look-ahead) | labels added | training frames | train s | calib s | export s | control s | MD s | "
              "select s | label s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rounds:
        t = r["time_s"]
        end = f"halt @ {r['step_reached']}" if r["halted"] else f"completed @ {r['step_reached']}"
        restart = r.get("restart_step") if r["halted"] else "–"
        control = (f"{r['control_quantiles'][0]:.4f} / {r['control_max_sigma']:.4f}" if r.get("control_quantiles")
                   else "–")
        lines.append(f"| {r['round']} | {r['start_step']} | {end} | {restart} | {r['max_sigma']:.4f} | {r['threshold']:.4f} | "
                     f"{control} | "
                     f"{r.get('n_candidates', 0)} ({r.get('n_look_ahead_candidates') or 0}) | {r.get('labels_added', 0)} | {r['n_labels']} | {t['train']:.0f} | "
                     f"{t['calibrate']:.0f} | {t['export']:.0f} | {t.get('control', 0):.0f} | {t['md']:.0f} | {t['select']:.0f} | {t['label']:.0f} |")
    lines += ["", "(round 0's train time is the copy of the base posterior; its training is counted above.)", ""]
    if evaluation:
        first, last = min(evaluation), max(evaluation)
        lines += ["Force and energy errors of the calibrated posteriors (each with its own calibration):", "",
                  "| set | round | F MAE [meV/Å] | F RMSE [meV/Å] | E RMSE [meV/atom] | E mean error [meV/atom] | "
                  "mean atomic F σ [meV/Å] | F NLL |",
                  "|---|---|---|---|---|---|---|---|"]
        for name in evaluation[first]:
            for r in sorted({first, last}):
                m = evaluation[r][name]
                sigma = m.get("forces_sigma_mean_eV_per_A", float("nan"))
                lines.append(f"| {name} | {r} | {1000 * m['forces_mae_eV_per_A']:.1f} | "
                             f"{1000 * m['forces_rmse_eV_per_A']:.1f} | {m['energy_rmse_meV_per_atom']:.2f} | "
                             f"{m.get('energy_mean_error_meV_per_atom', float('nan')):+.2f} | "
                             f"{1000 * sigma:.1f} | {m['forces_nll']:.2f} |")
        lines.append("")
    if info.get("validation"):
        lines += [f"Validation: fresh {info['steps']}-step runs at {info['temperature']:.0f} K from the start structure "
                  "(new velocities and Langevin seed), each model's own τ, no labelling:", "",
                  f"| model | seed | result | max σ{unit} | τ{unit} |", "|---|---|---|---|---|"]
        for v in info["validation"]:
            result = f"halt @ {v['step_reached']}" if v["halted"] else f"completed {v['step_reached']} steps"
            lines.append(f"| round {v['round']} | {v['seed']} | {result} | {v['max_sigma']:.4f} | {v['threshold']:.4f} |")
        lines.append("")
    if info.get("free"):
        lines += [f"Unhalted runs: {info['free_steps']} steps at {info['temperature']:.0f} K from the start structure "
                  "with no halt, each dumped frame's max σ against τ:", "",
                  f"| model | seed | steps run | checks | over τ | first over τ at step | median max σ{unit} | τ{unit} | "
                  "over round 0's τ |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for v in info["free"]:
            ran = f"{v['steps']}" + (f" ({v['failure']})" if v.get("failure") else "")
            lines.append(f"| round {v['round']} | {v['seed']} | {ran} | {v['checks']} | {100 * v['fraction_over']:.0f} % | "
                         f"{v['first_over'] if v['first_over'] is not None else '–'} | {v['median_sigma']:.4f} | "
                         f"{v['threshold']:.4f} | " + (f"{100 * v['fraction_over_round0']:.0f} % of {v['round0_threshold']:.4f} |"
                                                       if v.get("fraction_over_round0") is not None else "– |"))
        lines.append("")
    lines += ["## Findings", ""] + info["findings"] + [""]
    lines += ["Files: `al_otf.yaml` (the config), `otf_log.json`, `otf_sigma.png` (max σ of every dumped frame vs "
              f"step, halts marked), `results.json`. Runs: {os.path.relpath(info['runs'], REPO)}/."]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def findings(log: dict, evaluation: dict, info: dict) -> list:
    rounds = log["rounds"]
    last = rounds[-1]
    labels = sum(r.get("labels_added", 0) for r in rounds)
    halts = sum(1 for r in rounds if r["halted"])
    text = []
    if log["status"] == "completed":
        text.append(f"- The final segment (round {last['round']}, steps {last['start_step']}–{last['step_reached']}, "
                    f"{last['step_reached'] - last['start_step']} steps = "
                    f"{0.5e-3 * (last['step_reached'] - last['start_step']):.2f} ps) completed without a halt "
                    f"(max σ {last['max_sigma']:.4f} < τ {last['threshold']:.4f}{_sigma_unit(info)}).")
    else:
        text.append(f"- The loop did NOT complete: status `{log['status']}`, last segment ended at step "
                    f"{last['step_reached']} of {info['steps']} ({'halted' if last['halted'] else 'not halted'}).")
    text.append(f"- {halts} halt(s); {labels} GFN2-xTB labels added in total "
                f"({info['n_train']} → {info['n_train'] + labels} training frames).")
    if evaluation:
        first_r, last_r = min(evaluation), max(evaluation)
        for name in evaluation[first_r]:
            a = 1000 * evaluation[first_r][name]["forces_mae_eV_per_A"]
            b = 1000 * evaluation[last_r][name]["forces_mae_eV_per_A"]
            verdict = "fell" if b < a else "did not fall"
            text.append(f"- {name} force MAE {verdict}: {a:.1f} → {b:.1f} meV/Å (round {first_r} → round {last_r}).")
            a, b = (evaluation[r][name]["energy_rmse_meV_per_atom"] for r in (first_r, last_r))
            text.append(f"- {name} energy RMSE {'fell' if b < a else 'rose'}: {a:.2f} → {b:.2f} meV/atom.")
            shifts = [evaluation[r][name].get("energy_mean_error_meV_per_atom") for r in (first_r, last_r)]
            if None not in shifts:
                text.append(f"- {name} mean energy error (the energy zero's shift): {shifts[0]:+.2f} → "
                            f"{shifts[1]:+.2f} meV/atom.")
    for r in sorted({v["round"] for v in info.get("validation", [])}):
        runs_r = [v for v in info["validation"] if v["round"] == r]
        done = sum(not v["halted"] for v in runs_r)
        text.append(f"- Fresh validation runs with the round-{r} model: {done} of {len(runs_r)} ran all {info['steps']} "
                    f"steps without a halt (halt steps: {[v['step_reached'] for v in runs_r if v['halted']] or 'none'}).")
    if len(rounds) > 1:
        fresh = f"- Each round trains afresh for {info['round_epochs']} epochs: the error change is the labels', not extra training."
        text.append(fresh if info.get("fresh_rounds") else f"- Confound: every round also trains {info['round_epochs']} more warm-started "
                    f"epochs, so part of any error drop is extra training ({info['round_epochs'] * (len(rounds) - 1)} epochs in all), not only the labels.")
        if not log["status"] == "completed" and last["max_sigma"] > 5 * last["threshold"]:
            text.append(f"- At the last halt the max σ ({last['max_sigma']:.2f}{_sigma_unit(info)}) is {last['max_sigma'] / last['threshold']:.0f}× τ: "
                        f"the trajectory is leaving the physical region, not being pulled back by the labels.")
    if info.get("threshold_from") == "control":
        taus = [r["threshold"] for r in rounds]
        text.append(f"- τ follows each round's own control run: {min(taus):.4f} … {max(taus):.4f} (round 0: "
                    f"{taus[0]:.4f}); the control runs' median σ at {info['control_temperature']:g} K went "
                    f"{rounds[0]['control_quantiles'][0]:.4f} → {last['control_quantiles'][0]:.4f}: the model grew "
                    f"{'more' if last['control_quantiles'][0] < rounds[0]['control_quantiles'][0] else 'less'} certain there.")
        for v in info.get("free", []):
            if v.get("fraction_over_round0") is not None:
                text.append(f"- Round-{v['round']} model's unhalted run: {100 * v['fraction_over']:.0f} % of checks "
                            f"over its own τ, {100 * v['fraction_over_round0']:.0f} % over round 0's τ.")
    text.append("- One on-the-fly run (one seed): the halts and the error change are one sample, not an average.")
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=BENCH_DIR / "runs" / "al_otf")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "al_otf")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="training seed; the loop's MD uses seed + 1")
    parser.add_argument("--base-epochs", type=int, default=120)
    parser.add_argument("--round-epochs", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.005)
    parser.add_argument("--temperature", type=float, default=800.0)
    parser.add_argument("--steps", type=int, default=2000, help="total MD steps over all segments")
    parser.add_argument("--dump-every", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--means", choices=("mse", "nll", "frozen"), default=None,
                        help="loss.means of every training (default: the config default)")
    parser.add_argument("--refit-energy-zero", action="store_true", help="loss.refit_energy_zero in every training")
    parser.add_argument("--force-huber", type=float, default=0.0, help="loss.force_huber (eV/Å) in every training")
    parser.add_argument("--calibration", choices=("isotonic", "scalar", "split"), default="isotonic")
    parser.add_argument("--halt-on", choices=("total", "epistemic", "relative", "feature"), default="total",
                        help="the force σ that halts the MD (md.halt_on)")
    parser.add_argument("--round-lr", type=float, default=None, help="learning rate of the rounds (default --lr)")
    parser.add_argument("--acquired-repeats", type=int, default=1)
    parser.add_argument("--look-ahead", type=int, default=0, help="md.look_ahead: steps of MD past each halt whose frames join the candidates")
    parser.add_argument("--fresh-rounds", action="store_true", help="warm_start: false (each round trains from a fresh initialisation)")
    parser.add_argument("--look-ahead-limit", type=float, default=3.0, help="md.look_ahead_limit (× τ)")
    parser.add_argument("--base-from", type=Path, default=None,
                        help="another --runs folder whose base_300K posterior (same data and settings) is reused")
    parser.add_argument("--free-steps", type=int, default=2000,
                        help="steps of the unhalted runs of the round-0 and final models (0: none)")
    parser.add_argument("--label-halting-frame", action="store_true",
                        help="label_halting_frame: each halt's frame is always one of the labels")
    parser.add_argument("--validation-seeds", type=int, nargs="+", default=[11, 12, 13],
                        help="Langevin/velocity seeds of the fresh validation runs after the loop")
    parser.add_argument("--threshold-from", choices=("calibration", "control", "control_first"), default="calibration",
                        help="threshold_from: round 0's calibration τ, each round's control run's, or round 0's control τ kept")
    parser.add_argument("--control-temperature", type=float, default=300.0, help="md.control_temperature (K)")
    parser.add_argument("--control-steps", type=int, default=4000, help="md.control_steps")
    parser.add_argument("--control-margin", type=float, default=1.25, help="md.control_margin")
    parser.add_argument("--control-rule", choices=("largest", "run_length"), default="largest", help="md.control_rule")
    parser.add_argument("--control-false-halts", type=float, default=0.1, help="md.control_false_halts")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    # absolute: the AL config written into --runs resolves its paths against its own folder
    args.runs, args.out = args.runs.resolve(), args.out.resolve()

    started = time.perf_counter()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for folder in (args.runs, args.out):
        folder.mkdir(parents=True, exist_ok=True)
    data = write_300k_data(args.runs / "data")
    posterior, base_seconds = train_base(args, data, args.runs)
    config = al_config(args, data, posterior, args.runs)
    config_path = write_config(config, args.runs / "al_otf.yaml")
    otf_dir = Path(config["out"])
    otf_seconds = 0.0
    if not args.report_only:
        otf_seconds = run_logged(cli_command("al", config_path, quiet=False), args.runs / "otf.log")
    log = json.loads((otf_dir / "otf_log.json").read_text())
    round_indices = [r["round"] for r in log["rounds"]]
    evaluation = evaluate_rounds(otf_dir, sorted({round_indices[0], round_indices[-1]}),
                                 {"test_ood_hot": PSB3_DIR / "test_ood_hot.xyz", "test_id": PSB3_DIR / "test_id.xyz"})
    for name in ("otf_log.json", "otf_sigma.png"):
        shutil.copyfile(otf_dir / name, args.out / name)
    shutil.copyfile(config_path, args.out / "al_otf.yaml")
    info = dict(vars(args), runs=str(args.runs), out=str(args.out), n_train=data["n_train"], n_valid=data["n_valid"],
                base_train_s=base_seconds, otf_s=otf_seconds or sum(sum(r["time_s"].values()) for r in log["rounds"]),
                command=command_line("al_otf.py", argv))
    run_info = args.runs / "run_info.json"  # the command and wall time of the run itself, kept by --report-only
    if args.report_only and run_info.is_file():
        info.update(json.loads(run_info.read_text()))
    else:
        info["wall_s"] = time.perf_counter() - started
        run_info.write_text(json.dumps({k: info[k] for k in ("command", "wall_s", "otf_s")}))
    validation_file = args.runs / "validation.json"  # kept by --report-only
    if not (args.report_only and validation_file.is_file()):
        validation_file.write_text(json.dumps(validation_runs(otf_dir, log, args, data, args.runs)))
    info["validation"] = json.loads(validation_file.read_text())
    free_file = args.runs / "free.json"  # kept by --report-only
    if args.free_steps and not (args.report_only and free_file.is_file()):
        free_file.write_text(json.dumps(free_runs(otf_dir, log, args, data, args.runs)))
    info["free"] = json.loads(free_file.read_text()) if args.free_steps and free_file.is_file() else []
    info["findings"] = findings(log, evaluation, info)
    (args.out / "results.json").write_text(json.dumps(
        {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in info.items()},
         "status": log["status"], "rounds": [{k: v for k, v in r.items() if k != "trace"} for r in log["rounds"]],
         "evaluation": {str(r): m for r, m in evaluation.items()}}, indent=2))
    write_report(args.out, log, evaluation, info)
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
