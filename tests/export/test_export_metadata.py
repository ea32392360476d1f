"""The deployable's metadata (fields, what the posterior record and the arguments put in
it), the exporter's refusals, the threshold measured on structures, and the command line
(``bayesrace export`` / ``bayesrace-export``)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from bayesrace import keys
from bayesrace.bayes import Posterior, save_posterior
from bayesrace.calculator import BayesRaceCalculator
from bayesrace.cli import export_main as main
from bayesrace.export import (
    ExportError,
    build_metadata,
    export_posterior,
    read_metadata,
    threshold_from_structures,
)
from conftest import tiny_model
from deployable_tools import TYPES
from test_export import HASH, make_posterior, psb3_like


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The default export of make_posterior(), as in test_export.py."""
    posterior = make_posterior()
    path = tmp_path_factory.mktemp("export") / "model.pt"
    return posterior, str(path), export_posterior(posterior, path)


# ------------------------------------------------------------------ metadata and refusals


def test_metadata_fields(exported):
    posterior, path, meta = exported
    assert read_metadata(path) == meta
    assert meta[keys.META_FORMAT_VERSION] == 1
    assert meta[keys.META_TYPE_NAMES] == TYPES
    assert meta[keys.META_CUTOFF] == posterior.cutoff and meta[keys.META_N_LAYERS] == 2
    assert meta[keys.META_N_MEMBERS] == 3 and meta[keys.META_POSTERIOR] == "ensemble"
    assert meta[keys.META_TRAINING_DATA_SHA256] == HASH
    assert meta[keys.META_CALIBRATION] == {keys.META_FORCE_STD_SCALE: 1.0, keys.META_ENERGY_STD_SCALE: 1.0}
    # documented default: 3 x the smallest force sigma the heads can give, sqrt(1e-3)
    assert meta[keys.META_THRESHOLDS][keys.ATOMIC_FORCE_STD] == pytest.approx(3.0 * 1e-3**0.5)
    assert meta[keys.META_TORCH_VERSION] == torch.__version__


FORCE_MAP = {keys.META_MAP_SIGMA: [0.02, 0.05, 0.1], keys.META_MAP_CALIBRATED: [0.03, 0.04, 0.2]}
ENERGY_MAP = {keys.META_MAP_SIGMA: [0.001, 0.01], keys.META_MAP_CALIBRATED: [0.002, 0.005]}


def test_record_thresholds_and_calibration_are_used(tmp_path):
    """What `bayesrace calibrate` stores in the record reaches metadata.json; arguments win."""
    from bayesrace.bayes import load_posterior

    members = [tiny_model(seed=0).eval()]
    record_calibration = {keys.META_FORCE_STD_SCALE: 2.0, keys.META_FORCE_STD_MAP: FORCE_MAP,
                          keys.META_ENERGY_STD_MAP: ENERGY_MAP}
    save_posterior(tmp_path / "p.pt", members, data_sha256=HASH, calibration=record_calibration,
                   thresholds={keys.ATOMIC_FORCE_STD: 0.4})
    posterior = load_posterior(tmp_path / "p.pt")
    meta = build_metadata(posterior, "float64")
    assert meta[keys.META_THRESHOLDS][keys.ATOMIC_FORCE_STD] == 0.4
    assert meta[keys.META_CALIBRATION] == {keys.META_FORCE_STD_SCALE: 2.0, keys.META_ENERGY_STD_SCALE: 1.0,
                                           keys.META_FORCE_STD_MAP: FORCE_MAP,
                                           keys.META_ENERGY_STD_MAP: ENERGY_MAP}
    # explicit arguments win over the record, field by field (the maps stay unless removed)
    meta = build_metadata(posterior, "float64", thresholds={keys.ATOMIC_FORCE_STD: 0.3},
                          calibration={keys.META_FORCE_STD_SCALE: 1.5, keys.META_ENERGY_STD_MAP: None})
    assert meta[keys.META_THRESHOLDS][keys.ATOMIC_FORCE_STD] == 0.3
    assert meta[keys.META_CALIBRATION] == {keys.META_FORCE_STD_SCALE: 1.5, keys.META_ENERGY_STD_SCALE: 1.0,
                                           keys.META_FORCE_STD_MAP: FORCE_MAP}
    # the default threshold is 3 x the smallest head σ, calibrated: sqrt(1e-3) = 0.0316 lies
    # between the first two knots, g = 0.03 + 0.01 (0.0316 - 0.02) / 0.03
    posterior.thresholds = {}
    floor = 1e-3**0.5
    meta = build_metadata(posterior, "float64")
    want = 3.0 * 2.0 * (0.03 + 0.01 * (floor - 0.02) / 0.03)
    assert meta[keys.META_THRESHOLDS][keys.ATOMIC_FORCE_STD] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("training", "training mode"),
        ("no_hash", "'training_data_sha256' is missing"),
        ("dtype", "dtype 'float16' is not supported"),
        ("calibration", "calibration.force_std_scale must be a finite number > 0"),
        ("calibration_map", "calibration.force_std_map.sigma must be strictly increasing"),
        ("calibration_key", "unknown field(s) ['force_std_shift']"),
        ("threshold_key", "unknown threshold field"),
        ("not_posterior", "needs a bayesrace Posterior"),
    ],
)
def test_refusals(tmp_path, case, fragment):
    posterior = make_posterior(seeds=(0,))
    kwargs = {}
    if case == "training":
        posterior.members[0].train()
    elif case == "no_hash":
        posterior.record_info = {}
    elif case == "dtype":
        kwargs["dtype"] = "float16"
    elif case == "calibration":
        kwargs["calibration"] = {keys.META_FORCE_STD_SCALE: -1.0}
    elif case == "calibration_map":
        kwargs["calibration"] = {keys.META_FORCE_STD_MAP: {keys.META_MAP_SIGMA: [0.2, 0.1],
                                                           keys.META_MAP_CALIBRATED: [0.1, 0.2]}}
    elif case == "calibration_key":
        kwargs["calibration"] = {"force_std_shift": 0.1}
    elif case == "threshold_key":
        kwargs["thresholds"] = {"max_force_std": 0.3}
    elif case == "not_posterior":
        posterior = posterior.members[0]
    with pytest.raises(ExportError, match=re.escape(fragment)):
        export_posterior(posterior, tmp_path / "m.pt", **kwargs)
    assert not (tmp_path / "m.pt").exists()


