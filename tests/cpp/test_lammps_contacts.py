"""The contact ratio in LAMMPS (compute bayesrace/atom column 5, compute bayesrace column 5)
equals the Python ASE calculator's ``contact_ratio`` on 1 and 2 ranks, periodic images and
triclinic cells included; a deployable without training contacts reports -1; fix halt can
stop a run on it (issue 13: very short contacts are flagged)."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest

from bayesrace import keys
from cpp_fixtures import FILTERS

pytestmark = FILTERS

from cpp_fixtures import plugin_path  # noqa: E402,F401
from lmp_tools import lammps_input, parse_tagged, read_dump, run_lmp, write_data  # noqa: E402
from test_lammps_race import STRUCTURES, race, to_atoms  # noqa: E402,F401

EXTRA = "dump dc all custom 1 contacts.txt id c_u[5]\ndump_modify dc sort id format float %.17g"
RUN = 'run 0\nprint "CONTACT $(c_ug[5]:%.17g)" file contact.txt'


def with_contacts(posterior, model: str, table, out_dir):
    """The same network re-saved with metadata that carries ``table``; the posterior copy too."""
    import torch

    from bayesrace.export import build_metadata

    copied = copy.deepcopy(posterior)
    copied.shortest_contacts = table
    meta = build_metadata(copied, "float64", thresholds={keys.ATOMIC_FORCE_STD: 0.1}, training_data_sha256="0" * 64)
    assert meta[keys.META_SHORTEST_CONTACTS] == table
    path = out_dir / "contacts.pt"
    torch.jit.save(torch.jit.load(model), str(path), _extra_files={keys.METADATA_FILE: json.dumps(meta)})
    return copied, str(path)


def lammps_contacts(plugin_path, model, s, tmp_path, nprocs=1):
    write_data(s, tmp_path / "data.lmp")
    rc, out = run_lmp(lammps_input(plugin_path, model, s, extra=EXTRA, run=RUN), tmp_path, nprocs=nprocs)
    assert rc == 0, out[-3000:]
    dump = read_dump(tmp_path / "contacts.txt")
    (global_min,) = parse_tagged((tmp_path / "contact.txt").read_text(), "CONTACT")
    return dump["id"].astype(int), dump["c_u[5]"], float(global_min[0])


@pytest.mark.parametrize("kind, nprocs", [("psb3", 1), ("cell", 2), ("triclinic", 1)])
def test_lammps_contact_ratio_equals_python(plugin_path, race, tmp_path, kind, nprocs):
    from bayesrace.calculator import BayesRaceCalculator

    from bayesrace.data import shortest_contacts

    posterior, model, _ = race
    s = STRUCTURES[kind]()
    # "training" contacts 5 % longer than this structure's own, and N-N unseen: the atoms at a
    # pair's shortest distance come out at 1/1.05, the others above
    own = shortest_contacts([BayesRaceCalculator(posterior)._graph(to_atoms(s))], 3)
    table = [[None if v is None or a == b == 2 else 1.05 * v for b, v in enumerate(row)] for a, row in enumerate(own)]
    copied, mapped = with_contacts(posterior, model, table, tmp_path)
    calc = BayesRaceCalculator(copied)
    calc.calculate(to_atoms(s), ["energy"])
    want = calc.results["contact_ratio"][np.argsort(s.ids)]
    assert want.min() < 1.0 < want.max()  # some atoms closer than "training", some not
    ids, got, global_min = lammps_contacts(plugin_path, mapped, s, tmp_path, nprocs)
    np.testing.assert_array_equal(ids, np.sort(s.ids))
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert global_min == pytest.approx(want.min(), rel=1e-12)


def test_without_training_contacts_the_columns_read_minus_one(plugin_path, race, tmp_path):
    from bayesrace.calculator import BayesRaceCalculator

    posterior, model, meta = race
    assert keys.META_SHORTEST_CONTACTS not in meta  # an in-memory posterior has none
    s = STRUCTURES["psb3"]()
    calc = BayesRaceCalculator(posterior)
    calc.calculate(to_atoms(s), ["energy"])
    assert "contact_ratio" not in calc.results
    _, got, global_min = lammps_contacts(plugin_path, model, s, tmp_path)
    assert np.all(got == -1.0) and global_min == -1.0


def test_fix_halt_stops_on_a_short_contact(plugin_path, race, tmp_path):
    posterior, model, _ = race
    s = STRUCTURES["psb3"]()
    _, mapped = with_contacts(posterior, model, [[0.9, 1.2, None], [1.2, 1.3, None], [None, None, None]], tmp_path)
    write_data(s, tmp_path / "data.lmp")
    halt = ("variable closest equal c_ug[5]\n"
            "fix h all halt 1 v_closest < 0.99 error soft\n"
            "velocity all create 300 1 loop geom\nfix nve all nve")
    rc, out = run_lmp(lammps_input(plugin_path, mapped, s, extra=halt, run="run 5", dump=False), tmp_path)
    assert rc == 0, out[-3000:]
    met = re.search(r"Fix halt condition for fix-id h met on step (\d+)", out)
    assert met and int(met.group(1)) <= 1, out[-3000:]
