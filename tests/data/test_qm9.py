"""QM9 from a qm9pack-format CSV (bayesrace.data.write_qm9), on the 100-molecule fixture qm9_slice.csv.

The fixture is the header and first 100 rows of qm9pack 1.0.3's qm9_part1.csv, so CI needs no qm9pack.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase.units import Hartree
from bayesrace.data import QM9_TARGETS, QM9_UNITS, DataError, read_qm9_table, write_qm9

ROOT = Path(__file__).resolve().parents[2]
SLICE = Path(__file__).resolve().parent / "qm9_slice.csv"
ALL_TARGETS = ["U0", "U", "H", "G", "HOMO", "LUMO", "gap", "ZPVE", "Cv", "R2", "alpha", "mu"]
# the conversions, written out independently of the module's table
EXPECTED = {
    "U0": ("InternalEnergy_0K_au", Hartree, "eV", "sum"),
    "U": ("InternalEnergy_298K_au", Hartree, "eV", "sum"),
    "H": ("Enthalphy_298K_au", Hartree, "eV", "sum"),
    "G": ("GibbsFreeEnergy_298K_au", Hartree, "eV", "sum"),
    "HOMO": ("HOMO_au", Hartree, "eV", "mean"),
    "LUMO": ("LUMO_au", Hartree, "eV", "mean"),
    "gap": ("HOMO_LUMO_gap_au", Hartree, "eV", "mean"),
    "ZPVE": ("ZPVE_au", Hartree, "eV", "sum"),
    "Cv": ("Heatcapacity_Cv_cal_mol_K", 1.0, "cal/(mol K)", "sum"),
    "R2": ("R2_bohr2", 1.0, "bohr^2", "extent"),
    "alpha": ("Polarizability_bohr3", 1.0, "bohr^3", "sum"),
    "mu": ("Dipole_debye", 1.0, "Debye", "dipole"),
}


def csv_rows(path=SLICE) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def frames_by_index(out: Path, names=("train.xyz", "valid.xyz", "test.xyz")) -> dict:
    frames = {}
    for name in names:
        for atoms in ase.io.read(out / name, ":"):
            assert atoms.info["qm9_index"] not in frames
            frames[atoms.info["qm9_index"]] = atoms
    return frames


@pytest.fixture(scope="module")
def everything(tmp_path_factory):
    """All 100 fixture molecules with all 12 targets."""
    out = tmp_path_factory.mktemp("qm9_all")
    manifest = write_qm9(out, source=SLICE, seed=1, progress=False)
    return out, manifest


def test_target_table():
    assert list(QM9_TARGETS) == ALL_TARGETS
    for name, (column, factor, unit, pooling) in EXPECTED.items():
        target = QM9_TARGETS[name]
        assert (target.name, target.column, target.unit, target.pooling) == (name, column, unit, pooling)
        assert target.factor == pytest.approx(factor, rel=1e-15)
        assert target.extensive == (pooling == "sum")
    assert Hartree == pytest.approx(27.211386, rel=1e-7)


def test_methane_in_ev(everything):
    out, _ = everything
    methane = frames_by_index(out)[1]
    assert methane.get_chemical_symbols() == ["C", "H", "H", "H", "H"]
    assert methane.info["smiles"] == "C"
    assert not methane.pbc.any() and not methane.cell.any()
    assert methane.positions[0] == pytest.approx([-0.0126981359, 1.0858041578, 0.0080009958], abs=1e-8)
    assert methane.info["U0"] == pytest.approx(-40.47893 * Hartree, rel=1e-12)
    assert methane.info["U0"] == pytest.approx(-1101.4877, abs=1e-3)
    assert methane.info["HOMO"] == pytest.approx(-0.3877 * Hartree, rel=1e-12)
    assert methane.info["gap"] == pytest.approx(0.5048 * Hartree, rel=1e-12)
    assert methane.info["mu"] == 0.0
    assert methane.info["Cv"] == pytest.approx(6.469)
    assert methane.info["alpha"] == pytest.approx(13.21)
    assert methane.info["R2"] == pytest.approx(35.3641)


def test_every_value_matches_the_csv(everything):
    out, manifest = everything
    rows = csv_rows()
    frames = frames_by_index(out)
    assert sorted(frames) == [int(row["Index"]) for row in rows]
    for row in rows:
        atoms = frames[int(row["Index"])]
        assert atoms.info["smiles"] == row["SMILES"]
        assert len(atoms) == int(row["N_atoms"])
        symbols = [s.strip().strip("'") for s in row["Elements"].strip("[]").split(",")]
        assert atoms.get_chemical_symbols() == symbols
        positions = np.array([[float(x) for x in t.split(",")] for t in row["XYZ_Ang"][2:-2].split("],[")])
        np.testing.assert_allclose(atoms.positions, positions, rtol=0, atol=1e-8)
        for name, (column, factor, _, _) in EXPECTED.items():
            assert atoms.info[name] == pytest.approx(float(row[column]) * factor, rel=1e-13, abs=1e-15), (row["Index"], name)
    assert manifest["units"] == QM9_UNITS
    assert QM9_UNITS == "energies in eV, Cv in cal/(mol K), R2 in bohr^2, alpha in bohr^3, mu in Debye"
    assert manifest["targets"]["U0"]["unit"] == "eV" and manifest["targets"]["mu"]["pooling"] == "dipole"
    assert manifest["source"]["molecules"] == 100 and manifest["n"] == 100


def test_split_sizes_disjoint_and_manifest(tmp_path):
    manifest = write_qm9(tmp_path, n=50, source=SLICE, seed=3, progress=False)
    sizes = {name: len(ase.io.read(tmp_path / name, ":")) for name in ("train.xyz", "valid.xyz", "test.xyz")}
    assert sizes == {"train.xyz": 40, "valid.xyz": 5, "test.xyz": 5}
    assert {name: entry["frames"] for name, entry in manifest["files"].items()} == sizes
    assert manifest["split"]["train"] == 40 and manifest["split"]["valid"] == 5 and manifest["split"]["test"] == 5
    indices = [{a.info["qm9_index"] for a in ase.io.read(tmp_path / name, ":")} for name in sizes]
    assert len(set.union(*indices)) == 50
    assert not (indices[0] & indices[1] or indices[0] & indices[2] or indices[1] & indices[2])
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk == manifest and on_disk["seed"] == 3 and on_disk["n"] == 50
    assert on_disk["source"]["files"][0]["bytes"] == SLICE.stat().st_size
    small = write_qm9(tmp_path / "three", n=3, source=SLICE, progress=False)
    assert [entry["frames"] for entry in small["files"].values()] == [1, 1, 1]


def test_target_selection(tmp_path):
    manifest = write_qm9(tmp_path, n=10, targets=["gap", "U0"], source=SLICE, progress=False)
    assert list(manifest["targets"]) == ["U0", "gap"]  # canonical order
    for atoms in ase.io.read(tmp_path / "train.xyz", ":"):
        assert set(atoms.info) == {"qm9_index", "smiles", "U0", "gap"}
    table = read_qm9_table(SLICE, targets="mu")
    assert table.targets == ("mu",) and table.values.shape == (100, 1) and len(table) == 100
    with pytest.raises(DataError, match=r"unknown QM9 target\(s\) 'energy', 'homo'; valid: U0, U, H, G, HOMO"):
        write_qm9(tmp_path / "bad", targets=["U0", "energy", "homo"], source=SLICE, progress=False)


def test_same_seed_same_bytes(tmp_path):
    for name in ("a", "b"):
        write_qm9(tmp_path / name, n=30, seed=7, source=SLICE, progress=False)
    write_qm9(tmp_path / "c", n=30, seed=8, source=SLICE, progress=False)
    for name in ("train.xyz", "valid.xyz", "test.xyz", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "train.xyz").read_bytes() != (tmp_path / "c" / "train.xyz").read_bytes()


def test_bad_n(tmp_path):
    with pytest.raises(DataError, match="n=101 but the source has 100 molecules"):
        write_qm9(tmp_path, n=101, source=SLICE, progress=False)
    with pytest.raises(DataError, match="at least 3"):
        write_qm9(tmp_path, n=2, source=SLICE, progress=False)


def broken_copy(tmp_path, row: int, column: str, value: str) -> Path:
    """The fixture with ``column`` of data row ``row`` (1-based) replaced by ``value``."""
    with open(SLICE, newline="") as handle:
        lines = list(csv.reader(handle))
    lines[row][lines[0].index(column)] = value
    path = tmp_path / "bad.csv"
    with open(path, "w", newline="") as handle:
        csv.writer(handle, quoting=csv.QUOTE_MINIMAL).writerows(lines)
    return path


@pytest.mark.parametrize(
    "column, value, message",
    [
        ("XYZ_Ang", "[[0.1,0.2,0.3],[0.4,0.5]]", "atom 1 has 2 coordinates"),
        ("XYZ_Ang", "[[0.1,0.2,0.3],[0.4,0.5,x]]", "could not convert"),
        ("XYZ_Ang", "0.1 0.2 0.3", "expected a list of"),
        ("Elements", "['C','Q','H']", "unknown element 'Q'"),
        ("HOMO_au", "", "could not convert"),
        ("Dipole_debye", "nan", "not finite"),
        ("N_atoms", "4", "N_atoms is 4"),
    ],
)
def test_malformed_row_names_file_row_and_column(tmp_path, column, value, message):
    bad = broken_copy(tmp_path, 7, column, value)
    with pytest.raises(DataError, match=message) as error:
        write_qm9(tmp_path / "out", n=10, source=bad, progress=False)
    assert f"bad.csv, row 7 (line 8), column '{column}'" in str(error.value)
    assert not (tmp_path / "out" / "train.xyz").exists()


def test_missing_column_and_short_row(tmp_path):
    lines = SLICE.read_text().splitlines(keepends=True)
    header = lines[0].rstrip("\n").split(",")
    drop = header.index("HOMO_au")
    no_homo = tmp_path / "no_homo.csv"
    with open(no_homo, "w", newline="") as handle:
        writer = csv.writer(handle)
        for row in csv.reader(lines):
            writer.writerow(row[:drop] + row[drop + 1 :])
    with pytest.raises(DataError, match=r"no_homo.csv: missing column\(s\) 'HOMO_au'"):
        read_qm9_table(no_homo)
    assert read_qm9_table(no_homo, targets=["U0", "LUMO"]).values.shape == (100, 2)  # HOMO not needed
    short = tmp_path / "short.csv"
    short.write_text("".join(lines[:5]) + "1,2,3\n")
    with pytest.raises(DataError, match=r"short.csv, row 5 \(line 6\): 3 fields, expected 25"):
        read_qm9_table(short)
    with pytest.raises(DataError, match="file not found"):
        read_qm9_table(tmp_path / "nowhere.csv")


def test_missing_package_says_how_to_install(tmp_path, monkeypatch):
    original = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "qm9pack" else original(name, *a))
    with pytest.raises(DataError, match="pip install qm9pack"):
        write_qm9(tmp_path, n=10, progress=False)


def test_cli(tmp_path):
    out = tmp_path / "qm9"
    env = {"PYTHONPATH": str(ROOT / "python"), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "bayesrace.cli", "data", "qm9", "--out", str(out), "--n", "50", "--source",
               str(SLICE), "--quiet"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"{out / 'train.xyz'}: 40 frames", f"{out / 'valid.xyz'}: 5 frames",
                                          f"{out / 'test.xyz'}: 5 frames"]
    assert result.stderr == ""
    bad = subprocess.run(command + ["--targets", "U0", "enthalpy"], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=600, check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "unknown QM9 target(s) 'enthalpy'" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(importlib.util.find_spec("qm9pack") is None, reason="qm9pack is not installed (CI reads the fixture)")
def test_packaged_table_first_rows(tmp_path):
    # qm9pack's __init__ imports pkg_resources, so find the data files without importing it
    from bayesrace.data._qm9 import qm9pack_files

    parts = qm9pack_files()
    assert [p.name for p in parts] == ["qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv"]
    with open(parts[0]) as handle:
        head = [next(handle) for _ in range(21)]
    assert head[0].strip().split(",") == SLICE.read_text().splitlines()[0].split(",")
    first = tmp_path / "first.csv"
    first.write_text("".join(head))
    table = read_qm9_table(first)
    assert len(table) == 20 and table.index[0] == 1 and table.smiles[0] == "C"
    assert table.values[0, ALL_TARGETS.index("U0")] == pytest.approx(-40.47893 * Hartree)
