"""The AOTInductor deployable (.pt2) against the TorchScript one of the same posterior: its
metadata, its outputs in Python (aoti_load_package), in the C++ core (the binding), in
LAMMPS (shell mode, chosen by itself; halo layer refused), and the loader's checks.

One package is compiled for the whole module (two models, about two minutes): a tiny
2-member RACE ensemble, float64.
"""

from __future__ import annotations

import json
import zipfile

import ase
import ase.io
import numpy as np
import pytest
import torch

from bayesrace import keys
from cpp_fixtures import FILTERS

pytestmark = FILTERS

from cpp_fixtures import core, plugin_path  # noqa: E402,F401
from deployable_tools import call, deployable_inputs  # noqa: E402
from lmp_tools import (  # noqa: E402
    assert_same,
    lammps_input,
    molecule,
    parse_lammps_result,
    periodic,
    run_lmp,
    write_data,
)

HASH = "0" * 64
AOTI_FIELDS = {keys.META_FORMAT, keys.META_INPUT_KEYS, keys.META_OUTPUT_KEYS, keys.META_AOTI_MODELS,
               keys.META_MACHINE, keys.META_CPU_ISA, keys.META_COMPILED_ON}


@pytest.fixture(scope="module")
def deployables(tmp_path_factory):
    """(posterior, TorchScript path, .pt2 path, the .pt2's metadata as export returned it)."""
    from bayesrace.bayes import Posterior
    from bayesrace.export import export_posterior, export_posterior_aoti
    from conftest import tiny_model

    posterior = Posterior([tiny_model(seed=s) for s in (0, 1)]).eval()
    out = tmp_path_factory.mktemp("aoti")
    thresholds = {keys.ATOMIC_FORCE_STD: 0.05}
    export_posterior(posterior, out / "model.pt", training_data_sha256=HASH, thresholds=thresholds)
    meta = export_posterior_aoti(posterior, out / "model.pt2", training_data_sha256=HASH, thresholds=thresholds)
    return posterior, str(out / "model.pt"), str(out / "model.pt2"), meta


def structures():
    from conftest import random_molecule

    rng = np.random.default_rng(4)
    cell = np.diag([7.0, 6.5, 7.5])
    frac = []
    while len(frac) < 20:  # no pair closer than 1 Å, periodic images included
        f = rng.uniform(size=3)
        if all(np.linalg.norm((f - g - np.round(f - g)) @ cell) > 1.0 for g in frac):
            frac.append(f)
    return {
        "molecule 9": random_molecule(9, seed=3),
        "molecule 41": random_molecule(41, seed=5, box=6.0),
        "periodic 20": ase.Atoms([("C", "H", "N", "H")[k % 4] for k in range(20)], scaled_positions=frac, cell=cell,
                                 pbc=True),
        "isolated atoms (no edge)": ase.Atoms("HCN", positions=[[0, 0, 0], [20, 0, 0], [0, 20, 0]]),
    }


def relative(a, b) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    assert a.shape == b.shape
    return 0.0 if a.size == 0 else float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


# ----------------------------------------------------------------------------- metadata


def test_metadata_is_the_torchscript_metadata_plus_the_package_fields(deployables):
    from bayesrace.export import deployable_format, read_metadata
    from bayesrace.export._aoti import cpu_isa

    _, pt, pt2, meta = deployables
    assert read_metadata(pt2) == meta
    torchscript = read_metadata(pt)
    assert set(meta) == set(torchscript) | AOTI_FIELDS
    assert {k: v for k, v in meta.items() if k not in AOTI_FIELDS} == torchscript
    assert meta[keys.META_FORMAT] == keys.FORMAT_AOTI and keys.META_FORMAT not in torchscript
    assert meta[keys.META_AOTI_MODELS] == [keys.AOTI_MODEL_PLAIN, keys.AOTI_MODEL_ATOMIC_VIRIAL]
    assert meta[keys.META_TORCH_VERSION] == torch.__version__ and meta[keys.META_CPU_ISA] == cpu_isa()
    assert (deployable_format(pt), deployable_format(pt2)) == (keys.FORMAT_TORCHSCRIPT, keys.FORMAT_AOTI)


