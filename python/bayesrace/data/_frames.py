"""Reading and checking labelled structures: files in, checked ``Frame`` objects out.

The first step of the data pipeline: ``read_frames`` (files -> checked ``Frame`` objects,
numpy, float64), the ``TypeMap`` from elements to species indices and the per-element
reference energies. ``_graphs`` takes the frames on to neighbour lists and batches.
Every problem with the input raises ``DataError`` naming the file, the frame and the field.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

__all__ = [
    "DataError",
    "Frame",
    "TypeMap",
    "fit_reference_energies",
    "isolated_atom_energies",
    "read_frames",
]

# ASE (>= 3.23) moves these extxyz keys from atoms.info/atoms.arrays into calc.results.
_CALCULATOR_PROPERTIES = ("energy", "forces", "stress")
_XYZ_SUFFIXES = (".xyz", ".extxyz")


class DataError(ValueError):
    """Bad input data. The message names the file, the frame (0-based) and the field."""


@dataclass
class Frame:
    """One labelled structure, as read from a file and checked."""

    numbers: np.ndarray  # [N] int64, atomic numbers
    positions: np.ndarray  # [N, 3] float64, Å
    cell: np.ndarray  # [3, 3] float64, Å, rows are lattice vectors; zeros if non-periodic
    pbc: np.ndarray  # [3] bool
    energy: float | None = None  # eV
    forces: np.ndarray | None = None  # [N, 3] float64, eV/Å
    stress: np.ndarray | None = None  # [3, 3] float64, eV/Å^3, ASE sign
    source: str = ""  # "file.xyz, frame 12"
    info: dict = field(default_factory=dict)  # other per-frame info (config_type, ...)

    @property
    def num_atoms(self) -> int:
        return int(self.numbers.shape[0])


# --------------------------------------------------------------------------------------
# reading


def _field_error(source: str, field_name: str, message: str) -> DataError:
    return DataError(f"{source}: field '{field_name}' {message}")


def _lookup(atoms, key: str, per_atom: bool):
    """The value stored under ``key`` in info/arrays or the calculator results, or None."""
    store = atoms.arrays if per_atom else atoms.info
    if key in store:
        return store[key]
    if key in _CALCULATOR_PROPERTIES and atoms.calc is not None:
        results = getattr(atoms.calc, "results", {})
        if key in results:
            return results[key]
    return None


def _as_float_array(value, source: str, field_name: str) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise _field_error(source, field_name, f"is {value!r}, expected numbers") from None
    if not np.all(np.isfinite(array)):
        bad = np.argwhere(~np.isfinite(array))
        where = "" if array.ndim == 0 else f" at index {tuple(int(k) for k in bad[0])}"
        raise _field_error(
            source, field_name, f"contains a non-finite value{where} ({array[tuple(bad[0])]}), expected finite numbers"
        )
    return array


def _read_energy(atoms, key: str, source: str) -> float | None:
    value = _lookup(atoms, key, per_atom=False)
    if value is None:
        return None
    array = _as_float_array(value, source, key)
    if array.size != 1:
        raise _field_error(source, key, f"has shape {array.shape}, expected a single number")
    return float(array.reshape(()))


def _read_forces(atoms, key: str, source: str) -> np.ndarray | None:
    value = _lookup(atoms, key, per_atom=True)
    if value is None:
        return None
    array = _as_float_array(value, source, key)
    expected = (len(atoms), 3)
    if array.shape != expected:
        raise _field_error(source, key, f"has shape {array.shape}, expected {expected} (one row per atom)")
    return array


def _read_stress(atoms, key: str, source: str) -> np.ndarray | None:
    value = _lookup(atoms, key, per_atom=False)
    if value is None:
        return None
    array = _as_float_array(value, source, key)
    if array.shape == (6,):
        # Voigt order xx, yy, zz, yz, xz, xy (ASE)
        xx, yy, zz, yz, xz, xy = array
        array = np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    elif array.shape == (9,):
        array = array.reshape(3, 3)
    elif array.shape != (3, 3):
        raise _field_error(source, key, f"has shape {array.shape}, expected (3, 3), (9,) or Voigt (6,)")
    return array


def _check_cell(cell: np.ndarray, pbc: np.ndarray, source: str) -> None:
    for axis in range(3):
        if pbc[axis] and np.linalg.norm(cell[axis]) == 0.0:
            raise _field_error(
                source, "cell", f"has a zero lattice vector {axis}, expected a non-zero vector along periodic axis {axis}"
            )
    if pbc.all() and abs(np.linalg.det(cell)) < 1e-12:
        raise _field_error(source, "cell", "has zero volume, expected three independent lattice vectors")


def _vesin(cutoff: float, full_list: bool):
    import vesin

    # One thread: structures are small and many; threads only add start-up cost here.
    return vesin.NeighborList(cutoff=float(cutoff), full_list=full_list, algorithm="cell_list", n_threads=1)


def _too_close_error(
    i, j, shift, distance, min_distance: float, source: str, numbers=None, why: str = ""
) -> DataError | None:
    """The error naming the closest of the pairs (i, j, shift, distance) below ``min_distance`` Å.

    None when no pair is that close. With ``numbers`` the atoms' elements are named too,
    ``why`` is added in parentheses; without ``source`` the message starts at the field.
    """
    close = distance < min_distance
    if not close.any():
        return None
    i, j, shift, distance = i[close], j[close], shift[close], distance[close]
    worst = int(np.argmin(distance))
    a, b, d = int(i[worst]), int(j[worst]), float(distance[worst])
    if numbers is None:
        name_a, name_b = f"{a}", f"{b}"
    else:
        from ase.data import chemical_symbols

        name_a, name_b = (f"{k} ({chemical_symbols[int(numbers[k])]})" for k in (a, b))
    if a == b:
        what = f"atom {name_a} is {d:.4g} Å from its own periodic image (cell shift {shift[worst].tolist()})"
    elif np.any(shift[worst] != 0):
        what = (f"atoms {name_a} and {name_b} are {d:.4g} Å apart across the periodic boundary "
                f"(cell shift {shift[worst].tolist()})")
    else:
        what = f"atoms {name_a} and {name_b} are {d:.4g} Å apart"
    where = f"{source}: " if source else ""
    because = f" ({why})" if why else ""
    return DataError(f"{where}field 'positions' has {what}, expected at least {min_distance} Å between atoms{because}")


def _check_min_distance(positions, cell, pbc, min_distance: float, source: str) -> None:
    """Rejects atoms closer than ``min_distance`` Å, periodic images included."""
    # A cell list as fine as 0.1 Å has millions of cells; search bonds instead and filter.
    probe = max(float(min_distance), 1.0)
    i, j, shift, distance = _vesin(probe, full_list=False).compute(
        positions, cell, [bool(p) for p in pbc], quantities="ijSd", copy=True
    )
    error = _too_close_error(i, j, shift, distance, min_distance, source)
    if error is not None:
        raise error


def _guess_format(path: str) -> str:
    import ase.io.formats

    if path.lower().endswith(_XYZ_SUFFIXES):
        return "extxyz"
    try:
        return ase.io.formats.filetype(path)
    except Exception:
        return "extxyz"  # our default format; a parse error below names the file


def _locate_extxyz_error(path: str) -> tuple[int, str]:
    """(frame index, what is wrong) for an (ext)xyz file that ASE failed to read.

    ASE scans the whole file before yielding a frame, so its error does not say which
    frame is broken; on this error path only, the file is split into frames by their
    atom-count lines and each frame is parsed on its own.
    """
    import io

    import ase.io

    with open(path) as handle:
        lines = handle.readlines()
    frame, line = 0, 0
    while line < len(lines):
        if not lines[line].strip():  # blank lines between or after frames
            line += 1
            continue
        try:
            count = int(lines[line].split()[0])
        except ValueError:
            return frame, f"line {line + 1}: expected the number of atoms, got {lines[line].strip()[:60]!r}"
        end = line + 2 + count
        if end > len(lines):
            return frame, f"line {line + 1}: {count} atoms announced, but the file ends after {len(lines) - line - 2}"
        try:
            ase.io.read(io.StringIO("".join(lines[line:end])), format="extxyz", parallel=False)
        except Exception as error:
            return frame, f"lines {line + 1}-{end}: {type(error).__name__}: {error}"
        frame, line = frame + 1, end
    return frame, "no broken frame found on a second reading"


def _selected_indices(index, count: int) -> list[int]:
    from ase.io.formats import string2index

    if isinstance(index, str):
        index = string2index(index)
    positions = list(range(count))
    if isinstance(index, slice):
        return positions[index]
    return [positions[int(index)]]


def read_frames(
    path: str | os.PathLike,
    energy_key: str = "energy",
    forces_key: str = "forces",
    stress_key: str | None = None,
    index: str | int | slice = ":",
    require_energy: bool = True,
    require_forces: bool = True,
    min_distance: float | None = 0.1,
) -> list[Frame]:
    """Reads and checks every selected frame of a structure file.

    Anything ``ase.io.read`` reads works; ``.xyz``/``.extxyz`` and files whose format ASE
    cannot guess are read as extended XYZ. Labels are looked up by key in the comment
    line (``atoms.info``), the per-atom columns (``atoms.arrays``) and, for the standard
    names energy/forces/stress, in the results ASE stores in a calculator. Positions,
    cell and labels must be finite; no two atoms (periodic images included) may be closer
    than ``min_distance`` Å (``None`` or 0 switches the check off).
    """
    import ase.io

    name = os.fspath(path)
    if not os.path.exists(name):
        raise DataError(f"{name}: file not found (looked for {os.path.abspath(name)})")
    if os.path.isfile(name) and os.path.getsize(name) == 0:
        raise DataError(f"{name}: empty file (no frames)")

    fmt = _guess_format(name)
    all_atoms = []
    try:
        # parallel=False: under mpirun ASE would read on rank 0 and broadcast, a collective
        # that ranks reading at different times (or alone) never join
        for atoms in ase.io.iread(name, index=":", format=fmt, parallel=False):
            all_atoms.append(atoms)
    except Exception as error:
        frame_index, detail = len(all_atoms), ""
        if fmt == "extxyz":
            try:
                frame_index, where = _locate_extxyz_error(name)
                detail = f"; {where}"
            except Exception:  # e.g. not text at all: ASE's message says enough
                pass
        raise DataError(
            f"{name}, frame {frame_index}: cannot parse as {fmt} ({type(error).__name__}: {error}{detail})"
        ) from error
    if not all_atoms:
        raise DataError(f"{name}: empty file (no frames)")

    try:
        selected = _selected_indices(index, len(all_atoms))
    except (IndexError, ValueError) as error:
        raise DataError(f"{name}: index {index!r} does not select frames of {len(all_atoms)} ({error})") from None

    label_keys = {energy_key, forces_key} | ({stress_key} if stress_key else set())
    frames = []
    for frame_index in selected:
        atoms = all_atoms[frame_index]
        source = f"{name}, frame {frame_index}"
        if len(atoms) == 0:
            raise _field_error(source, "numbers", "is empty, expected at least one atom")

        positions = _as_float_array(atoms.positions, source, "positions")
        pbc = np.asarray(atoms.pbc, dtype=bool).reshape(3)
        cell = _as_float_array(atoms.cell.array, source, "cell")
        if not pbc.any():
            cell = np.zeros((3, 3))  # the contract: a non-periodic frame has a zero cell
        _check_cell(cell, pbc, source)

        energy = _read_energy(atoms, energy_key, source)
        if energy is None and require_energy:
            raise _field_error(
                source,
                energy_key,
                f"is missing, expected the total energy in eV (info keys present: {sorted(atoms.info)}; "
                "set energy_key or require_energy=False)",
            )
        forces = _read_forces(atoms, forces_key, source)
        if forces is None and require_forces:
            per_atom = sorted(k for k in atoms.arrays if k not in ("numbers", "positions"))
            raise _field_error(
                source,
                forces_key,
                f"is missing, expected per-atom forces in eV/Å (per-atom columns present: {per_atom}; "
                "set forces_key or require_forces=False)",
            )
        stress = _read_stress(atoms, stress_key, source) if stress_key else None

        if min_distance:
            _check_min_distance(positions, cell, pbc, min_distance, source)

        info = {k: v for k, v in atoms.info.items() if k not in label_keys}
        frames.append(
            Frame(
                numbers=np.asarray(atoms.numbers, dtype=np.int64).copy(),
                positions=positions.copy(),
                cell=cell.copy(),
                pbc=pbc.copy(),
                energy=energy,
                forces=None if forces is None else forces.copy(),
                stress=None if stress is None else stress.copy(),
                source=source,
                info=info,
            )
        )
    return frames


# --------------------------------------------------------------------------------------
# elements and reference energies


class TypeMap:
    """Maps atomic numbers to the model's species indices (the order of ``type_names``)."""

    def __init__(self, type_names: Sequence[str]):
        from ase.data import atomic_numbers

        names = list(type_names)
        if not names:
            raise ValueError("TypeMap needs at least one element")
        unknown = [n for n in names if n not in atomic_numbers or n == "X"]
        if unknown:
            raise ValueError(f"TypeMap: {unknown} are not element symbols")
        if len(set(names)) != len(names):
            raise ValueError(f"TypeMap: duplicate elements in {names}")
        self.type_names = names
        self.atomic_numbers = np.array([atomic_numbers[n] for n in names], dtype=np.int64)
        self._lookup = np.full(119, -1, dtype=np.int64)
        self._lookup[self.atomic_numbers] = np.arange(len(names), dtype=np.int64)

    @classmethod
    def from_frames(cls, frames: Sequence[Frame]) -> "TypeMap":
        """The elements present in ``frames``, sorted by atomic number."""
        from ase.data import chemical_symbols

        present = np.unique(np.concatenate([f.numbers for f in frames])) if frames else []
        return cls([chemical_symbols[int(z)] for z in present])

    @property
    def num_types(self) -> int:
        return len(self.type_names)

    def __len__(self) -> int:
        return len(self.type_names)

    def __eq__(self, other) -> bool:
        return isinstance(other, TypeMap) and self.type_names == other.type_names

    def __repr__(self) -> str:
        return f"TypeMap({self.type_names})"

    def species(self, numbers, source: str = "") -> np.ndarray:
        """Species indices [N] int64 for atomic numbers [N]; unknown elements raise DataError."""
        from ase.data import chemical_symbols

        numbers = np.asarray(numbers, dtype=np.int64)
        inside = (numbers >= 0) & (numbers < len(self._lookup))
        species = np.full(numbers.shape, -1, dtype=np.int64)
        species[inside] = self._lookup[numbers[inside]]
        missing = species < 0
        if missing.any():
            z = int(numbers[missing][0])
            symbol = chemical_symbols[z] if 0 <= z < len(chemical_symbols) else f"Z={z}"
            where = f"{source}: " if source else ""
            raise DataError(
                f"{where}field 'numbers' has element {symbol} (atom {int(np.argmax(missing))}), "
                f"expected one of the known elements {self.type_names}"
            )
        return species


