"""On-the-fly active learning: LAMMPS MD halts where the model is unsure, label, retrain, go on.

Round r = 0 .. n_rounds (``<out>/round_<r>``):

1. posterior: round 0 is ``posterior`` (copied) or trained on ``initial``; round r > 0 trains
   on ``initial`` + every frame acquired before it, warm-started from round r−1
   (``training.init_from``, as in pool mode);
2. with ``valid``: ``calibrate_posterior_file`` (``calibration_method``), which also sets the
   threshold 1.5 × q_0.99 of the validation set's largest calibrated atomic force σ;
3. export ``model.pt``; halting threshold τ = ``threshold`` if given, else round 0's deployable's
   own ``thresholds.atomic_force_std`` (from its calibration record) or, with ``md.halt_on:
   epistemic`` / ``relative``, the same rule on round 0's calibrated epistemic σ / that σ over
   (|F_i| + 1 eV/Å), kept for every later round so that every round answers to one criterion
   (what that costs, measured: bench/results/al_otf/sigma_levels). With ``threshold_from:
   control`` instead each round's τ is ``md.control_margin`` × the largest σ of an unhalted
   control run of its own model at the training temperature (``round_<r>/control``, _control), or
   with ``md.control_rule: run_length`` the σ such a run of ``md.n_steps`` would exceed
   ``md.control_false_halts`` times in expectation, extrapolated from the control run's tail;
   ``threshold_from: control_first`` takes round 0's control τ and keeps it for every round;
4. an MD segment (``round_<r>/md``): LAMMPS with ``pair_style bayesrace`` from the previous
   segment's restart point or, in round 0, from ``md.structure`` with Maxwell–Boltzmann
   velocities; the step counter continues via ``reset_timestep``. Every ``md.dump_every`` steps
   the frame and its per-atom σ's are dumped and ``fix halt`` stops the run when max_i σ_i > τ
   (σ: the total force σ, ``c_ug[1]``, the epistemic one with ``md.halt_on: epistemic``, ``c_ug[6]``,
   or the relative one with ``relative``, ``c_ug[8]``; every
   "max σ" below is that σ). It runs ``run n_steps upto``;
5. a segment that reaches ``md.n_steps`` without a halt ends the loop; so does round n_rounds.
   Otherwise the segment's new frames with max σ > ``candidate_fraction`` × τ (the halting
   frame always is one) join the candidates of the earlier segments not yet labelled; with
   ``md.look_ahead`` > 0 so do those of a look-ahead (``round_<r>/look_ahead``): MD from the
   halting frame for look_ahead more steps that halts only at ``md.look_ahead_limit`` × τ;
   ``batch_size`` of them are selected by ``strategy`` (``predict_frames`` on the round's
   calibrated posterior + ``select_batch``; with ``label_halting_frame`` the halting frame
   first, the rest given it)
   and labelled by the oracle into ``labelled.xyz`` (crash-safe, ``pool_index`` = round·10¹² + MD
   step).
   The next segment restarts (``md.restart_from``) from the last dumped frame the model
   trusted (max σ ≤ τ; positions, velocities and step from the dump, written at full
   precision), or from the segment's first frame if none was: going on from the halting frame
   itself (``halt``) lets a trajectory that already left the trusted region run further away
   before the next check.

Kill safety: ``state.json`` records each round's finished stages (trained, calibrated,
exported, md, selected, labelled); a restart redoes only the unfinished stage (a killed MD
segment reruns from its start, same seeds). ``otf_log.json`` and ``otf_sigma.png`` (max σ of
each dumped frame vs the cumulative step, halts marked) are rewritten after every segment.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import time
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from .. import keys
from .._figures import new_figure, save_figure
from .._files import atomic_path, write_json_atomic
from ..lammps import (
    END_DATA,
    MAX_SIGMA,
    MD_STEP,
    RESTART_DATA,
    dump_frame_atoms,
    halting_column,
    lammps_data_text,
    last_trusted_frame,
    run_md_segment,
)
from ._config import ActiveConfig, round_training_config
from ._control import CONTROL_DIR, control_threshold
from ._oracles import Oracle, label_structures, make_oracle
from ._rounds import Display, open_state, train_round
from ._store import (
    AL_ROUND,
    LABELLED_FILE,
    POOL_INDEX,
    append_frame,
    frame_atoms,
    labelled_atoms,
    read_labelled,
    write_training_file,
)

OTF_LOG = "otf_log.json"
OTF_PLOT = "otf_sigma.png"
LOOK_AHEAD_DIR = "look_ahead"  # a round's MD past its halt (md.look_ahead), same files as MD_DIR
MD_DIR = "md"  # a round's MD segment: in.md, log.md, start.data, frames.dump, end.data (bayesrace.lammps)
CANDIDATES_FILE = "candidates.xyz"
SIGMA_UNITS = {"total": " eV/Å", "epistemic": " eV/Å", "relative": "", "feature": ""}  # of the σ each md.halt_on halts on
SIGMA_NAMES = {"total": "force σ", "epistemic": "epistemic force σ", "relative": "relative force σ",
               "feature": "feature distance"}
SEED_STRIDE = 1000  # segment r uses md.seed + SEED_STRIDE·r (+1: LAMMPS seeds are positive)
# a candidate's pool_index: round·FRAME_ID_STRIDE + MD step (after a restart from an earlier frame
# the same step recurs in the next segment with another configuration)
FRAME_ID_STRIDE = 10**12


def _fingerprint(config: ActiveConfig) -> Dict[str, Any]:
    """What a restarted loop must agree with (n_rounds, md.n_steps, md.ranks and oracle workers may change)."""
    md = config.md
    digest = lambda path: hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else None  # noqa: E731
    return dict(mode=config.mode, initial=config.initial, initial_sha256=digest(config.initial),
                posterior=config.posterior, valid=config.valid, calibration_method=config.calibration_method,
                threshold=config.threshold, candidate_fraction=config.candidate_fraction, seed=config.seed,
                strategy=config.strategy, batch_size=config.batch_size, batch_aware=config.batch_aware,
                warm_start=config.warm_start, structure=md.structure, structure_sha256=digest(md.structure),
                box=md.box, temperature=md.temperature, thermostat=md.thermostat, damping=md.damping,
                timestep=md.timestep, dump_every=md.dump_every, md_seed=md.seed, restart_from=md.restart_from,
                threshold_from=config.threshold_from, control=[md.control_temperature, md.control_steps,
                                                               md.control_margin, md.control_rule,
                                                               md.control_false_halts])


def _frames_from_atoms(atoms_list):
    from ..data import Frame

    return [Frame(numbers=a.numbers.astype(np.int64), positions=np.asarray(a.positions, dtype=np.float64),
                  cell=np.asarray(a.cell.array, dtype=np.float64), pbc=np.asarray(a.pbc, dtype=bool))
            for a in atoms_list]


def run_on_the_fly(config: ActiveConfig, progress: bool = True, oracle: Optional[Oracle] = None) -> Dict[str, Any]:
    """Run (or continue) the on-the-fly loop of ``config``; returns the log (``otf_log.json``).

    ``oracle`` overrides the configured one."""
    import ase.io

    from ..bayes import load_posterior
    from ..data import read_frames
    from ..export import export_posterior, read_metadata
    from ..train import ConfigError
    from ..uq import calibrate_posterior_file, predict_frames
    from ._acquisition import select_batch

    if config.mode != "on_the_fly":
        raise ConfigError(f"run_on_the_fly needs mode 'on_the_fly', got {config.mode!r}")
    say = Display(progress)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    md = config.md
    column = halting_column(md)
    if not Path(md.structure).is_file():
        raise ConfigError(f"md.structure: {md.structure}: no such file")
    if config.posterior is not None and not Path(config.posterior).is_file():
        raise ConfigError(f"posterior: {config.posterior}: no such file")
    start_atoms = ase.io.read(md.structure, index=0)
    molecule = not any(start_atoms.pbc)
    if oracle is None:
        oracle = make_oracle(config.oracle)
    read = dict(energy_key=config.energy_key, forces_key=config.forces_key)
    initial_atoms = [labelled_atoms(a, f.energy, f.forces)
                     for f, a in ((f, frame_atoms(f)) for f in read_frames(config.initial, **read))]

    state, save_state = open_state(out, _fingerprint(config), dict(rounds=[]), say)
    labelled_path = out / LABELLED_FILE
    labelled = read_labelled(labelled_path)

    status = "running"
    for round_index in range(config.n_rounds + 1):
        if round_index < len(state["rounds"]):
            record = state["rounds"][round_index]
        else:
            record = dict(round=round_index, time_s=dict(train=0.0, calibrate=0.0, export=0.0, md=0.0,
                                                         select=0.0, label=0.0))
            state["rounds"].append(record)
        times = record["time_s"]
        round_dir = out / f"round_{round_index}"
        round_dir.mkdir(exist_ok=True)
        acquired = [s for r in state["rounds"][:round_index] for s in r.get("selected", [])]
        training_atoms = initial_atoms + [labelled[s] for s in acquired for _ in range(config.acquired_repeats)]
        record["n_labels"] = len(initial_atoms) + len(acquired)  # distinct labelled structures
        train_file = round_dir / "train.xyz"
        training_config = round_training_config(config, round_index, str(train_file))
        training_config.validate()
        dtype = training_config.torch_dtype
        posterior_path = round_dir / "posterior.pt"

        # 1. the posterior
        if not record.get("trained"):
            started = time.perf_counter()
            if round_index == 0 and config.posterior is not None:
                shutil.copyfile(config.posterior, posterior_path)
                say(f"round 0: starting from {config.posterior}")
            else:
                write_training_file(train_file, training_atoms, training_config.data.energy_key,
                                     training_config.data.forces_key)
                repeats = f", the {len(acquired)} acquired ×{config.acquired_repeats}" if config.acquired_repeats > 1 else ""
                say(f"round {round_index}/{config.n_rounds}: training on {record['n_labels']} structures{repeats}"
                    f"{' (warm start)' if training_config.training.init_from else ''} -> {round_dir}")
                train_round(training_config, config.training_ranks, progress)
            times["train"] += time.perf_counter() - started
            record["trained"] = True
            save_state()
        # 2. calibration
        deployed_posterior = posterior_path
        if config.valid is not None:
            deployed_posterior = round_dir / "posterior_calibrated.pt"
            if not record.get("calibrated"):
                started = time.perf_counter()
                result = calibrate_posterior_file(posterior_path, config.valid, deployed_posterior,
                                                  method=config.calibration_method, **read)
                record["calibration_threshold"] = float(result["threshold"])
                # absent for one member (no epistemic part); halt_on epistemic refuses those below
                record["calibration_epistemic_threshold"] = result["thresholds"].get(keys.ATOMIC_FORCE_STD_EPISTEMIC)
                record["calibration_relative_threshold"] = result["thresholds"].get(keys.ATOMIC_FORCE_STD_RELATIVE)
                record["calibration_feature_threshold"] = result["thresholds"].get(keys.ATOMIC_FEATURE_DISTANCE)
                times["calibrate"] = time.perf_counter() - started
                record["calibrated"] = True
                save_state()
        # 3. the deployable
        model_path = round_dir / "model.pt"
        if not record.get("exported"):
            started = time.perf_counter()
            posterior = load_posterior(deployed_posterior, dtype=dtype)
            posterior.eval()
            if md.halt_on in ("epistemic", "relative") and len(posterior.members) < 2:
                raise ConfigError(f"md.halt_on '{md.halt_on}' needs a posterior of 2 or more members; round "
                                  f"{round_index}'s has 1 (its epistemic σ is 0): use halt_on 'total' or 'feature'")
            if md.halt_on == "feature" and posterior.feature_density is None:
                raise ConfigError(f"md.halt_on 'feature' needs a posterior with a feature density; round "
                                  f"{round_index}'s ({deployed_posterior}) has none (trained before bayesrace "
                                  "fitted one): retrain it, or use another md.halt_on")
            fixed = config.threshold if round_index == 0 else state["rounds"][0]["threshold"]
            if config.threshold_from in ("control", "control_first"):
                export_posterior(posterior, model_path)  # τ: the control run's, below
            elif md.halt_on != "total":
                # the deployable keeps its own total-σ threshold; the segment halts on this σ's τ
                export_posterior(posterior, model_path)
                record["threshold"] = float(fixed if fixed is not None
                                            else record[f"calibration_{md.halt_on}_threshold"])
            else:
                thresholds = None if fixed is None else {"atomic_force_std": float(fixed)}
                metadata = export_posterior(posterior, model_path, thresholds=thresholds)
                record["threshold"] = float(metadata["thresholds"]["atomic_force_std"])
            times["export"] = time.perf_counter() - started
            record["exported"] = True
            save_state()
        type_names = list(read_metadata(model_path)["type_names"])
        cutoff = float(read_metadata(model_path)["cutoff"])
        if molecule and md.box - np.ptp(start_atoms.positions, axis=0).max() <= cutoff:
            raise ConfigError(f"md.box = {md.box} Å is too small: it must exceed the molecule's size + the "
                              f"cutoff ({cutoff} Å) so that periodic images do not interact")
        if config.threshold_from == "control_first" and round_index > 0:
            record["threshold"] = float(state["rounds"][0]["threshold"])  # round 0's control τ, kept
        elif config.threshold_from in ("control", "control_first") and not record.get("control_done"):
            say(f"round {round_index}/{config.n_rounds}: control run, {md.control_steps} steps at "
                f"{md.control_temperature:g} K")
            started = time.perf_counter()
            record.update(control_threshold(model_path, type_names, md, round_dir / CONTROL_DIR, start_atoms,
                                            molecule, md.seed + SEED_STRIDE * round_index + 3))
            times["control"] = time.perf_counter() - started
            record["control_done"] = True
            save_state()
        threshold = record["threshold"]

        # 4. the MD segment
        segment_dir = round_dir / MD_DIR
        if not record.get("md_done"):
            if round_index == 0:
                start_step, start_text = 0, lammps_data_text(start_atoms, type_names, md.box)
            else:
                previous = state["rounds"][round_index - 1]
                start_step = int(previous["restart_step"])
                start_text = (out / f"round_{round_index - 1}" / MD_DIR / previous["restart_file"]).read_text()
            say(f"round {round_index}/{config.n_rounds}: MD from step {start_step} to {md.n_steps}, halting at "
                f"max {SIGMA_NAMES[md.halt_on]} > {threshold:.4g}{SIGMA_UNITS[md.halt_on]}")
            started = time.perf_counter()
            segment = run_md_segment(model_path, type_names, md, threshold, segment_dir, start_text, start_step,
                                     first_segment=round_index == 0, molecule=molecule,
                                     segment_seed=md.seed + SEED_STRIDE * round_index + 1)
            frames = [f for f in segment["frames"] if f["step"] > start_step or round_index == 0]
            atoms_list = [dump_frame_atoms(f, type_names, molecule, column) for f in frames]
            cut = config.candidate_fraction * threshold
            candidates = [a for a in atoms_list if a.info[MAX_SIGMA] > cut or
                          (segment["halted"] and a.info[MD_STEP] == segment["step_reached"])]
            if segment["halted"] and md.look_ahead > 0 and round_index < config.n_rounds:
                ahead = _look_ahead(model_path, type_names, md, threshold, segment_dir, round_dir / LOOK_AHEAD_DIR,
                                    segment["step_reached"], molecule, md.seed + SEED_STRIDE * round_index + 2)
                ahead_atoms = [dump_frame_atoms(f, type_names, molecule, column) for f in ahead["frames"]]
                candidates += [a for a in ahead_atoms if a.info[MAX_SIGMA] > cut]
                record.update(look_ahead_reached=ahead["step_reached"], look_ahead_stopped=ahead["halted"],
                              n_look_ahead_candidates=sum(a.info[MAX_SIGMA] > cut for a in ahead_atoms),
                              look_ahead_trace=[[a.info[MD_STEP], a.info[MAX_SIGMA]] for a in ahead_atoms])
            times["md"] = time.perf_counter() - started
            for atoms in candidates:
                atoms.info[POOL_INDEX] = round_index * FRAME_ID_STRIDE + atoms.info[MD_STEP]
            with atomic_path(round_dir / CANDIDATES_FILE) as tmp:
                ase.io.write(tmp, candidates, format="extxyz")
            restart_step, restart_file = segment["step_reached"], END_DATA
            if segment["halted"] and md.restart_from == "last_trusted":
                restart = last_trusted_frame(segment["frames"], threshold, column)
                restart_step, restart_file = int(restart["step"]), RESTART_DATA
                atoms = dump_frame_atoms(restart, type_names, molecule, column)
                velocities = np.stack([restart["columns"][c] for c in ("vx", "vy", "vz")], axis=1)
                (segment_dir / RESTART_DATA).write_text(lammps_data_text(atoms, type_names, md.box, velocities))
            record.update(restart_step=restart_step, restart_file=restart_file)
            record.update(start_step=start_step, step_reached=segment["step_reached"], halted=segment["halted"],
                          max_sigma=segment["max_sigma"], n_frames=len(frames), n_candidates=len(candidates),
                          trace=[[a.info[MD_STEP], a.info[MAX_SIGMA]] for a in atoms_list], md_done=True)
            save_state()
            say(f"round {round_index}: MD reached step {record['step_reached']}"
                f"{' (halted)' if record['halted'] else ''}; max σ {record['max_sigma']:.4g}{SIGMA_UNITS[md.halt_on]}, "
                f"{len(candidates)} candidates")
        write_otf_log(config, state)
        if not record["halted"]:
            status = "completed"
            break
        if round_index == config.n_rounds:
            status = "n_rounds"
            break

        # 5. select and label
        # every segment's candidates so far, re-scored by this round's posterior: a short segment
        # (restarted just before its halt) adds only a few frames of its own
        candidates = [a for r in range(round_index + 1)
                      for a in ase.io.read(out / f"round_{r}" / CANDIDATES_FILE, index=":", format="extxyz")]
        candidates = [a for a in candidates if int(a.info[POOL_INDEX]) not in labelled or
                      int(a.info[POOL_INDEX]) in record.get("selected", [])]
        if not record.get("selection_done"):
            k = min(config.batch_size, len(candidates))
            started = time.perf_counter()
            posterior = load_posterior(deployed_posterior, dtype=dtype)
            prediction = predict_frames(posterior, _frames_from_atoms(candidates), batch_size=config.predict_batch_size,
                                        dtype=dtype, progress=False)
            required = []
            if config.label_halting_frame:
                halting_id = round_index * FRAME_ID_STRIDE + int(record["step_reached"])
                required = [c for c, a in enumerate(candidates) if int(a.info[POOL_INDEX]) == halting_id]
            chosen = select_batch(prediction, k, config.strategy, seed=config.seed + round_index,
                                  batch_aware=config.batch_aware, required=required)
            record["selected"] = [int(candidates[c].info[POOL_INDEX]) for c in chosen]
            record["n_pooled_candidates"] = len(candidates)
            times["select"] = time.perf_counter() - started
            record["selection_done"] = True
            save_state()
            del posterior
        if not record.get("labelled"):
            by_id = {int(a.info[POOL_INDEX]): a for a in candidates}
            missing = [s for s in record["selected"] if s not in labelled]
            say(f"round {round_index}: labelling {len(missing)} frames (MD steps "
                f"{[int(by_id[s].info[MD_STEP]) for s in missing]})")
            started = time.perf_counter()

            def store(atoms, next_round=round_index + 1):
                atoms.info[AL_ROUND] = next_round
                append_frame(labelled_path, atoms)
                labelled[int(atoms.info[POOL_INDEX])] = atoms

            bare = []
            for frame_id in missing:
                atoms = by_id[frame_id]
                copy = _bare_atoms(atoms, molecule)
                copy.info.update({POOL_INDEX: frame_id, MD_STEP: atoms.info[MD_STEP], MAX_SIGMA: atoms.info[MAX_SIGMA]})
                bare.append(copy)
            label_structures(oracle, bare, store, workers=config.oracle.workers, progress=progress,
                             description=f"round {round_index} label")
            times["label"] += time.perf_counter() - started
            record["labels_added"] = len(record["selected"])
            record["labelled"] = True
            save_state()
    state["status"] = status
    save_state()
    log = write_otf_log(config, state)
    say(f"done ({status}): {OTF_LOG} and {OTF_PLOT} in {out}")
    return log


def _look_ahead(model_path, type_names, md, threshold: float, segment_dir: Path, workdir: Path, halt_step: int,
                molecule: bool, seed: int) -> Dict[str, Any]:
    """MD past a halt (``md.look_ahead`` steps from the halting frame, stopping only at
    ``md.look_ahead_limit`` × threshold): run_md_segment's result, frames after the halt only."""
    ahead_md = dataclasses.replace(md, n_steps=halt_step + md.look_ahead)
    result = run_md_segment(model_path, type_names, ahead_md, md.look_ahead_limit * threshold, workdir,
                            (segment_dir / END_DATA).read_text(), halt_step, first_segment=False, molecule=molecule,
                            segment_seed=seed)
    result["frames"] = [f for f in result["frames"] if f["step"] > halt_step]
    return result


