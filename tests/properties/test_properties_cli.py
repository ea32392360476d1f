"""``bayesrace properties train|evaluate`` from the shell."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import ase.io

from property_tools import molecules

ROOT = Path(__file__).resolve().parents[2]


def run(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "bayesrace.cli", "properties", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=600)


def test_train_then_evaluate(tmp_path):
    ase.io.write(tmp_path / "train.xyz", molecules(12, seed=0))
    ase.io.write(tmp_path / "valid.xyz", molecules(4, seed=1))
    result = run("train", "--train", tmp_path / "train.xyz", "--valid", tmp_path / "valid.xyz",
                 "--targets", "U0", "gap", "R2:extent:bohr^2", "--states", "2", "--preset", "tiny",
                 "--cutoff", "4", "--minutes", "0.05", "--members", "1", "--out", tmp_path / "m.pt", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "targets ['U0', 'gap', 'R2', 'S0', 'S1']" in result.stdout
    result = run("evaluate", tmp_path / "m.pt", f"held={tmp_path / 'valid.xyz'}")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("held (4 structures)")
    assert {line.split()[0] for line in lines[1:]} >= {"U0", "gap", "R2", "S0", "S1", "gap"}


def test_bad_target_and_bad_file_are_one_line(tmp_path, capsys):
    from bayesrace.cli import main

    ase.io.write(tmp_path / "train.xyz", molecules(3, seed=0))
    status = main(["properties", "train", "--train", str(tmp_path / "train.xyz"), "--valid",
                   str(tmp_path / "train.xyz"), "--targets", "U0:median", "--out", str(tmp_path / "m.pt")])
    assert status == 2 and "pooling 'median'" in capsys.readouterr().err
    (tmp_path / "x.pt").write_bytes(b"not a model")
    status = main(["properties", "evaluate", str(tmp_path / "x.pt"), str(tmp_path / "train.xyz")])
    err = capsys.readouterr().err
    assert status == 2 and "x.pt" in err and "cannot be read" in err
