"""One MD segment of on-the-fly active learning: pair_style bayesrace MD that dumps each frame
with its per-atom force σ and halts (``fix halt``) once the largest σ exceeds a threshold.

A segment lives in its own folder: ``start.data`` in, ``in.md`` its input, ``log.md``,
``frames.dump`` (every ``md.dump_every`` steps: id type xu yu zu vx vy vz σ_i) and
``end.data`` out. ``md`` is the on-the-fly configuration's md section (temperature,
thermostat, damping, timestep, dump_every, n_steps, ranks, halt_on).

``md.halt_on`` chooses the σ that halts: ``total`` (epistemic and aleatoric together: the max
is ``c_ug[1]``, the per-atom σ column 1 of ``compute bayesrace/atom``), ``epistemic`` (the
members' disagreement: ``c_ug[6]``, column 2), ``relative`` (that σ relative to the force,
σ_epi,i / (|F_i| + 1 eV/Å), unit-free: ``c_ug[8]``, column 6) or ``feature`` (the feature
distance, unit-free: ``c_ug[9]``, column 7; needs a deployable with a feature density, one
member is enough). All four per-atom columns are dumped either way.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from ._inputs import lammps_number
from ._outputs import read_dump
from ._runner import plugin_directory, run_input_file

INPUT_FILE = "in.md"
LOG_FILE = "log.md"
START_DATA = "start.data"
END_DATA = "end.data"
RESTART_DATA = "restart.data"  # the next segment's start when it is not end.data (written by the caller)
DUMP_FILE = "frames.dump"
# each σ a segment can halt on: its per-atom dump column (compute bayesrace/atom) and its
# maximum over the atoms (compute bayesrace)
HALT_COLUMNS = {"total": "c_u[1]", "epistemic": "c_u[2]", "relative": "c_u[6]", "feature": "c_u[7]"}
HALT_MAXIMA = {"total": "c_ug[1]", "epistemic": "c_ug[6]", "relative": "c_ug[8]", "feature": "c_ug[9]"}


def halting_column(md) -> str:
    """The dump column of the σ ``md.halt_on`` names (an MDSection: checked there)."""
    return HALT_COLUMNS[md.halt_on]


def frame_max_sigma(frame: Dict[str, Any], column: str = HALT_COLUMNS["total"]) -> float:
    """The largest per-atom σ of a dumped frame in ``column``."""
    return float(frame["columns"][column].max())


def md_input_text(model_path, type_names: Sequence[str], md, threshold: float, start_step: int,
                  first_segment: bool, molecule: bool, segment_seed: int, plugin_load: Optional[str] = None) -> str:
    """The LAMMPS input of one segment: read ``start.data``, continue at ``start_step``, dump
    every ``md.dump_every`` steps (id type xu yu zu vx vy vz σ_i σ_epi,i σ_rel,i d_i), halt when the max of
    the σ ``md.halt_on`` names > threshold, ``run n_steps upto``, ``write_data end.data``."""
    number = lammps_number
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
        f"variable maxsig equal {HALT_MAXIMA[md.halt_on]}",
    ]
    if first_segment and md.temperature > 0:
        lines.append(f"velocity all create {number(md.temperature)} {segment_seed} mom yes "
                     f"rot {'yes' if molecule else 'no'} dist gaussian")
    lines.append("fix integrate all nve")
    if md.thermostat == "langevin":
        lines.append(f"fix thermostat all langevin {number(md.temperature)} {number(md.temperature)} "
                     f"{number(md.damping)} {segment_seed} zero yes")
    lines += [
        f"timestep {number(md.timestep)}",
        f"thermo {every}",
        # every maximum (total, epistemic, relative, feature); fix halt reads the one md.halt_on names (v_maxsig)
        "thermo_style custom step temp pe etotal c_ug[1] c_ug[6] c_ug[8] c_ug[9]",
        "thermo_modify format float %.10g",
        f"dump frames all custom {every} {DUMP_FILE} id type xu yu zu vx vy vz c_u[1] c_u[2] c_u[6] c_u[7]",
        "dump_modify frames sort id format float %.17g",
        # soft: the run ends normally at the halting step (its frame is dumped first)
        f"fix halt all halt {every} v_maxsig > {number(threshold)} error soft",
        f"run {int(md.n_steps)} upto",
        f"write_data {END_DATA} nocoeff",
    ]
    return "\n".join(lines) + "\n"


def run_md_segment(model_path, type_names: Sequence[str], md, threshold: float, workdir, start_data_text: str,
                   start_step: int, first_segment: bool, molecule: bool, segment_seed: int) -> Dict[str, Any]:
    """One MD segment in ``workdir``; returns {start_step, step_reached, halted, frames (dumped,
    as dicts of read_dump), max_sigma}. Halted: stopped by fix halt (before n_steps, or at
    n_steps with max σ over the threshold); σ is the one ``md.halt_on`` names."""
    workdir = Path(workdir)
    if workdir.exists():
        shutil.rmtree(workdir)  # a segment killed half-way reruns from its start
    workdir.mkdir(parents=True)
    (workdir / START_DATA).write_text(start_data_text)
    plugin = str(Path(plugin_directory()) / "bayesraceplugin.so") if md.ranks <= 1 else None
    (workdir / INPUT_FILE).write_text(md_input_text(model_path, type_names, md, threshold, start_step,
                                                    first_segment, molecule, segment_seed, plugin_load=plugin))
    run_input_file(workdir, INPUT_FILE, LOG_FILE, md.ranks)
    frames = read_dump(workdir / DUMP_FILE)
    header = (workdir / END_DATA).read_text().splitlines()[0]
    found = re.search(r"timestep = (\d+)", header)
    step_reached = int(found.group(1)) if found else frames[-1]["step"]
    last = frames[-1] if frames and frames[-1]["step"] == step_reached else None
    column = halting_column(md)
    last_sigma = frame_max_sigma(last, column) if last is not None else 0.0
    halted = step_reached < md.n_steps or last_sigma > threshold
    sigmas = [frame_max_sigma(f, column) for f in frames]
    return dict(start_step=int(start_step), step_reached=step_reached, halted=bool(halted), frames=frames,
                max_sigma=max(sigmas) if sigmas else None)


def last_trusted_frame(frames: Sequence[Dict[str, Any]], threshold: float,
                       column: str = HALT_COLUMNS["total"]) -> Dict[str, Any]:
    """The last dumped frame whose max σ (in ``column``) is at most ``threshold``; the first
    frame if none is."""
    trusted = [f for f in frames if frame_max_sigma(f, column) <= threshold]
    return trusted[-1] if trusted else frames[0]