def test_threshold_from_structures():
    from bayesrace.bayes import calibrated_std

    posterior = make_posterior(seeds=(0, 1))
    frames = [psb3_like(seed=k) for k in range(4)]
    calc = BayesRaceCalculator(make_posterior(seeds=(0, 1)))
    largest = []
    for atoms in frames:
        calc.calculate(atoms, ["energy"])
        largest.append(calc.results["forces_std"].max())
    scaled = {keys.META_FORCE_STD_SCALE: 2.0, keys.META_ENERGY_STD_SCALE: 1.0}
    got = threshold_from_structures(posterior, frames, 1.0, factor=1.0, calibration=scaled)
    assert got == pytest.approx(2.0 * max(largest), rel=1e-12)
    got = threshold_from_structures(posterior, frames, 0.5)  # default margin 1.5
    assert got == pytest.approx(1.5 * np.median(largest), rel=1e-12)
    # the posterior's own calibration is used, and a given one replaces it (never both)
    posterior.calibration = scaled
    assert threshold_from_structures(posterior, frames, 1.0, factor=1.0) == pytest.approx(2.0 * max(largest))
    mapped = {keys.META_FORCE_STD_SCALE: 1.0, keys.META_FORCE_STD_MAP: {
        keys.META_MAP_SIGMA: [0.5 * min(largest), max(largest)], keys.META_MAP_CALIBRATED: [0.01, 3.0]}}
    got = threshold_from_structures(posterior, frames, 1.0, factor=1.0, calibration=mapped)
    # c is non-decreasing, so the largest calibrated σ is c(largest σ): here the last knot, 3.0
    assert got == pytest.approx(3.0, rel=1e-10)
    got = threshold_from_structures(posterior, frames, 0.0 + 1e-9, factor=1.0, calibration=mapped)
    want = calibrated_std(np.array([min(largest)]), 1.0, mapped[keys.META_FORCE_STD_MAP])[0]
    assert got == pytest.approx(want, rel=1e-6)
    assert posterior.calibration == scaled  # the posterior is not touched
    with pytest.raises(ExportError, match="quantile"):
        threshold_from_structures(posterior, frames, 0.0)


def test_command_line(tmp_path, capsys):
    import ase.io

    members = [tiny_model(seed=s).eval() for s in (0, 1)]
    save_posterior(tmp_path / "posterior.pt", members, kind="ensemble", data_sha256=HASH)
    frames = [psb3_like(seed=k) for k in range(3)]
    ase.io.write(tmp_path / "valid.xyz", frames)
    out = tmp_path / "deploy" / "model.pt"
    rc = main([str(tmp_path / "posterior.pt"), str(out), "--force-std-scale", "1.5",
               "--threshold-from", str(tmp_path / "valid.xyz"), "--threshold-quantile", "1.0",
               "--threshold-factor", "1.2"])
    assert rc == 0
    assert "2 members (ensemble)" in capsys.readouterr().out
    meta = read_metadata(out)
    assert meta[keys.META_CALIBRATION][keys.META_FORCE_STD_SCALE] == 1.5
    # the threshold is measured on the given structures, on the calibrated scale
    want = threshold_from_structures(Posterior(members).eval(), frames, 1.0, factor=1.2,
                                     calibration={keys.META_FORCE_STD_SCALE: 1.5})
    assert meta[keys.META_THRESHOLDS][keys.ATOMIC_FORCE_STD] == pytest.approx(want, rel=1e-6)  # extxyz rounding
    assert json.loads(json.dumps(meta)) == meta

    # maps come from the record ('bayesrace calibrate'); the flags replace only the scales
    save_posterior(tmp_path / "calibrated.pt", members, kind="ensemble", data_sha256=HASH,
                   calibration={keys.META_FORCE_STD_SCALE: 1.2, keys.META_FORCE_STD_MAP: FORCE_MAP})
    out = tmp_path / "deploy" / "calibrated.pt"
    assert main([str(tmp_path / "calibrated.pt"), str(out), "--force-std-scale", "1.5",
                 "--threshold-from", str(tmp_path / "valid.xyz"), "--threshold-quantile", "1.0"]) == 0
    meta = read_metadata(out)
    cal = {keys.META_FORCE_STD_SCALE: 1.5, keys.META_ENERGY_STD_SCALE: 1.0, keys.META_FORCE_STD_MAP: FORCE_MAP}
    assert meta[keys.META_CALIBRATION] == cal
    want = threshold_from_structures(Posterior(members).eval(), frames, 1.0, calibration=cal)
    assert meta[keys.META_THRESHOLDS][keys.ATOMIC_FORCE_STD] == pytest.approx(want, rel=1e-6)
    capsys.readouterr()

    assert main([str(tmp_path / "missing.pt"), str(tmp_path / "x.pt")]) == 2
    assert "no such posterior file" in capsys.readouterr().err
    assert main([str(tmp_path / "posterior.pt"), str(tmp_path / "x.pt"), "--energy-std-scale", "0"]) == 2
    assert "energy_std_scale" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path / "posterior.pt"), str(tmp_path / "x.pt"), "--dtype", "float16"])
