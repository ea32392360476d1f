"""QM9 from the ``qm9pack`` table: molecules and their 12 properties, in eV and Å.

``qm9pack`` (PyPI, MIT) ships QM9 as three CSV files, ``qm9pack/data/qm9_part{1,2,3}.csv``
(130 831 molecules: the 133 885 of QM9 less the 3 054 that failed its geometry
consistency check), one molecule a row, coordinates as a string ``"[[x,y,z],...]"`` in Å
and properties in atomic units. ``read_qm9_table`` reads such CSVs with the standard
library (no pandas, and not qm9pack's own ``get_data``, which needs ``pkg_resources``);
``write_qm9`` draws molecules at random and writes them as extended XYZ, split
train/valid/test, with the chosen properties converted (``QM9_TARGETS``) in
``atoms.info``. Every problem with a table raises ``DataError`` naming the file, the row
and the column.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase.units import Hartree

from ._frames import DataError

__all__ = [
    "QM9_FILES",
    "QM9_TARGETS",
    "QM9_UNITS",
    "Qm9Table",
    "Qm9Target",
    "qm9pack_files",
    "read_qm9_table",
    "write_qm9",
]


@dataclass(frozen=True)
class Qm9Target:
    """One QM9 property: where it is in the table and how it is converted.

    ``value = factor * table value``, in ``unit``. ``pooling`` says how a per-atom readout
    becomes the molecular value: ``"sum"`` (extensive), ``"mean"`` (intensive), ``"extent"``
    (⟨R²⟩: per-atom terms weighted by |r_i − r̄|², see ``bayesrace.properties``) or ``"dipole"`` (a vector readout whose norm is compared with |μ|; the table has |μ| only).
    """

    name: str
    column: str
    source_unit: str
    factor: float
    unit: str
    pooling: str
    description: str

    @property
    def extensive(self) -> bool:
        return self.pooling == "sum"


def _target(name, column, source_unit, factor, unit, pooling, description) -> tuple[str, Qm9Target]:
    return name, Qm9Target(name, column, source_unit, float(factor), unit, pooling, description)


# Hartree in eV: ASE's CODATA value (ase.units.Hartree).
QM9_TARGETS: dict[str, Qm9Target] = dict(
    [
        _target("U0", "InternalEnergy_0K_au", "Ha", Hartree, "eV", "sum", "internal energy at 0 K"),
        _target("U", "InternalEnergy_298K_au", "Ha", Hartree, "eV", "sum", "internal energy at 298.15 K"),
        _target("H", "Enthalphy_298K_au", "Ha", Hartree, "eV", "sum", "enthalpy at 298.15 K"),
        _target("G", "GibbsFreeEnergy_298K_au", "Ha", Hartree, "eV", "sum", "free energy at 298.15 K"),
        _target("HOMO", "HOMO_au", "Ha", Hartree, "eV", "mean", "energy of the HOMO"),
        _target("LUMO", "LUMO_au", "Ha", Hartree, "eV", "mean", "energy of the LUMO"),
        _target("gap", "HOMO_LUMO_gap_au", "Ha", Hartree, "eV", "mean", "LUMO - HOMO gap"),
        _target("ZPVE", "ZPVE_au", "Ha", Hartree, "eV", "sum", "zero-point vibrational energy"),
        _target("Cv", "Heatcapacity_Cv_cal_mol_K", "cal/(mol K)", 1.0, "cal/(mol K)", "sum",
                "heat capacity at 298.15 K"),
        _target("R2", "R2_bohr2", "bohr^2", 1.0, "bohr^2", "extent", "electronic spatial extent <R^2>"),
        _target("alpha", "Polarizability_bohr3", "bohr^3", 1.0, "bohr^3", "sum", "isotropic polarizability"),
        _target("mu", "Dipole_debye", "Debye", 1.0, "Debye", "dipole", "norm of the dipole moment |mu|"),
    ]
)
QM9_UNITS = "energies in eV, Cv in cal/(mol K), R2 in bohr^2, alpha in bohr^3, mu in Debye"
QM9_FILES = ("train.xyz", "valid.xyz", "test.xyz")
QM9PACK_CSVS = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")
_STRUCTURE_COLUMNS = ("Index", "SMILES", "N_atoms", "Elements", "XYZ_Ang")
_VALID_FRACTION = 0.1  # and the same for test; train gets the rest


# --------------------------------------------------------------------------------------
# the table


@dataclass
class Qm9Table:
    """QM9 molecules as read from the CSV(s): one entry per row, in file order."""

    sources: list[Path]
    targets: tuple[str, ...]  # canonical names, in QM9_TARGETS order
    index: np.ndarray  # [M] int64, the QM9 molecule number (dsgdb9nsd_NNNNNN)
    smiles: list[str]
    numbers: list[np.ndarray]  # [N] int64 atomic numbers, one array per molecule
    positions: list[np.ndarray]  # [N, 3] float64, Å
    values: np.ndarray  # [M, len(targets)] float64, converted to the targets' units

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def atoms(self, row: int):
        """Row ``row`` as a non-periodic ``ase.Atoms`` with qm9_index, smiles and the targets in ``info``."""
        import ase

        info = {"qm9_index": int(self.index[row]), "smiles": self.smiles[row]}
        info.update((name, float(value)) for name, value in zip(self.targets, self.values[row]))
        return ase.Atoms(numbers=self.numbers[row], positions=self.positions[row], pbc=False, info=info)


def select_targets(targets: str | Sequence[str] | None) -> tuple[str, ...]:
    """Canonical target names, in ``QM9_TARGETS`` order; all 12 for None; ``DataError`` on unknown names."""
    if targets is None:
        return tuple(QM9_TARGETS)
    chosen = [targets] if isinstance(targets, str) else list(targets)
    unknown = [name for name in chosen if name not in QM9_TARGETS]
    if unknown:
        raise DataError(f"unknown QM9 target(s) {', '.join(map(repr, unknown))}; valid: {', '.join(QM9_TARGETS)}")
    if not chosen:
        raise DataError(f"no QM9 targets chosen; valid: {', '.join(QM9_TARGETS)}")
    return tuple(name for name in QM9_TARGETS if name in chosen)


def qm9pack_files() -> list[Path]:
    """The three CSVs inside the installed ``qm9pack`` package (found without importing it)."""
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "QM9 is read from the 'qm9pack' package, which is not installed: pip install qm9pack "
            "(about 100 MB), or pass a CSV in its format as source (--source)"
        )
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    missing = [name for name in QM9PACK_CSVS if not (data / name).is_file()]
    if missing:
        raise DataError(f"the qm9pack package at {data.parent} lacks {', '.join(missing)}; "
                        "reinstall it (pip install --force-reinstall qm9pack)")
    return [data / name for name in QM9PACK_CSVS]


def _source_files(source) -> list[Path]:
    if source is None:
        return qm9pack_files()
    paths = [Path(source)] if isinstance(source, (str, os.PathLike)) else [Path(p) for p in source]
    if not paths:
        raise DataError("no QM9 source files given")
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path}: file not found (looked for {path.absolute()})")
    return paths


def _parse_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        if "*^" not in text:
            raise
        value = float(text.replace("*^", "e"))  # the original QM9 files write 1.2*^-6
    if not math.isfinite(value):
        raise ValueError(f"{value} is not finite")
    return value


@functools.lru_cache(maxsize=65536)  # molecules share element lists; the arrays are read-only
def _parse_elements(text: str) -> np.ndarray:
    from ase.data import atomic_numbers

    body = text.strip()
    if not (body.startswith("[") and body.endswith("]")) or len(body) < 3:
        raise ValueError("expected a list of element symbols like ['C','H']")
    numbers = []
    for item in body[1:-1].split(","):
        symbol = item.strip().strip("'\"")
        if symbol not in atomic_numbers or symbol == "X":
            raise ValueError(f"unknown element {symbol!r}")
        numbers.append(atomic_numbers[symbol])
    numbers = np.asarray(numbers, dtype=np.int64)
    numbers.flags.writeable = False
    return numbers


def _parse_positions(text: str) -> np.ndarray:
    body = "".join(text.split())
    if not (body.startswith("[[") and body.endswith("]]")):
        raise ValueError("expected a list of [x,y,z] triples like [[0.1,0.2,0.3],...]")
    inner = body[2:-2]
    flat = inner.replace("],[", ",").split(",")
    atoms = inner.count("],[") + 1
    if len(flat) == 3 * atoms:
        try:  # the fast path: numpy converts the strings
            positions = np.array(flat, dtype=np.float64).reshape(atoms, 3)
            if np.isfinite(positions).all():
                return positions
        except ValueError:
            pass
    rows = []  # the slow path says what is wrong
    for atom, triple in enumerate(inner.split("],[")):
        parts = triple.split(",")
        if len(parts) != 3:
            raise ValueError(f"atom {atom} has {len(parts)} coordinates ({triple!r}), expected 3")
        rows.append([_parse_float(part) for part in parts])
    return np.asarray(rows, dtype=np.float64)


def _read_csv(path: Path, targets: tuple[str, ...], out: dict) -> int:
    """Appends the rows of one CSV to the lists in ``out``; returns the number of rows."""
    columns = list(_STRUCTURE_COLUMNS) + [QM9_TARGETS[name].column for name in targets]
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader, None)
        except (csv.Error, UnicodeDecodeError) as error:
            raise DataError(f"{path}: unreadable header ({error})") from None
        if not header:
            raise DataError(f"{path}: empty file (expected a header line and one molecule a row)")
        header = [name.strip() for name in header]
        missing = [name for name in columns if name not in header]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(map(repr, missing))} (the header has "
                            f"{', '.join(header)}); expected qm9pack's format")
        where = [header.index(name) for name in columns]
        rows = 0
        while True:
            try:
                row = next(reader, None)
            except (csv.Error, UnicodeDecodeError) as error:
                raise DataError(f"{path}, row {rows + 1} (line {reader.line_num}): unreadable CSV ({error})") from None
            if row is None:
                break
            if not row:  # a blank line
                continue
            rows += 1
            place = f"{path}, row {rows} (line {reader.line_num})"
            if len(row) != len(header):
                raise DataError(f"{place}: {len(row)} fields, expected {len(header)} as in the header")
            column = value = ""
            try:
                fields = {}
                for column, k in zip(columns, where):
                    value = row[k]
                    if column in ("Index", "N_atoms"):
                        fields[column] = int(value)
                    elif column == "Elements":
                        fields[column] = _parse_elements(value)
                    elif column == "XYZ_Ang":
                        fields[column] = _parse_positions(value)
                    elif column == "SMILES":
                        fields[column] = value.strip()
                    else:
                        fields[column] = _parse_float(value)
                numbers, positions = fields["Elements"], fields["XYZ_Ang"]
                if len(numbers) != fields["N_atoms"] or len(positions) != fields["N_atoms"]:
                    column, value = "N_atoms", row[where[columns.index("N_atoms")]]
                    raise ValueError(f"N_atoms is {fields['N_atoms']} but Elements has {len(numbers)} and "
                                     f"XYZ_Ang {len(positions)} atoms")
            except ValueError as error:
                shown = value if len(value) <= 80 else value[:77] + "..."
                raise DataError(f"{place}, column '{column}': {error} (value {shown!r})") from None
            out["index"].append(fields["Index"])
            out["smiles"].append(fields["SMILES"])
            out["numbers"].append(numbers)
            out["positions"].append(positions)
            out["values"].append([fields[QM9_TARGETS[name].column] * QM9_TARGETS[name].factor for name in targets])
    return rows


def read_qm9_table(source=None, targets: str | Sequence[str] | None = None, progress: bool = False) -> Qm9Table:
    """Reads QM9 from ``source`` (a CSV path or a list of them, in qm9pack's format) or from the
    installed ``qm9pack`` package (None), keeping the chosen targets (all 12 for None), converted."""
    chosen = select_targets(targets)
    paths = _source_files(source)
    out = {"index": [], "smiles": [], "numbers": [], "positions": [], "values": []}
    started = time.perf_counter()
    for path in paths:
        rows = _read_csv(path, chosen, out)
        if progress:
            print(f"qm9: read {path.name} ({rows} molecules, {time.perf_counter() - started:.1f} s)",
                  file=sys.stderr, flush=True)
    index = np.asarray(out["index"], dtype=np.int64)
    unique, counts = np.unique(index, return_counts=True)
    if np.any(counts > 1):
        raise DataError(f"{', '.join(map(str, paths))}: molecule Index {int(unique[counts > 1][0])} appears "
                        f"{int(counts[counts > 1][0])} times")
    values = np.asarray(out["values"], dtype=np.float64).reshape(len(index), len(chosen))
    return Qm9Table(paths, chosen, index, out["smiles"], out["numbers"], out["positions"], values)


# --------------------------------------------------------------------------------------
# the data set


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _split_sizes(n: int) -> tuple[int, int, int]:
    n_valid = max(1, round(n * _VALID_FRACTION))
    return n - 2 * n_valid, n_valid, n_valid


def _qm9pack_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qm9pack")
    except PackageNotFoundError:
        return None


def write_qm9(out, n: int | None = None, targets: str | Sequence[str] | None = None, seed: int = 0, source=None,
              progress: bool = True) -> dict:
    """Writes a QM9 data set into ``out``: ``train.xyz``, ``valid.xyz``, ``test.xyz``, ``manifest.json``.

    ``n`` molecules (all for None, at least 3) are drawn at random under ``seed`` from
    ``source`` (a CSV in qm9pack's format, or the installed ``qm9pack`` package for None) and
    split 80/10/10. Each frame is a non-periodic molecule (positions in Å) with ``qm9_index``,
    ``smiles`` and the chosen targets (canonical names of ``QM9_TARGETS``, converted to their
    units) in ``atoms.info``; the frames of each file are in QM9 order. The same arguments give
    byte-identical files. Returns the manifest, whose ``"files"`` maps each file name to its
    frame count and sha256.
    """
    import ase
    import ase.io

    chosen = select_targets(targets)
    if n is not None and int(n) < 3:
        raise DataError(f"qm9: n must be at least 3 (one molecule each for train, valid and test), got {n}")
    table = read_qm9_table(source, chosen, progress=progress)
    total = len(table)
    n_draw = total if n is None else int(n)
    if n_draw > total:
        raise DataError(f"qm9: n={n_draw} but the source has {total} molecules")
    if n_draw < 3:
        raise DataError(f"qm9: the source has {total} molecules; at least 3 are needed (train, valid, test)")
    n_train, n_valid, n_test = _split_sizes(n_draw)
    drawn = np.random.default_rng(int(seed)).permutation(total)[:n_draw]
    parts = {
        "train.xyz": np.sort(drawn[:n_train]),
        "valid.xyz": np.sort(drawn[n_train : n_train + n_valid]),
        "test.xyz": np.sort(drawn[n_train + n_valid :]),
    }
    target_dir = Path(out)
    target_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, rows in parts.items():
        path = target_dir / name
        frames = [table.atoms(int(row)) for row in rows]
        ase.io.write(path, frames, format="extxyz")
        files[name] = {"frames": len(frames), "atoms": int(sum(len(f) for f in frames)), "sha256": _sha256(path)}
        if progress:
            print(f"qm9: wrote {path} ({len(frames)} molecules)", file=sys.stderr, flush=True)

    package = _qm9pack_version() if source is None else None
    manifest = {
        "data_set": "QM9 (B3LYP/6-31G(2df,p) geometries and properties of small organic molecules, CHONF)",
        "source": {
            "package": f"qm9pack {package}" if package else None,
            "files": [{"path": str(p), "bytes": p.stat().st_size, "sha256": _sha256(p)} for p in table.sources],
            "molecules": total,
        },
        "seed": int(seed),
        "n": n_draw,
        "targets": {
            name: {
                "column": QM9_TARGETS[name].column,
                "source_unit": QM9_TARGETS[name].source_unit,
                "factor": QM9_TARGETS[name].factor,
                "unit": QM9_TARGETS[name].unit,
                "pooling": QM9_TARGETS[name].pooling,
                "description": QM9_TARGETS[name].description,
            }
            for name in chosen
        },
        "units": QM9_UNITS,
        "positions": "Å, non-periodic (no cell)",
        "hartree_eV": float(Hartree),
        "ase_version": ase.__version__,
        "info_keys": ["qm9_index", "smiles", *chosen],
        "split": {
            "train": n_train,
            "valid": n_valid,
            "test": n_test,
            "rule": "a random permutation of the table's rows under the seed: its first n are drawn, "
            "the first 80% train, then 10% valid, 10% test; each file in QM9 order",
        },
        "files": files,
    }
    with open(target_dir / "manifest.json", "w") as handle:
        json.dump(manifest, handle, indent=2, ensure_ascii=False)
        handle.write("\n")
    return manifest
