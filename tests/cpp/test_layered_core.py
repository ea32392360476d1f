"""Layer mode in the C++ core, through the binding: ``Engine.evaluate_layered`` (the per-layer
halo exchange, ghosts one cutoff deep, features copied to the ghosts between layers and
their gradients added back onto the owners) equals the Python reference
``bayesrace.export.layered_evaluate`` and, with ghost rows folded onto their owners, the
shell-mode ``Engine.evaluate`` of the whole structure, to 1e-10 in float64: every member
output, the driving quantities and every σ.
"""

from __future__ import annotations

import numpy as np
import pytest

from bayesrace import keys
from cpp_fixtures import FILTERS

pytestmark = FILTERS

from cpp_fixtures import core, toy_dir, toy_model  # noqa: E402,F401

from lmp_tools import Structure, reference_edges  # noqa: E402
from race_deployables import TYPES, export_race, fold  # noqa: E402
from test_lammps_race import cell_structure, psb3_structure, to_atoms  # noqa: E402

CUTOFF = 5.0  # the tiny RACE preset's


def small_cell() -> Structure:
    """A cell smaller than one cutoff: every atom sees several images of itself."""
    cell = np.array([[4.6, 0.0, 0.0], [0.7, 4.4, 0.0], [0.3, -0.5, 4.8]])
    frac = np.array([[0.1, 0.2, 0.3], [0.6, 0.1, 0.5], [0.3, 0.7, 0.1], [0.8, 0.6, 0.8], [0.4, 0.4, 0.6]])
    return Structure(frac @ cell, ["C", "H", "N", "H", "C"], 10 + np.arange(5), cell=cell, pbc=True)


STRUCTURES = {
    "psb3": lambda: psb3_structure(),  # a molecule: no ghosts, the exchanges move nothing
    "cell": lambda: cell_structure(),  # ~9.5 Å, smaller than 2 x cutoff
    "triclinic": lambda: cell_structure(seed=5, n=26, triclinic=True),
    "small_cell": small_cell,
}

MEMBER_KEYS = [keys.MEMBER_ENERGY, keys.MEMBER_ATOMIC_ENERGY, keys.MEMBER_FORCES, keys.MEMBER_VIRIAL,
               keys.MEMBER_ATOMIC_VIRIAL, keys.ATOMIC_ENERGY_LOG_VAR, keys.FORCE_COVARIANCE]
SIGMA_KEYS = [keys.ATOMIC_FORCE_STD, keys.ATOMIC_FORCE_STD_EPISTEMIC, keys.ATOMIC_FORCE_STD_ALEATORIC,
              keys.ATOMIC_ENERGY_STD, keys.FORCE_COV_EPISTEMIC, keys.FORCE_COV_ALEATORIC,
              keys.ENERGY_VAR_EPISTEMIC, keys.ENERGY_VAR_ALEATORIC, keys.ENERGY_STD]
# per-atom arrays and the axis of their atoms: local rows compared, ghost rows folded or zero
PER_ATOM = {keys.MEMBER_ATOMIC_ENERGY: 1, keys.ATOMIC_ENERGY_LOG_VAR: 1, keys.FORCE_COVARIANCE: 1,
            keys.ATOMIC_ENERGY: 0}
FOLDED = {keys.MEMBER_FORCES: 1, keys.MEMBER_ATOMIC_VIRIAL: 1, keys.FORCES: 0, keys.ATOMIC_VIRIAL: 0}


def close(have, want, rtol, what):
    want = np.asarray(want, dtype=float)
    have = np.asarray(have, dtype=float)
    assert have.shape == want.shape, f"{what}: shape {have.shape} != {want.shape}"
    mag = max(np.abs(want).max(initial=0.0), 1e-30)
    np.testing.assert_allclose(have, want, rtol=rtol, atol=rtol * mag, err_msg=what)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("layered")
    return {
        "2 layers": export_race(d / "race2.pt"),
        "3 layers": export_race(d / "race3.pt", n_layers=3, n_members=2, seed=7),
    }


def layered_inputs(s: Structure):
    from bayesrace.export import ghost_images

    return ghost_images(to_atoms(s), CUTOFF, TYPES)


def shell_result(engine, s: Structure, driving="mean"):
    """The whole structure in shell mode: every atom local, images through edge shifts."""
    ei, shifts = reference_edges(s, CUTOFF)
    species = np.array([TYPES.index(e) for e in s.elements], dtype=np.int64)
    return engine.evaluate(s.positions, species, ei, shifts, len(s.positions), driving, True)


def compare_with_shell(lay, shell, g, rtol):
    n, owner = g["n_local"], g["ghost_owner"]
    for key in [keys.MEMBER_ENERGY, keys.MEMBER_VIRIAL, keys.ENERGY, keys.VIRIAL] + SIGMA_KEYS:
        close(lay[key], shell[key], rtol, key)
    for key, axis in PER_ATOM.items():
        local = np.take(lay[key], np.arange(n), axis=axis)
        close(local, shell[key], rtol, key)
        assert not np.take(lay[key], np.arange(n, lay[key].shape[axis]), axis=axis).any(), f"{key}: ghost rows"
    for key, axis in FOLDED.items():
        close(fold(lay[key], n, owner, axis), shell[key], rtol, key + " (ghost rows folded)")


