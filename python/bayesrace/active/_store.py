"""Labelled structures: the crash-safe ``labelled.xyz`` of a run, the labelled ASE Atoms every
oracle returns, and each round's training file.

``labelled.xyz`` grows one frame at a time (appended as a single write, flushed and fsynced;
``pool_index`` and ``al_round`` in the comment line), so a killed run relabels nothing; a
frame cut off by the kill is dropped when the file is read again.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np

from .._files import atomic_path

LABELLED_FILE = "labelled.xyz"
POOL_INDEX = "pool_index"  # atoms.info key of a labelled frame's index in the pool file
AL_ROUND = "al_round"  # atoms.info key: the first round that trains on the frame


def labelled_atoms(atoms, energy: float, forces: np.ndarray):
    """A bare copy of ``atoms`` (numbers, positions, cell, pbc, info) with its labels."""
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    labelled = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    labelled.info.update(atoms.info)
    labelled.calc = SinglePointCalculator(labelled, energy=float(energy),
                                          forces=np.asarray(forces, dtype=np.float64).reshape(-1, 3))
    return labelled


def frame_atoms(frame, index: Optional[int] = None):
    """A bare ASE Atoms of a data Frame (numbers, positions, cell, pbc); ``index``: its pool index."""
    from ase import Atoms

    atoms = Atoms(numbers=frame.numbers, positions=frame.positions, cell=frame.cell, pbc=frame.pbc)
    if index is not None:
        atoms.info[POOL_INDEX] = int(index)
    return atoms


def append_frame(path: Path, atoms) -> None:
    """Append one frame as a single write, flushed and fsynced."""
    import io

    import ase.io

    buffer = io.StringIO()
    ase.io.write(buffer, atoms, format="extxyz")
    with open(path, "a") as handle:
        handle.write(buffer.getvalue())
        handle.flush()
        os.fsync(handle.fileno())


def read_labelled(path: Path) -> Dict[int, Any]:
    """{pool index: labelled Atoms} of the complete frames of ``path``; a frame cut off by a
    kill (the file's tail) is removed from the file."""
    import io

    import ase.io

    if not path.is_file():
        return {}
    lines = path.read_text().splitlines(keepends=True)
    position, complete = 0, 0
    while position < len(lines):
        try:
            count = int(lines[position].strip())
        except ValueError:
            break
        if position + 2 + count > len(lines) or not lines[position + 1 + count].endswith("\n"):
            break
        position += 2 + count
        complete = position
    if complete < len(lines):
        path.write_text("".join(lines[:complete]))
    if complete == 0:
        return {}
    frames = ase.io.read(io.StringIO("".join(lines[:complete])), index=":", format="extxyz")
    return {int(atoms.info[POOL_INDEX]): atoms for atoms in frames}


def write_training_file(path: Path, labelled: Sequence, energy_key: str, forces_key: str) -> None:
    """extxyz with the labels under the training config's keys (written once per round)."""
    import ase.io
    from ase import Atoms

    frames = []
    for atoms in labelled:
        energy, forces = atoms.get_potential_energy(), atoms.get_forces(apply_constraint=False)
        copy = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        copy.info.update({k: v for k, v in atoms.info.items() if k not in (energy_key, forces_key)})
        if (energy_key, forces_key) == ("energy", "forces"):
            from ase.calculators.singlepoint import SinglePointCalculator

            copy.calc = SinglePointCalculator(copy, energy=energy, forces=forces)
        else:
            copy.info[energy_key] = energy
            copy.arrays[forces_key] = np.asarray(forces)
        frames.append(copy)
    with atomic_path(path) as tmp:
        ase.io.write(tmp, frames, format="extxyz")