def isolated_atom_energies(frames: Sequence[Frame]) -> dict[str, float]:
    """Energies (eV) of the non-periodic one-atom frames that carry an energy, by element."""
    from ase.data import chemical_symbols

    energies: dict[str, float] = {}
    sources: dict[str, str] = {}
    for frame in frames:
        if frame.num_atoms != 1 or frame.pbc.any() or frame.energy is None:
            continue
        symbol = chemical_symbols[int(frame.numbers[0])]
        if symbol in energies and not math.isclose(energies[symbol], frame.energy, rel_tol=0, abs_tol=1e-6):
            raise _field_error(
                frame.source,
                "energy",
                f"is {frame.energy} eV for an isolated {symbol} atom, expected the same value as "
                f"{sources[symbol]} ({energies[symbol]} eV)",
            )
        energies[symbol] = float(frame.energy)
        sources[symbol] = frame.source
    return energies


def fit_reference_energies(frames: Sequence[Frame], type_names: Sequence[str]) -> dict[str, float]:
    """Per-element energies (eV) whose composition-weighted sum best fits the frame energies.

    Solves ``counts @ e = energies`` by least squares (``np.linalg.lstsq``). When the
    compositions do not determine every element (rank deficiency, e.g. a data set of one
    molecule, or an element that never occurs), the minimum-norm solution is returned:
    the fitted total ``counts @ e`` is still the best fit, but individual values are only
    one of many equally good choices and an element absent from all frames gets 0.
    Frames without an energy are ignored.
    """
    type_map = TypeMap(type_names)
    labelled = [f for f in frames if f.energy is not None]
    if not labelled:
        raise DataError("fit_reference_energies: no frame has an energy")
    counts = np.zeros((len(labelled), len(type_map)), dtype=np.float64)
    for row, frame in enumerate(labelled):
        counts[row] = np.bincount(type_map.species(frame.numbers, frame.source), minlength=len(type_map))
    energies = np.array([f.energy for f in labelled], dtype=np.float64)
    solution, *_ = np.linalg.lstsq(counts, energies, rcond=None)
    return {name: float(value) for name, value in zip(type_map.type_names, solution)}
