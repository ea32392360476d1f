"""The PSB3 LAMMPS example: heat one molecule until the model says it does not know.

``write_psb3_example(workdir)`` writes ``in.psb3`` and ``psb3.data`` (the same files as
``examples/psb3/``); ``run_psb3_example(model, workdir)`` runs them under
``mpirun -np 2 lmp`` and returns what happened. The input needs no ``plugin load`` line:
LAMMPS finds the installed plugin through the ``lammps.plugins`` entry point.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Optional

from ._outputs import parse_thermo
from ._runner import run_lmp

DATA_FILE = "psb3.data"
INPUT_FILE = "in.psb3"
DUMP_FILE = "psb3_sigma.dump"
LOG_FILE = "log.psb3"
MASSES = {"H": 1.008, "C": 12.011, "N": 14.007}
TYPE_ORDER = ("H", "C", "N")  # LAMMPS types 1..3; pair_coeff maps them to the model by name
BOX = 40.0  # Å, periodic: images are 40 Å apart, far beyond the 2 x 5 Å interaction range

PSB3_INPUT = """\
# PSB3 (C5H8N+) heated by a Langevin ramp until the model is unsure: pair_style bayesrace
# with on-the-fly uncertainty. No 'plugin load' line: the installed plugin is found by LAMMPS.
#
#   mpirun -np 2 lmp -in in.psb3 -var model model.pt
#   mpirun -np 2 lmp -in in.psb3 -var model model.pt -var threshold 0.5 -var steps 4000
#
# threshold 0 (default) uses the deployable's own thresholds.atomic_force_std (eV/Å).

variable        model index model.pt
variable        threshold index 0
variable        steps index 2000
variable        t_start index 300
variable        t_stop index 3000
variable        every index 10

units           metal
# an isolated molecule: periodic images 40 Å away do not interact (range n_layers x cutoff),
# and no atom can be lost from the box when the hot molecule breaks apart
boundary        p p p
atom_style      atomic
read_data       psb3.data

pair_style      bayesrace
pair_coeff      * * ${model} H C N

# per atom: 1 force σ (total), 2 epistemic, 3 aleatoric, 4 atomic energy σ, 7 feature distance
compute         u  all bayesrace/atom
# global: 1 max force σ, 2 mean force σ, 3 energy σ, 4 atoms over the threshold,
# 9 max feature distance (how far from the training atoms' features; -1 without a density)
if "${threshold} > 0" then "compute ug all bayesrace threshold ${threshold}" else "compute ug all bayesrace"

velocity        all create ${t_start} 4928459 mom yes rot yes dist gaussian
fix             nve all nve
fix             heat all langevin ${t_start} ${t_stop} 0.05 48279 zero yes
timestep        0.0005

thermo          ${every}
thermo_style    custom step temp pe etotal c_ug[1] c_ug[2] c_ug[3] c_ug[4] c_ug[9]
thermo_modify   format float %.8g
dump            sigma all custom ${every} psb3_sigma.dump id type x y z c_u[1] c_u[2] c_u[3] c_u[4] c_u[7]

# stop (softly, the run ends normally) as soon as one atom's force σ exceeds the threshold
variable        nover equal c_ug[4]
fix             stop all halt ${every} v_nover > 0 error soft

run             ${steps}
"""


def psb3_data_text(box: float = BOX) -> str:
    """A LAMMPS data file of one PSB3 molecule (bayesrace.data.build_psb3) centred in a
    cubic box of ``box`` Å (examples/periodic uses a small one and replicates it)."""
    from ..data import build_psb3

    atoms = build_psb3()
    positions = atoms.positions - atoms.positions.mean(axis=0) + box / 2
    types = {symbol: k + 1 for k, symbol in enumerate(TYPE_ORDER)}
    lines = [
        "PSB3 (penta-2,4-dieniminium, C5H8N+), planar all-trans, from bayesrace.data.build_psb3()",
        "",
        f"{len(atoms)} atoms",
        f"{len(TYPE_ORDER)} atom types",
        "",
        f"0.0 {box} xlo xhi",
        f"0.0 {box} ylo yhi",
        f"0.0 {box} zlo zhi",
        "",
        "Masses",
        "",
        *[f"{types[s]} {MASSES[s]}  # {s}" for s in TYPE_ORDER],
        "",
        "Atoms # atomic",
        "",
    ]
    for k, (symbol, x) in enumerate(zip(atoms.get_chemical_symbols(), positions)):
        lines.append(f"{k + 1} {types[symbol]} {x[0]:.10f} {x[1]:.10f} {x[2]:.10f}")
    return "\n".join(lines) + "\n"


def write_psb3_example(workdir) -> Path:
    """Write in.psb3 and psb3.data into ``workdir``; returns the input's path."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / DATA_FILE).write_text(psb3_data_text())
    (workdir / INPUT_FILE).write_text(PSB3_INPUT)
    return workdir / INPUT_FILE


def run_psb3_example(
    model_path,
    workdir,
    nprocs: int = 2,
    threshold: Optional[float] = None,
    steps: int = 2000,
    timeout: float = 1800.0,
) -> Dict[str, object]:
    """Run the PSB3 heating example with ``mpirun -np nprocs lmp`` in ``workdir``.

    ``threshold`` (eV/Å) overrides the deployable's default force σ threshold. Returns
    ``steps_run``, ``halted``, ``halt_step``, ``max_force_std`` (largest max σ printed),
    ``max_feature_distance`` (largest c_ug[9] printed; -1 without a feature density),
    ``max_temperature``, ``thermo`` (the thermo table), ``dump``, ``log`` and ``input``.
    Raises RuntimeError with the end of LAMMPS' output if the run fails.
    """
    workdir = Path(workdir)
    model_path = Path(model_path).resolve()
    if not model_path.is_file():
        raise FileNotFoundError(f"{model_path}: no such deployable (write one with bayesrace-export)")
    input_path = write_psb3_example(workdir)
    arguments = ["-in", INPUT_FILE, "-log", LOG_FILE, "-nocite",
                 "-var", "model", str(model_path), "-var", "steps", str(int(steps)),
                 "-var", "threshold", repr(float(threshold)) if threshold is not None else "0"]
    output = run_lmp(arguments, workdir, nprocs, timeout=timeout).output
    log_path = workdir / LOG_FILE
    thermo = parse_thermo(log_path.read_text() if log_path.exists() else output)
    halt = re.search(r"Fix halt condition for fix-id \S+ met on step (\d+)", output)
    sigma = thermo.get("c_ug[1]", [])
    temperature = thermo.get("Temp", [])
    return {
        "steps_run": int(thermo["Step"][-1]) if thermo.get("Step") else 0,
        "halted": halt is not None,
        "halt_step": int(halt.group(1)) if halt else None,
        "max_force_std": max(sigma) if sigma else None,
        "max_feature_distance": max(thermo["c_ug[9]"]) if thermo.get("c_ug[9]") else None,
        "max_temperature": max(temperature) if temperature else None,
        "thermo": thermo,
        "dump": workdir / DUMP_FILE,
        "log": log_path,
        "input": input_path,
    }


__all__ = ["PSB3_INPUT", "psb3_data_text", "run_psb3_example", "write_psb3_example"]