def test_core_reads_the_same_metadata(core, deployables):
    _, pt, pt2, meta = deployables
    engine = core.Engine(pt2)
    assert engine.metadata == meta
    assert "AOTInductor" in repr(engine) and "TorchScript" in repr(core.Engine(pt))


# ----------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("atomic_virial", [False, True])
def test_python_pt2_equals_torchscript(deployables, atomic_virial):
    """aoti_load_package's outputs = the TorchScript module's, float64, to 1e-10 relative."""
    from bayesrace.export import load_aoti

    posterior, pt, pt2, _ = deployables
    scripted = torch.jit.load(pt)
    compiled = load_aoti(pt2, compute_atomic_virial=atomic_virial)
    for name, atoms in structures().items():
        inputs = deployable_inputs(atoms, posterior.cutoff)
        for n_local in sorted({len(atoms), len(atoms) - 2}):
            want = call(scripted, inputs, n_local, atomic_virial)
            got = compiled(*(torch.tensor(inputs[k]) for k in (keys.POSITIONS, keys.SPECIES, keys.EDGE_INDEX,
                                                                keys.EDGE_SHIFTS)), n_local)
            assert set(got) == set(want)
            for key in want:
                assert relative(got[key], want[key]) < 1e-10, (name, n_local, key)
            assert (want[keys.MEMBER_ATOMIC_VIRIAL].numel() > 0) == atomic_virial
            assert float(want[keys.MEMBER_FORCES].abs().max()) > 0 or inputs[keys.EDGE_INDEX].shape[1] == 0


@pytest.mark.parametrize("atomic_virial", [False, True])
def test_core_on_pt2_equals_core_on_torchscript(core, deployables, atomic_virial):
    posterior, pt, pt2, _ = deployables
    scripted, compiled = core.Engine(pt), core.Engine(pt2)
    for name, atoms in structures().items():
        inputs = deployable_inputs(atoms, posterior.cutoff)
        args = [inputs[k] for k in (keys.POSITIONS, keys.SPECIES, keys.EDGE_INDEX, keys.EDGE_SHIFTS)]
        want = scripted.evaluate(*args, len(atoms), "mean", atomic_virial)
        got = compiled.evaluate(*args, len(atoms), "mean", atomic_virial)
        assert set(got) == set(want)
        for key in want:
            assert relative(got[key], want[key]) < 1e-10, (name, key)
        assert (np.size(want.get(keys.ATOMIC_VIRIAL, [])) > 0) == atomic_virial


def test_core_refuses_layer_mode(core, deployables):
    _, _, pt2, _ = deployables
    engine = core.Engine(pt2)
    assert list(engine.layer_widths) == []
    atoms = structures()["molecule 9"]
    inputs = deployable_inputs(atoms, 5.0)
    with pytest.raises(RuntimeError, match=r"cannot run layer mode: it is an AOTInductor package .*halo shell"):
        engine.evaluate_layered(inputs[keys.POSITIONS], inputs[keys.SPECIES], inputs[keys.EDGE_INDEX], len(atoms),
                                np.zeros(0, dtype=np.int64))


# ----------------------------------------------------------------------------- LAMMPS


@pytest.mark.parametrize("kind", ["molecule", "periodic"])
def test_lammps_pt2_equals_torchscript(plugin_path, deployables, tmp_path, kind):
    """Energy, forces, per-atom energy, σ's, virial and stress/atom: the default pair_style
    runs a .pt2 in shell mode (and says so); the TorchScript run is forced to shell mode too."""
    _, pt, pt2, _ = deployables
    s = molecule(seed=2, n=12) if kind == "molecule" else periodic(seed=3, n=14)
    results, logs = {}, {}
    for model, settings in ((pt, "halo shell"), (pt2, "")):
        work = tmp_path / model.rsplit(".", 1)[1]
        work.mkdir()
        write_data(s, work / "data.lmp")
        rc, logs[model] = run_lmp(lammps_input(plugin_path, model, s, settings=settings), work)
        assert rc == 0, logs[model][-3000:]
        results[model] = parse_lammps_result(work)
    assert "halo shell, because the model cannot run layer mode: it is an AOTInductor package" in logs[pt2]
    assert np.abs(results[pt]["forces"]).max() > 0 and np.abs(results[pt]["atomic_virial6"]).max() > 0
    assert_same(results[pt2], results[pt], rtol=1e-10)


