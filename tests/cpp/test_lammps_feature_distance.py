"""The feature distance in the C++ core and in LAMMPS (compute bayesrace/atom column 7, compute
bayesrace values 9 and 10) equals the Python posterior's, on 1 and 2 ranks, in shell and layer
mode, periodic and triclinic cells included; without a feature density every column reads -1;
fix halt can stop a run on it (issue 13 item 3: an OOD score that reaches AUROC >= 0.95 offline
is a LAMMPS column)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from bayesrace import keys
from cpp_fixtures import FILTERS

pytestmark = FILTERS

from cpp_fixtures import core, plugin_path  # noqa: E402,F401
from lmp_tools import lammps_input, parse_tagged, read_dump, run_lmp, write_data  # noqa: E402
from test_lammps_race import N_MEMBERS, STRUCTURES, race, to_atoms  # noqa: E402,F401

EXTRA = "dump dd all custom 1 distances.txt id c_u[7]\ndump_modify dd sort id format float %.17g"
RUN = 'run 0\nprint "DISTANCE $(c_ug[9]:%.17g) $(c_ug[10]:%.17g)" file distance.txt'


@pytest.fixture(scope="module")
def with_density(tmp_path_factory):
    """A tiny 3-member posterior whose density was fitted on jittered copies of the test structures."""
    from bayesrace.bayes import Posterior, fit_feature_density
    from bayesrace.data import Frame, TypeMap, frames_to_graphs
    from bayesrace.export import export_posterior
    from conftest import tiny_model

    posterior = Posterior([tiny_model(seed=s) for s in range(N_MEMBERS)]).eval()
    rng = np.random.default_rng(0)
    frames = []
    for kind in ("psb3", "cell"):
        atoms = to_atoms(STRUCTURES[kind]())
        for k in range(6):
            frames.append(Frame(numbers=atoms.numbers.astype(np.int64),
                                positions=atoms.positions + rng.normal(0.0, 0.08, atoms.positions.shape),
                                cell=np.array(atoms.cell.array), pbc=np.array(atoms.pbc), source=f"{kind} {k}"))
    graphs = frames_to_graphs(frames, TypeMap(posterior.type_names), posterior.cutoff)
    posterior.feature_density = fit_feature_density(list(posterior.members), graphs)
    path = tmp_path_factory.mktemp("density") / "density.pt"
    meta = export_posterior(posterior, path, training_data_sha256="0" * 64, thresholds={keys.ATOMIC_FORCE_STD: 1.0})
    assert keys.META_FEATURE_DENSITY in meta
    return posterior, str(path)


def python_distances(posterior, s) -> np.ndarray:
    """The ASE calculator's per-atom feature distance, rows sorted by atom id."""
    from bayesrace.calculator import BayesRaceCalculator

    calc = BayesRaceCalculator(posterior)
    calc.calculate(to_atoms(s), ["energy"])
    return calc.results["feature_distance"][np.argsort(s.ids)]


def lammps_distances(plugin_path, model, s, tmp_path, nprocs=1, settings=""):
    write_data(s, tmp_path / "data.lmp")
    text = lammps_input(plugin_path, model, s, settings=settings, extra=EXTRA, run=RUN)
    rc, out = run_lmp(text, tmp_path, nprocs=nprocs)
    assert rc == 0, out[-3000:]
    dump = read_dump(tmp_path / "distances.txt")
    (values,) = parse_tagged((tmp_path / "distance.txt").read_text(), "DISTANCE")
    return dump["id"].astype(int), dump["c_u[7]"], float(values[0]), float(values[1])


def test_binding_reports_every_members_distance_and_their_mean(core, with_density):
    from deployable_tools import deployable_inputs

    posterior, model = with_density
    s = STRUCTURES["cell"]()
    atoms = to_atoms(s)
    engine = core.Engine(model)
    inputs = deployable_inputs(atoms, posterior.cutoff)
    out = engine.evaluate(inputs["positions"], inputs["species"], inputs["edge_index"], inputs["edge_shifts"],
                          len(atoms), "mean", False)
    from bayesrace.bayes import feature_distance
    from conftest import batch_of

    want = feature_distance(posterior.members, posterior.feature_density,
                            batch_of([atoms], posterior.type_names, posterior.cutoff)).numpy()
    np.testing.assert_allclose(out[keys.MEMBER_FEATURE_DISTANCE], want, rtol=1e-10)
    np.testing.assert_allclose(out[keys.ATOMIC_FEATURE_DISTANCE], want.mean(axis=0), rtol=1e-10)