def _bare_atoms(atoms, molecule: bool):
    from ase import Atoms

    if molecule:
        return Atoms(numbers=atoms.numbers, positions=atoms.positions)
    return Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)


def write_otf_log(config: ActiveConfig, state: Dict[str, Any]) -> Dict[str, Any]:
    """``otf_log.json`` (per round: start_step, step_reached, halted, max_sigma, threshold,
    n_candidates, labels_added, n_labels, time_s, with md.look_ahead look_ahead_reached,
    look_ahead_stopped, n_look_ahead_candidates and look_ahead_trace, and the trace [[step, max σ], ...] of the
    dumped frames) and ``otf_sigma.png``."""
    rounds = []
    for record in state["rounds"]:
        if not record.get("md_done"):
            continue
        rounds.append({key: record.get(key) for key in ("round", "start_step", "step_reached", "halted", "restart_step",
                                                        "max_sigma", "threshold", "calibration_threshold",
                                                        "calibration_epistemic_threshold",
                                                        "calibration_relative_threshold",
                                                        "calibration_feature_threshold", "control_max_sigma",
                                                        "control_quantiles", "control_rule", "control_level",
                                                        "control_tail", "n_frames", "n_candidates",
                                                        "n_pooled_candidates", "selected", "n_labels", "time_s",
                                                        "trace", "look_ahead_reached", "look_ahead_stopped",
                                                        "n_look_ahead_candidates", "look_ahead_trace")})
        rounds[-1]["labels_added"] = record.get("labels_added", 0)
    log = dict(n_steps=config.md.n_steps, n_rounds=config.n_rounds, strategy=config.strategy,
               halt_on=config.md.halt_on, batch_size=config.batch_size, candidate_fraction=config.candidate_fraction,
               look_ahead=config.md.look_ahead, threshold_from=config.threshold_from,
               control_rule=config.md.control_rule, control_false_halts=config.md.control_false_halts,
               status=state.get("status", "running"),
               final_step=rounds[-1]["step_reached"] if rounds else 0, rounds=rounds)
    out = Path(config.out)
    write_json_atomic(out / OTF_LOG, log)
    _plot_sigma_trace(log, out / OTF_PLOT)
    return log