def test_lammps_halo_layer_with_pt2_is_an_error(plugin_path, deployables, tmp_path):
    _, _, pt2, _ = deployables
    s = molecule(seed=2, n=8)
    write_data(s, tmp_path / "data.lmp")
    rc, out = run_lmp(lammps_input(plugin_path, pt2, s, settings="halo layer"), tmp_path)
    assert rc != 0
    assert "cannot run layer mode: it is an AOTInductor package" in out and "halo shell" in out


# ----------------------------------------------------------------------------- checks


def with_metadata(src: str, dst, **changes) -> str:
    """A copy of the package with some metadata fields changed (the compiled code untouched)."""
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as new:
        for info in old.infolist():
            data = old.read(info)
            if info.filename.endswith("/" + keys.ARCHIVE_METADATA_RECORD):
                data = json.dumps({**json.loads(data), **changes}).encode()
            new.writestr(info.filename, data)
    return str(dst)


@pytest.mark.parametrize("changes, message", [
    ({keys.META_TORCH_VERSION: "2.0.1+cpu"}, r"compiled with torch 2\.0\.1\+cpu, this build of bayesrace uses torch "),
    ({keys.META_MACHINE: "riscv64"}, r"compiled for riscv64 CPUs, this machine is"),
    ({keys.META_INPUT_KEYS: [keys.POSITIONS, keys.SPECIES]}, r"'input_keys' must be \[positions, species, edge_index"),
    ({keys.META_OUTPUT_KEYS: [keys.MEMBER_ENERGY]}, r"'output_keys' must name 'member_atomic_energy' once"),
    ({keys.META_FORMAT: keys.FORMAT_TORCHSCRIPT}, r"says \"torchscript\" but the file is an AOTInductor package"),
    ({keys.META_FORMAT: "onnx"}, r"'deployable_format' says \"onnx\" but the file is an AOTInductor package"),
])
def test_core_checks_the_package_metadata(core, deployables, tmp_path, changes, message):
    _, _, pt2, _ = deployables
    with pytest.raises(RuntimeError, match=message):
        core.Engine(with_metadata(pt2, tmp_path / "changed.pt2", **changes))


def test_core_refuses_a_pt2_without_the_atomic_virial_model_when_asked_for_it(core, deployables, tmp_path):
    _, _, pt2, _ = deployables
    engine = core.Engine(with_metadata(pt2, tmp_path / "plain.pt2", **{keys.META_AOTI_MODELS: [keys.AOTI_MODEL_PLAIN]}))
    inputs = deployable_inputs(structures()["molecule 9"], 5.0)
    args = [inputs[k] for k in (keys.POSITIONS, keys.SPECIES, keys.EDGE_INDEX, keys.EDGE_SHIFTS)]
    assert np.isfinite(engine.evaluate(*args, 9, "mean", False)[keys.ENERGY])
    with pytest.raises(RuntimeError, match="exported without its per-atom virial model"):
        engine.evaluate(*args, 9, "mean", True)


def test_core_refuses_a_torchscript_file_that_says_aoti(core, deployables, tmp_path):
    _, pt, _, _ = deployables
    extra = {keys.METADATA_FILE: ""}
    module = torch.jit.load(pt, _extra_files=extra)
    changed = {**json.loads(extra[keys.METADATA_FILE]), keys.META_FORMAT: keys.FORMAT_AOTI}
    torch.jit.save(module, str(tmp_path / "wrong.pt"), _extra_files={keys.METADATA_FILE: json.dumps(changed)})
    with pytest.raises(RuntimeError, match=r"says \"aoti\" but the file is a TorchScript archive"):
        core.Engine(str(tmp_path / "wrong.pt"))


