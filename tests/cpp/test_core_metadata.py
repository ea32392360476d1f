"""The C++ engine's checks of a deployable's metadata.json through the pybind11 binding: every
required field, every malformed one named in the error, optional fields, version rules."""

from __future__ import annotations

import json

import pytest
import torch

from cpp_fixtures import FILTERS

pytestmark = FILTERS

from cpp_fixtures import core, toy_dir  # noqa: E402,F401
from toy_deployable import ToyEnsemble, default_metadata, write_toy  # noqa: E402

REQUIRED = [
    "format_version", "type_names", "cutoff", "n_layers", "units", "dtype", "n_members",
    "calibration", "thresholds", "bayesrace_version", "torch_version", "training_data_sha256", "posterior",
]


def test_metadata_roundtrip(core, toy_dir):
    path = toy_dir / "meta.pt"
    meta = write_toy(str(path))
    engine = core.Engine(str(path))
    assert engine.metadata == meta
    assert engine.warnings == []
    assert core.FORMAT_VERSION == 1
    assert "3 members" in repr(engine)


def _expect_error(core, path, *fragments):
    with pytest.raises(RuntimeError) as err:
        core.Engine(str(path))
    for frag in fragments:
        assert frag in str(err.value), str(err.value)


def test_missing_file(core, tmp_path):
    _expect_error(core, tmp_path / "nope.pt", "cannot open model file", "nope.pt")


def test_not_torchscript(core, tmp_path):
    path = tmp_path / "junk.pt"
    path.write_text("not a model\n")
    _expect_error(core, path, "is not a TorchScript archive")


def test_missing_metadata_file(core, tmp_path):
    path = tmp_path / "nometa.pt"
    torch.jit.save(torch.jit.script(ToyEnsemble(["H"], 3.0, 1, 2)), str(path))
    _expect_error(core, path, "has no metadata.json")


def test_invalid_json(core, tmp_path):
    path = tmp_path / "badjson.pt"
    write_toy(str(path), raw_metadata='{"format_version": 1,,}')
    _expect_error(core, path, "not valid JSON", "line 1")


def test_wrong_format_version(core, tmp_path):
    path = tmp_path / "v2.pt"
    write_toy(str(path), metadata_override={"format_version": 2})
    _expect_error(core, path, "'format_version'", "is 2", "reads format_version 1")


@pytest.mark.parametrize("key", REQUIRED)
def test_missing_key(core, tmp_path, key):
    path = tmp_path / f"no_{key}.pt"
    write_toy(str(path), drop_keys=[key])
    _expect_error(core, path, f"metadata field '{key}' is missing")


@pytest.mark.parametrize(
    "override, fragments",
    [
        ({"dtype": "float16"}, ["'dtype'", "float64", "float16"]),
        ({"units": "real"}, ["'units'", "metal"]),
        ({"n_members": 0}, ["'n_members'", ">= 1"]),
        ({"n_layers": 1.5}, ["'n_layers'", "integer"]),
        ({"cutoff": -1.0}, ["'cutoff'", "> 0"]),
        ({"type_names": ["H", "H"]}, ["'type_names'", "twice"]),
        ({"type_names": []}, ["'type_names'", "non-empty"]),
        ({"calibration": {"force_std_scale": 1.0}}, ["'calibration.energy_std_scale' is missing"]),
        ({"calibration": {"force_std_scale": 0.0, "energy_std_scale": 1.0}}, ["'calibration.force_std_scale'"]),
        ({"calibration": {"force_std_scale": 1.0, "energy_std_scale": 1.0, "force_std_map": [1.0]}},
         ["'calibration.force_std_map' must be an object"]),
        ({"calibration": {"force_std_scale": 1.0, "energy_std_scale": 1.0,
                          "force_std_map": {"sigma": [0.1, 0.2]}}},
         ["'calibration.force_std_map.calibrated' is missing"]),
        ({"calibration": {"force_std_scale": 1.0, "energy_std_scale": 1.0,
                          "force_std_map": {"sigma": [0.1], "calibrated": [0.2], "extra": 1}}},
         ["'calibration.force_std_map'", "unknown key 'extra'"]),
        ({"calibration": {"force_std_scale": 1.0, "energy_std_scale": 1.0,
                          "force_std_map": {"sigma": [0.1, 0.1], "calibrated": [0.2, 0.3]}}},
         ["'calibration.force_std_map.sigma' must be strictly increasing"]),
        ({"calibration": {"force_std_scale": 1.0, "energy_std_scale": 1.0,
                          "force_std_map": {"sigma": [0.0, 0.1], "calibrated": [0.2, 0.3]}}},
         ["'calibration.force_std_map.sigma' must hold finite numbers > 0"]),
        ({"calibration": {"force_std_scale": 1.0, "energy_std_scale": 1.0,
                          "energy_std_map": {"sigma": [0.1, 0.2], "calibrated": [0.3, 0.2]}}},
         ["'calibration.energy_std_map.calibrated' must be non-decreasing"]),
        ({"calibration": {"force_std_scale": 1.0, "energy_std_scale": 1.0,
                          "energy_std_map": {"sigma": [0.1, 0.2], "calibrated": [-0.1, 0.2]}}},
         ["'calibration.energy_std_map.calibrated' must hold finite numbers > 0"]),
        ({"calibration": {"force_std_scale": 1.0, "energy_std_scale": 1.0,
                          "energy_std_map": {"sigma": [0.1, 0.2], "calibrated": [0.3]}}},
         ["'calibration.energy_std_map.calibrated' must have as many values", "(2), got 1"]),
        ({"calibration": {"force_std_scale": 1.0, "energy_std_scale": 1.0,
                          "energy_std_map": {"sigma": [], "calibrated": []}}},
         ["'calibration.energy_std_map.sigma' must hold at least one knot"]),
        ({"calibration": {"force_std_scale": 1.0, "energy_std_scale": 1.0,
                          "energy_std_map": {"sigma": [0.1, "0.2"], "calibrated": [0.1, 0.2]}}},
         ["'calibration.energy_std_map.sigma' must hold only numbers"]),
        ({"thresholds": {}}, ["'thresholds.atomic_force_std' is missing"]),
        ({"thresholds": 0.3}, ["'thresholds' must be an object"]),
        ({"thresholds": {"atomic_force_std": 0.3, "atomic_force_std_epistemic": -0.1}},
         ["'thresholds.atomic_force_std_epistemic' must be"]),
        ({"thresholds": {"atomic_force_std": 0.3, "energy_std_epistemic_per_atom": "0.01"}},
         ["'thresholds.energy_std_epistemic_per_atom' must be"]),
        ({"thresholds": {"atomic_force_std": 0.3, "atomic_force_std_relative": -0.1}},
         ["'thresholds.atomic_force_std_relative' must be"]),
        ({"posterior": 3}, ["'posterior' must be a string"]),
        ({"format_version": "1"}, ["'format_version' must be an integer"]),
    ],
)
def test_bad_field(core, tmp_path, override, fragments):
    path = tmp_path / "bad.pt"
    write_toy(str(path), metadata_override=override)
    _expect_error(core, path, *fragments)


