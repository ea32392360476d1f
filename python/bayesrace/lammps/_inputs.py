"""LAMMPS data files of ASE structures (atom_style atomic), written at full precision."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def lammps_number(value) -> str:
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
    number = lammps_number
    lines = ["bayesrace on-the-fly MD start structure", "", f"{len(atoms)} atoms", f"{len(type_names)} atom types", ""]
    lines += [f"0.0 {number(lengths[d])} {axis}lo {axis}hi" for d, axis in enumerate("xyz")]
    lines += ["", "Masses", ""]
    lines += [f"{types[name]} {number(atomic_masses[atomic_numbers[name]])}  # {name}" for name in type_names]
    lines += ["", "Atoms # atomic", ""]
    lines += [f"{k + 1} {types[s]} {' '.join(map(number, x))}" for k, (s, x) in enumerate(zip(symbols, positions))]
    if velocities is not None:
        lines += ["", "Velocities", ""]
        lines += [f"{k + 1} {' '.join(map(number, v))}" for k, v in enumerate(np.asarray(velocities))]
    return "\n".join(lines) + "\n"