@pytest.mark.parametrize("kind, nprocs, settings", [
    ("psb3", 1, ""), ("cell", 2, ""), ("cell", 2, "halo layer"), ("triclinic", 1, "halo layer")])
def test_lammps_feature_distance_equals_python(plugin_path, with_density, tmp_path, kind, nprocs, settings):
    posterior, model = with_density
    s = STRUCTURES[kind]()
    want = python_distances(posterior, s)
    assert np.all(want > 0)
    ids, got, largest, mean = lammps_distances(plugin_path, model, s, tmp_path, nprocs, settings)
    np.testing.assert_array_equal(ids, np.sort(s.ids))
    np.testing.assert_allclose(got, want, rtol=1e-9)
    assert largest == pytest.approx(want.max(), rel=1e-9)
    assert mean == pytest.approx(want.mean(), rel=1e-9)


@pytest.mark.parametrize("settings", ["", "halo layer"])
def test_empty_ranks_report_the_same_distances(plugin_path, with_density, tmp_path, settings):
    """processors 4 1 1 with PSB3 at one end of a long box: ranks without atoms take part in the
    reductions (max, mean) and the layer-mode exchanges without contributing a distance."""
    import re as regex

    from test_lammps_race import psb3_structure

    posterior, model = with_density
    s = psb3_structure(origin=(5.0, 15.0, 15.0), box=(48.0, 30.0, 30.0))
    want = python_distances(posterior, s)
    write_data(s, tmp_path / "data.lmp")
    text = lammps_input(plugin_path, model, s, settings=settings, processors="processors 4 1 1", extra=EXTRA, run=RUN)
    rc, out = run_lmp(text, tmp_path, nprocs=4)
    assert rc == 0, out[-3000:]
    nlocal = regex.search(r"Nlocal:\s+(\S+) ave\s+(\S+) max\s+(\S+) min", out)
    assert nlocal and float(nlocal.group(3)) == 0.0, "expected an empty subdomain"
    np.testing.assert_allclose(read_dump(tmp_path / "distances.txt")["c_u[7]"], want, rtol=1e-9)
    (values,) = parse_tagged((tmp_path / "distance.txt").read_text(), "DISTANCE")
    assert float(values[0]) == pytest.approx(want.max(), rel=1e-9)
    assert float(values[1]) == pytest.approx(want.mean(), rel=1e-9)


def test_without_a_density_the_columns_read_minus_one(plugin_path, race, tmp_path):
    _, model, meta = race
    assert keys.META_FEATURE_DENSITY not in meta
    s = STRUCTURES["psb3"]()
    write_data(s, tmp_path / "data.lmp")
    # two runs: the warning once
    rc, out = run_lmp(lammps_input(plugin_path, model, s, extra=EXTRA, run=RUN + "\nrun 0"), tmp_path)
    assert rc == 0, out[-3000:]
    assert out.count("this deployable has no feature density") == 1, out[-3000:]
    got = read_dump(tmp_path / "distances.txt")["c_u[7]"]
    (values,) = parse_tagged((tmp_path / "distance.txt").read_text(), "DISTANCE")
    assert np.all(got == -1.0) and float(values[0]) == -1.0 and float(values[1]) == -1.0


def test_fix_halt_stops_on_a_large_feature_distance(plugin_path, with_density, tmp_path):
    posterior, model = with_density
    s = STRUCTURES["psb3"]()
    threshold = 0.5 * python_distances(posterior, s).max()  # already exceeded at step 0
    write_data(s, tmp_path / "data.lmp")
    halt = (f"variable far equal c_ug[9]\nfix h all halt 1 v_far > {threshold:.6g} error soft\n"
            "velocity all create 300 1 loop geom\nfix nve all nve")
    rc, out = run_lmp(lammps_input(plugin_path, model, s, extra=halt, run="run 5", dump=False), tmp_path)
    assert rc == 0, out[-3000:]
    assert "no feature density" not in out
    met = re.search(r"Fix halt condition for fix-id h met on step (\d+)", out)
    assert met and int(met.group(1)) <= 1, out[-3000:]