def test_optional_epistemic_thresholds_are_read_and_logged(core, tmp_path):
    """The thresholds of compute bayesrace's columns 6, 7 and 8 are optional; where present they
    appear in the engine's description (what pair_style bayesrace logs)."""
    path = tmp_path / "thresholds.pt"
    write_toy(str(path))
    assert "c_ug[6]" not in repr(core.Engine(str(path))) and "c_ug[1]" in repr(core.Engine(str(path)))
    write_toy(str(path), metadata_override={"thresholds": {"atomic_force_std": 0.3, "atomic_force_std_epistemic": 0.2,
                                                           "energy_std_epistemic_per_atom": 0.004,
                                                           "atomic_force_std_relative": 0.05}})
    text = repr(core.Engine(str(path)))
    assert "max relative epistemic force sigma 0.05 (c_ug[8])" in text
    assert "max epistemic force sigma 0.2 eV/A (c_ug[6])" in text
    assert "epistemic energy sigma 0.004 eV/atom (c_ug[7])" in text


def test_torch_version_warning(core, tmp_path):
    path = tmp_path / "oldtorch.pt"
    write_toy(str(path), metadata_override={"torch_version": "1.13.1"})
    engine = core.Engine(str(path))
    assert any("1.13.1" in w for w in engine.warnings)


def test_duplicate_key_refused(core, tmp_path):
    path = tmp_path / "dup.pt"
    text = json.dumps(default_metadata(["H"], 3.0, 2, 3, "float64"))[:-1] + ', "cutoff": 2.0}'
    write_toy(str(path), raw_metadata=text)
    _expect_error(core, path, "not valid JSON", 'duplicate key "cutoff"')


def _newer(core, part):
    """A version newer than the plugin's (python/bayesrace/_version.py) in its MAJOR, MINOR or PATCH."""
    major, minor, patch = (int(p) for p in core.BAYESRACE_VERSION.split(".")[:3])
    return {"major": f"{major + 1}.0.0", "minor": f"{major}.{minor + 1}.0", "patch": f"{major}.{minor}.{patch + 1}"}[part]


def test_build_version_is_the_package_version(core):
    from bayesrace import __version__

    assert core.BAYESRACE_VERSION == __version__


@pytest.mark.parametrize("version", ["99.0.0", "next major"])
def test_newer_major_bayesrace_version_refused(core, tmp_path, version):
    version = _newer(core, "major") if version == "next major" else version
    path = tmp_path / "newer_major.pt"
    write_toy(str(path), metadata_override={"bayesrace_version": version})
    _expect_error(core, path, "newer_major.pt", f"'bayesrace_version' is {version}", "newer major version",
                  f"this build of bayesrace ({core.BAYESRACE_VERSION})", "upgrade bayesrace")


@pytest.mark.parametrize("part, warns", [("minor", True), ("patch", False)])
def test_newer_minor_bayesrace_version_warns(core, tmp_path, part, warns):
    version = _newer(core, part)
    path = tmp_path / f"newer_{part}.pt"
    write_toy(str(path), metadata_override={"bayesrace_version": version})
    engine = core.Engine(str(path))
    assert engine.metadata["bayesrace_version"] == version
    found = [w for w in engine.warnings if "bayesrace " + version in w]
    assert len(found) == warns, engine.warnings
    if warns:
        assert "newer minor version" in found[0] and f"({core.BAYESRACE_VERSION})" in found[0], found[0]