@pytest.mark.parametrize("kind", list(STRUCTURES))
@pytest.mark.parametrize("model", ["2 layers", "3 layers"])
def test_layered_equals_python_reference_and_shell(core, models, kind, model):
    import torch

    from bayesrace.export import layered_evaluate

    s = STRUCTURES[kind]()
    g = layered_inputs(s)
    if kind != "psb3":
        assert len(g["ghost_owner"]) > 0
    engine = core.Engine(models[model])
    widths = list(engine.layer_widths)
    assert len(widths) == engine.metadata[keys.META_N_LAYERS] + 1
    lay = engine.evaluate_layered(g["positions"], g["species"], g["edge_index"], g["n_local"], g["ghost_owner"],
                                  "mean", True)

    ref = layered_evaluate(torch.jit.load(models[model]), g["positions"], g["species"], g["edge_index"],
                           g["n_local"], g["ghost_owner"])
    for key in MEMBER_KEYS:
        close(lay[key], ref[key].detach().numpy(), 1e-10, key + " vs layered_evaluate")

    compare_with_shell(lay, shell_result(engine, s), g, 1e-10)


def test_layered_driving_member_and_no_atomic_virial(core, models):
    s = cell_structure()
    g = layered_inputs(s)
    engine = core.Engine(models["2 layers"])
    lay = engine.evaluate_layered(g["positions"], g["species"], g["edge_index"], g["n_local"], g["ghost_owner"], 1)
    assert keys.ATOMIC_VIRIAL not in lay and keys.MEMBER_ATOMIC_VIRIAL not in lay
    shell = shell_result(engine, s, driving=1)
    n, owner = g["n_local"], g["ghost_owner"]
    close(lay[keys.ENERGY], shell[keys.ENERGY], 1e-10, "energy")
    close(fold(lay[keys.FORCES], n, owner), shell[keys.FORCES], 1e-10, "forces")
    close(lay[keys.VIRIAL], shell[keys.VIRIAL], 1e-10, "virial")
    close(lay[keys.ENERGY_STD], shell[keys.ENERGY_STD], 1e-10, "energy_std")


def test_layered_float32(core, tmp_path):
    """float32 deployable: the exchange buffers stay float64, the model runs in float32."""
    model = export_race(tmp_path / "race32.pt", dtype="float32")
    s = cell_structure(seed=5, n=26, triclinic=True)
    g = layered_inputs(s)
    engine = core.Engine(model)
    lay = engine.evaluate_layered(g["positions"], g["species"], g["edge_index"], g["n_local"], g["ghost_owner"],
                                  "mean", True)
    compare_with_shell(lay, shell_result(engine, s), g, 2e-4)


def test_layered_repeated_calls_reuse_buffers(core, models):
    """A second call with other sizes (buffers resized and reused) gives the same numbers."""
    engine = core.Engine(models["3 layers"])
    a, b = layered_inputs(cell_structure()), layered_inputs(small_cell())
    args = lambda g: (g["positions"], g["species"], g["edge_index"], g["n_local"], g["ghost_owner"], "mean", True)  # noqa: E731
    first = engine.evaluate_layered(*args(a))
    engine.evaluate_layered(*args(b))
    again = engine.evaluate_layered(*args(a))
    for key in MEMBER_KEYS + SIGMA_KEYS:
        np.testing.assert_array_equal(again[key], first[key], err_msg=key)


def test_layered_recompute_equals_kept_graphs(core, models):
    """recompute_layers (each layer run again in the backward pass, piece by piece) gives the same numbers."""
    engine = core.Engine(models["3 layers"])
    g = layered_inputs(cell_structure(seed=3, n=20, triclinic=True))
    args = (g["positions"], g["species"], g["edge_index"], g["n_local"], g["ghost_owner"], "mean", True)
    kept = engine.evaluate_layered(*args)
    n_edges = g["edge_index"].shape[1]
    # one piece, and pieces of a few centres (a centre with more edges than a piece is one piece)
    for chunk in (0, 3 * n_edges // 7, 5):
        again = engine.evaluate_layered(*args, recompute_layers=True, recompute_chunk=chunk)
        for key in MEMBER_KEYS + SIGMA_KEYS:
            close(again[key], kept[key], 1e-12, f"{key} with recompute_layers, chunk {chunk}")
    with pytest.raises(ValueError, match="recompute_chunk must be >= 0"):
        engine.evaluate_layered(*args, recompute_layers=True, recompute_chunk=-1)


def test_layered_input_errors(core, models, toy_model):
    engine = core.Engine(models["2 layers"])
    g = layered_inputs(cell_structure())
    pos, spec, ei, n, owner = g["positions"], g["species"], g["edge_index"], g["n_local"], g["ghost_owner"]
    with pytest.raises(ValueError, match="must equal the number of atoms"):
        engine.evaluate_layered(pos, spec, ei, n, owner[:-1])
    bad_owner = owner.copy()
    bad_owner[0] = n
    with pytest.raises(ValueError, match=r"ghost_owner\[0\] = .* is not a local atom"):
        engine.evaluate_layered(pos, spec, ei, n, bad_owner)
    ghost_centre = ei.copy()
    ghost_centre[0, 0] = n
    with pytest.raises(ValueError, match="layer mode: edge 0 has centre .* not a local atom"):
        engine.evaluate_layered(pos, spec, ghost_centre, n, owner)
    # a deployable without the per-layer methods loads (shell mode) but refuses layer mode
    toy = core.Engine(toy_model)
    assert list(toy.layer_widths) == []
    x = np.zeros((2, 3))
    x[1, 0] = 1.0
    with pytest.raises(RuntimeError, match="cannot run layer mode: it has no per-layer methods"):
        toy.evaluate_layered(x, np.zeros(2, dtype=np.int64), np.array([[0, 1], [1, 0]]), 2, np.zeros(0, np.int64))
