"""MPI: 1, 2 and 4 ranks (the mpich wheel's mpirun) give the binding's numbers, including a
decomposition with empty subdomains, non-contiguous atom ids, and an MD run with neighbour
rebuilds and atom migration that must not depend on the number of ranks."""

from __future__ import annotations

import re

import numpy as np
import pytest

from cpp_fixtures import FILTERS

pytestmark = FILTERS

from cpp_fixtures import core, plugin_path, toy_dir, toy_model, toy_model_3layers  # noqa: E402,F401

from lmp_tools import (
    assert_same,
    lammps_input,
    molecule,
    parse_lammps_result,
    parse_tagged,
    periodic,
    reference_result,
    run_lmp,
    write_data,
)

STRUCTURES = {
    "molecule": lambda: molecule(n=12),
    "triclinic": lambda: periodic(triclinic=True),
}


@pytest.mark.parametrize("nprocs", [1, 2, 4])
@pytest.mark.parametrize("kind", list(STRUCTURES))
def test_mpi_matches_binding(core, plugin_path, toy_model, tmp_path, kind, nprocs):
    s = STRUCTURES[kind]()
    write_data(s, tmp_path / "data.lmp")
    rc, out = run_lmp(lammps_input(plugin_path, toy_model, s), tmp_path, nprocs=nprocs)
    assert rc == 0, out[-3000:]
    assert f"{nprocs} MPI tasks" in out or nprocs == 1
    assert_same(parse_lammps_result(tmp_path), reference_result(core, toy_model, s, 3.0))


def test_mpi_empty_subdomains(core, plugin_path, toy_model, tmp_path):
    """processors 4 1 1 with the molecule at one end: two ranks own nothing, one only ghosts."""
    s = molecule(n=12, origin=(1.0, 12.0, 12.0), box=40.0, span=4.0)
    write_data(s, tmp_path / "data.lmp")
    rc, out = run_lmp(lammps_input(plugin_path, toy_model, s, processors="processors 4 1 1"), tmp_path, nprocs=4)
    assert rc == 0, out[-3000:]
    nlocal = re.search(r"Nlocal:\s+(\S+) ave\s+(\S+) max\s+(\S+) min", out)
    assert nlocal and float(nlocal.group(3)) == 0.0, "expected an empty subdomain"
    assert_same(parse_lammps_result(tmp_path), reference_result(core, toy_model, s, 3.0))


def _md(plugin_path, toy_model, s, tmp_path, nprocs, processors=""):
    extra = (
        "neighbor 0.5 bin\nneigh_modify every 1 delay 0 check yes\n"
        "velocity all create 1500 7 loop geom\nfix nve all nve\ntimestep 0.001\n"
        "thermo 5\n"
        'fix out all print 5 "MD $(step) $(pe:%.17g) $(c_ug[1]:%.17g) $(c_ug[2]:%.17g) '
        '$(c_ug[3]:%.17g) $(c_ug[4]:%.17g) $(c_p[1]:%.17g) $(c_p[4]:%.17g)" screen yes'
    )
    inp = lammps_input(plugin_path, toy_model, s, dump=False, extra=extra, run="run 40", processors=processors)
    rc, out = run_lmp(inp, tmp_path / f"np{nprocs}", nprocs=nprocs)
    assert rc == 0, out[-3000:]
    builds = re.search(r"Neighbor list builds = (\d+)", out)
    return parse_tagged(out, "MD"), int(builds.group(1))


@pytest.mark.parametrize("kind", list(STRUCTURES))
def test_mpi_md_independent_of_ranks(plugin_path, toy_model, tmp_path, kind):
    s = STRUCTURES[kind]()
    write_data(s, tmp_path / "data.lmp")
    for n in (1, 2, 4):
        (tmp_path / f"np{n}").mkdir()
        (tmp_path / f"np{n}" / "data.lmp").write_text((tmp_path / "data.lmp").read_text())
    ref, builds = _md(plugin_path, toy_model, s, tmp_path, 1)
    assert len(ref) == 9 and builds > 0
    for n in (2, 4):
        got, _ = _md(plugin_path, toy_model, s, tmp_path, n)
        assert got.shape == ref.shape
        scale = np.abs(ref).max(0)
        np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-9 * scale.max(), err_msg=f"{n} ranks")