def _plot_sigma_trace(log: Dict[str, Any], path: Path) -> None:
    figure, (axis,) = new_figure(1)
    figure.set_size_inches(7, 3.5)
    from matplotlib import colormaps

    # one colour per round along a colour map: the default cycle repeats after 10 rounds
    colours = colormaps["viridis"](np.linspace(0.0, 0.9, max(len(log["rounds"]), 1)))
    for record, colour in zip(log["rounds"], colours):
        trace = np.asarray(record["trace"] or [[record["start_step"], np.nan]], dtype=np.float64)
        line, = axis.plot(trace[:, 0], trace[:, 1], lw=1, color=colour, label=f"round {record['round']}")
        end = max(record["step_reached"], record["start_step"] + 1)
        axis.hlines(record["threshold"], record["start_step"], end, colors=line.get_color(), linestyles="--", lw=0.8)
        if record["halted"] and len(trace):
            axis.plot(trace[-1, 0], trace[-1, 1], "x", color="red", ms=8)
        if record.get("look_ahead_trace"):  # from the halting frame on, not kept by the run
            ahead = np.asarray([trace[-1]] + list(record["look_ahead_trace"]), dtype=np.float64)
            axis.plot(ahead[:, 0], ahead[:, 1], lw=0.8, ls=":", color=line.get_color())
    axis.set_xlabel("MD step (cumulative)")
    halt_on = log.get("halt_on", "total")
    unit = SIGMA_UNITS[halt_on].strip()
    axis.set_ylabel(f"max atomic {SIGMA_NAMES[halt_on]}" + (f" ({unit})" if unit else ""))
    axis.set_title(f"on-the-fly AL: {log['status']}, step {log['final_step']} of {log['n_steps']} (× = halt, "
                   f"-- = threshold" + (", ⋯ = look-ahead" if log.get("look_ahead") else "") + ")", fontsize=9)
    if log["rounds"]:
        axis.legend(fontsize=7, ncol=1 + len(log["rounds"]) // 7)
    save_figure(figure, path)


__all__ = ["run_on_the_fly", "write_otf_log", "OTF_LOG", "OTF_PLOT"]
