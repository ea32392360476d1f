"""One member alone in the C++ core (``alone=True``, ``ModelInputs::only_member``): what the
pair style evaluates for ``dynamics member K`` on steps without uncertainty. Shell mode calls
the deployable's ``forward_member``, layer mode its per-member methods (narrower exchanges);
either equals member K's rows of the evaluation of every member, to 1e-12. Where the
deployable or the mode cannot (no ``forward_member``, ``recompute_layers``) every member is
evaluated and ``only_member`` says so (-1)."""

from __future__ import annotations

import numpy as np
import pytest

from bayesrace import keys
from cpp_fixtures import FILTERS

pytestmark = FILTERS

from cpp_fixtures import core, toy_dir, toy_model  # noqa: E402,F401

from race_deployables import export_race  # noqa: E402
from test_layered_core import (  # noqa: E402
    MEMBER_KEYS, SIGMA_KEYS, close, layered_inputs, shell_result, small_cell,
)
from test_lammps_race import cell_structure  # noqa: E402

DRIVING_KEYS = [keys.ENERGY, keys.ATOMIC_ENERGY, keys.FORCES, keys.VIRIAL, keys.ATOMIC_VIRIAL]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("alone")
    return {"2 layers": export_race(d / "race2.pt"), "3 layers": export_race(d / "race3.pt", n_layers=3, n_members=2,
                                                                             seed=7)}


def assert_member_rows(alone, every, member):
    """alone holds member `member` only: its rows of every member's outputs, the same driving arrays."""
    assert alone["only_member"] == member
    for key in MEMBER_KEYS:
        assert alone[key].shape == (1, *every[key].shape[1:]), key
        close(alone[key][0], every[key][member], 1e-12, key)
    for key in DRIVING_KEYS:
        close(alone[key], every[key], 1e-12, key)
    assert not any(key in alone for key in SIGMA_KEYS)


@pytest.mark.parametrize("structure", ["cell", "small_cell"])
@pytest.mark.parametrize("model", ["2 layers", "3 layers"])
def test_one_member_alone_equals_its_rows(core, models, model, structure):
    s = cell_structure(seed=5, n=26, triclinic=True) if structure == "cell" else small_cell()
    engine = core.Engine(models[model])
    g = layered_inputs(s)
    layered_args = (g["positions"], g["species"], g["edge_index"], g["n_local"], g["ghost_owner"])
    for member in range(engine.metadata[keys.META_N_MEMBERS]):
        shell_every = shell_result(engine, s, driving=member)
        assert shell_every["only_member"] == -1
        shell_alone = engine.evaluate(*shell_args(s, engine), member, True, alone=True)
        assert_member_rows(shell_alone, shell_every, member)

        layer_every = engine.evaluate_layered(*layered_args, member, True)
        layer_alone = engine.evaluate_layered(*layered_args, member, True, alone=True)
        assert_member_rows(layer_alone, layer_every, member)
    # the members differ, so a wrong member would be caught
    assert not np.allclose(shell_every[keys.MEMBER_FORCES][0], shell_every[keys.MEMBER_FORCES][1])


def shell_args(s, engine):
    from lmp_tools import reference_edges
    from race_deployables import TYPES

    ei, shifts = reference_edges(s, 5.0)
    species = np.array([TYPES.index(e) for e in s.elements], dtype=np.int64)
    return s.positions, species, ei, shifts, len(s.positions)


def test_recompute_and_old_deployables_evaluate_every_member(core, models, toy_model):
    engine = core.Engine(models["3 layers"])
    g = layered_inputs(cell_structure())
    args = (g["positions"], g["species"], g["edge_index"], g["n_local"], g["ghost_owner"], 1, True)
    every = engine.evaluate_layered(*args)
    recomputed = engine.evaluate_layered(*args, recompute_layers=True, alone=True)
    assert recomputed["only_member"] == -1
    for key in MEMBER_KEYS + DRIVING_KEYS:
        close(recomputed[key], every[key], 1e-12, key)

    # a deployable without forward_member (the toy one) evaluates every member in shell mode
    toy = core.Engine(toy_model)
    x = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.2, 0.0]])
    spec = np.array([0, 1, 2], dtype=np.int64)
    ei = np.array([[0, 1, 0, 2, 1, 2], [1, 0, 2, 0, 2, 1]])
    toy_alone = toy.evaluate(x, spec, ei, None, 3, 2, False, alone=True)
    toy_every = toy.evaluate(x, spec, ei, None, 3, 2, False)
    assert toy_alone["only_member"] == -1 and keys.ATOMIC_FORCE_STD in toy_alone
    close(toy_alone[keys.FORCES], toy_every[keys.FORCES], 0.0, "forces")


def test_alone_needs_a_member(core, models):
    engine = core.Engine(models["2 layers"])
    s = cell_structure()
    with pytest.raises(ValueError, match="alone=True needs driving = a member index"):
        engine.evaluate(*shell_args(s, engine), "mean", False, alone=True)
