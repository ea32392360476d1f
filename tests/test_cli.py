"""The bayesrace command: user errors are one line and exit 2; the subcommands run end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest

from conftest import write_training_config

BAYESRACE = str(Path(sys.executable).parent / "bayesrace")


def run(*args, cwd=None):
    return subprocess.run([BAYESRACE, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_misspelt_config_key_is_a_one_line_error(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  train: t.xyz\ntraining:\n  epochs: 3\n")
    result = run("train", config)
    assert result.returncode == 2
    assert "unknown key 'epochs' in section 'training'" in result.stderr
    assert "max_epochs" in result.stderr and "Traceback" not in result.stderr


def test_bad_training_file_names_file_and_frame(tmp_path):
    bad = tmp_path / "bad.xyz"
    bad.write_text("2\nenergy=1.0 Properties=species:S:1:pos:R:3:forces:R:3\nH 0 0 0 0 0 0\nH 0 0 0.74 0 0 nan\n" * 3)
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  train: {bad}\n  n_valid: 1\n")
    result = run("train", config)
    assert result.returncode == 2
    assert "bad.xyz, frame 0" in result.stderr and "forces" in result.stderr


def test_train_evaluate_predict(psb3_small, tmp_path):
    config = write_training_config(tmp_path / "c.yaml", psb3_small, tmp_path / "run", training={"max_epochs": 1},
                                   ensemble={"members": 2})
    result = run("train", config, "--quiet")
    assert result.returncode == 0, result.stderr
    posterior = tmp_path / "run" / "posterior.pt"
    assert posterior.is_file()

    result = run("evaluate", posterior, f"id={psb3_small / 'test_id.xyz'}", psb3_small / "test_ood_hot.xyz",
                 "--report", tmp_path / "report", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "id" in result.stdout and "test_ood_hot" in result.stdout
    for name in ("metrics.json", "report.md", "parity_forces.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0

    out = tmp_path / "pred.xyz"
    result = run("predict", posterior, psb3_small / "test_id.xyz", "--out", out)
    assert result.returncode == 0, result.stderr
    predicted = ase.io.read(out, ":")
    reference = ase.io.read(psb3_small / "test_id.xyz", ":")
    assert len(predicted) == len(reference)
    assert predicted[0].arrays["forces_std"].shape == (len(reference[0]),)
    assert np.all(predicted[0].arrays["forces_std"] > 0)


def test_missing_posterior_is_a_clear_error(tmp_path):
    result = run("evaluate", tmp_path / "nope.pt", tmp_path / "x.xyz")
    assert result.returncode == 2 and "nope.pt" in result.stderr and "Traceback" not in result.stderr


def test_unknown_dataset(tmp_path):
    result = run("data", "qm9", "--out", tmp_path)
    assert result.returncode == 2 and "psb3" in result.stderr
