"""Reading what LAMMPS writes: ``dump custom`` frames (as arrays or ASE structures) and the
thermo table of a log."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np

MD_STEP = "md_step"  # atoms.info: the MD step of a dumped frame
MAX_SIGMA = "max_force_std"  # atoms.info: its largest calibrated atomic force σ (eV/Å)


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


def dump_frame_atoms(frame: Dict[str, Any], type_names: Sequence[str], molecule: bool, column: str = "c_u[1]"):
    """An ASE Atoms of a dumped frame (unwrapped positions; a molecule without cell and pbc),
    with info md_step and max_force_std and array force_std (the per-atom σ's of ``column``:
    the total force σ by default)."""
    from ase import Atoms

    columns = frame["columns"]
    symbols = [type_names[int(t) - 1] for t in columns["type"]]
    positions = np.stack([columns["xu"], columns["yu"], columns["zu"]], axis=1)
    if molecule:
        atoms = Atoms(symbols=symbols, positions=positions)
    else:
        lengths = frame["box"][:, 1] - frame["box"][:, 0]
        atoms = Atoms(symbols=symbols, positions=positions - frame["box"][:, 0], cell=np.diag(lengths), pbc=True)
    sigma = columns[column]
    atoms.info[MD_STEP] = int(frame["step"])
    atoms.info[MAX_SIGMA] = float(sigma.max())
    atoms.arrays["force_std"] = np.asarray(sigma, dtype=np.float64)
    return atoms


def parse_thermo(log_text: str) -> Dict[str, List[float]]:
    """The thermo table of the last run in a LAMMPS log, as {column: values}."""
    lines = log_text.splitlines()
    starts = [k for k, line in enumerate(lines) if line.split()[:1] == ["Step"]]
    if not starts:
        return {}
    header = lines[starts[-1]].split()
    table: Dict[str, List[float]] = {name: [] for name in header}
    for line in lines[starts[-1] + 1 :]:
        if line.startswith("Loop time"):
            break
        fields = line.split()
        try:
            values = [float(v) for v in fields]
        except ValueError:
            continue  # e.g. the fix halt message printed before the last row
        if len(values) == len(header):
            for name, value in zip(header, values):
                table[name].append(value)
    return table