# ----------------------------------------------------------------------------- export errors

# before test_export_errors_are_clear, whose fake compiler torch keeps for the rest of the process
def test_feature_distance_of_a_pt2_equals_torchscript_and_python(core, tmp_path):
    """A posterior with a feature density compiled to .pt2 (the plain model only): the core
    reports every member's feature distance and their mean as from the TorchScript file, and
    both equal Python's (the per-element whitening traces without data-dependent shapes)."""
    from bayesrace.bayes import Posterior, feature_distance, fit_feature_density
    from bayesrace.data import TypeMap, frames_to_graphs, read_frames
    from bayesrace.export import export_posterior, export_posterior_aoti
    from conftest import batch_of, random_molecule, tiny_model

    posterior = Posterior([tiny_model(seed=s) for s in (0, 1)]).eval()
    shapes = [random_molecule(9, seed=k) for k in range(8)]
    ase.io.write(tmp_path / "train.xyz", shapes)
    graphs = frames_to_graphs(read_frames(tmp_path / "train.xyz", require_energy=False, require_forces=False),
                              TypeMap(posterior.type_names), posterior.cutoff)
    posterior.feature_density = fit_feature_density(list(posterior.members), graphs)
    export_posterior(posterior, tmp_path / "model.pt", training_data_sha256=HASH)
    export_posterior_aoti(posterior, tmp_path / "model.pt2", training_data_sha256=HASH, atomic_virial=False)
    scripted, compiled = core.Engine(str(tmp_path / "model.pt")), core.Engine(str(tmp_path / "model.pt2"))
    for name, atoms in structures().items():
        inputs = deployable_inputs(atoms, posterior.cutoff)
        args = [inputs[k] for k in (keys.POSITIONS, keys.SPECIES, keys.EDGE_INDEX, keys.EDGE_SHIFTS)]
        want = scripted.evaluate(*args, len(atoms), "mean", False)
        got = compiled.evaluate(*args, len(atoms), "mean", False)
        python = feature_distance(posterior.members, posterior.feature_density,
                                  batch_of([atoms], posterior.type_names, posterior.cutoff)).numpy()
        assert relative(got[keys.MEMBER_FEATURE_DISTANCE], want[keys.MEMBER_FEATURE_DISTANCE]) < 1e-10, name
        assert relative(want[keys.MEMBER_FEATURE_DISTANCE], python) < 1e-10, name
        assert relative(got[keys.ATOMIC_FEATURE_DISTANCE], python.mean(axis=0)) < 1e-10, name



def test_export_errors_are_clear(deployables, tmp_path, monkeypatch, capsys):
    from bayesrace.bayes import save_posterior
    from bayesrace.cli import export_main
    from bayesrace.export import ExportError, check_aoti_toolchain, export_posterior_aoti

    posterior = deployables[0]
    with pytest.raises(ExportError, match=r"must end in \.pt2"):
        export_posterior_aoti(posterior, tmp_path / "model.pt", training_data_sha256=HASH)
    save_posterior(tmp_path / "posterior.pt", list(posterior.members), kind="ensemble", data_sha256=HASH)
    assert export_main([str(tmp_path / "posterior.pt"), str(tmp_path / "m.pt"), "--format", "aoti"]) == 2
    assert "must end in .pt2" in capsys.readouterr().err
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("bayesrace-no-such-compiler++",))
    with pytest.raises(ExportError, match="no C.. compiler found for AOTInductor"):
        check_aoti_toolchain()
    assert export_main([str(tmp_path / "posterior.pt"), str(tmp_path / "m.pt2"), "--format", "aoti"]) == 2
    assert "no C++ compiler found" in capsys.readouterr().err and not (tmp_path / "m.pt2").exists()

