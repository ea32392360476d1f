"""The bayesrace command: user errors are one line and exit 2; the subcommands run end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import ase
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
    # bayesrace train recorded the training contacts and fitted a feature density
    assert np.all(predicted[0].arrays["feature_distance"] > 0) and np.all(predicted[0].arrays["contact_ratio"] > 0)


def test_missing_posterior_is_a_clear_error(tmp_path):
    result = run("evaluate", tmp_path / "nope.pt", tmp_path / "x.xyz")
    assert result.returncode == 2 and "nope.pt" in result.stderr and "Traceback" not in result.stderr


def test_unknown_dataset(tmp_path):
    result = run("data", "qm7", "--out", tmp_path)
    assert result.returncode == 2 and "psb3" in result.stderr


@pytest.mark.parametrize("case", ["truncated_posterior", "unknown_element"])
def test_predict_bad_input_is_one_clear_line(tmp_path, case):
    """No chained traceback before the message (issue 11, item 6): the message only, exit 2."""
    from bayesrace.bayes import save_posterior
    from conftest import tiny_model

    posterior = tmp_path / "posterior.pt"
    save_posterior(posterior, [tiny_model(seed=0).eval()], data_sha256="ab" * 32)
    structures = tmp_path / "in.xyz"
    symbols = "FeH" if case == "unknown_element" else "CH"
    ase.io.write(structures, ase.Atoms(symbols, positions=[[0.0, 0.0, 0.0], [0.0, 0.0, 1.1]]))
    if case == "truncated_posterior":
        data = posterior.read_bytes()
        posterior.write_bytes(data[: len(data) // 2])
        fragments = ["posterior.pt", "not a readable bayesrace posterior"]
    else:
        fragments = ["element Fe", "not known to the model"]
    result = run("predict", posterior, structures, "--out", tmp_path / "out.xyz")
    assert result.returncode == 2
    assert result.stderr.startswith("bayesrace predict: error: ")
    assert all(fragment in result.stderr for fragment in fragments), result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out.xyz").exists()


def test_export_is_one_command_under_two_names(tmp_path, capsys):
    """`bayesrace export` and `bayesrace-export` are the same command; only the name differs."""
    from bayesrace.cli import export_main, main

    args = [str(tmp_path / "missing.pt"), str(tmp_path / "model.pt")]
    assert main(["export", *args]) == 2
    assert capsys.readouterr().err.startswith("bayesrace export: error: ")
    assert export_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("bayesrace-export: error: ") and "no such posterior file" in err
