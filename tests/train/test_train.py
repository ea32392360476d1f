"""Training: it learns, it resumes exactly, it survives kill -9, MPI members equal serial ones."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ase.io
import pytest
import torch

from bayesrace import load_config, load_posterior
from bayesrace.train import CHECKPOINT, train
from conftest import write_training_config

BIN = Path(sys.executable).parent


def history(run_dir, member=0):
    lines = (Path(run_dir) / f"member_{member}" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def member_weights(run_dir, member=0):
    checkpoint = torch.load(Path(run_dir) / f"member_{member}" / CHECKPOINT, weights_only=False)
    return checkpoint["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_short_training_lowers_validation_loss(psb3_small, tmp_path):
    config = write_training_config(
        tmp_path / "c.yaml", psb3_small, tmp_path / "run",
        loss={"kind": "mse", "mse_warmup_epochs": 0}, training={"max_epochs": 6, "batch_size": 2, "lr": 0.01},
    )
    train(load_config(config), progress=False)
    losses = [entry["valid_loss"] for entry in history(tmp_path / "run")]
    assert len(losses) == 6
    assert min(losses[-2:]) < 0.6 * losses[0], losses
    posterior = load_posterior(tmp_path / "run" / "posterior.pt")
    assert len(posterior.members) == 1
    # the training set's shortest contacts travel with the posterior (PSB3: C-H ≈ 1.1 Å, H-H > 1.5 Å)
    table = posterior.shortest_contacts
    h, c = posterior.type_names.index("H"), posterior.type_names.index("C")
    assert 0.95 < table[h][c] == table[c][h] < 1.25 and table[h][h] > 1.5


def test_resume_continues_exactly(psb3_small, tmp_path):
    straight = write_training_config(tmp_path / "a.yaml", psb3_small, tmp_path / "straight", training={"max_epochs": 4})
    train(load_config(straight), progress=False)
    split = write_training_config(tmp_path / "b.yaml", psb3_small, tmp_path / "split", training={"max_epochs": 2})
    train(load_config(split), progress=False)
    assert len(history(tmp_path / "split")) == 2
    # the same run asked for more epochs: resumes from the checkpoint
    split = write_training_config(tmp_path / "b.yaml", psb3_small, tmp_path / "split", training={"max_epochs": 4})
    train(load_config(split), progress=False)
    assert len(history(tmp_path / "split")) == 4
    assert history(tmp_path / "split") == [
        {**entry, "elapsed_s": b["elapsed_s"]} for entry, b in zip(history(tmp_path / "straight"), history(tmp_path / "split"))
    ]
    assert_same_weights(member_weights(tmp_path / "split"), member_weights(tmp_path / "straight"))


def test_checkpoint_refuses_a_changed_config(psb3_small, tmp_path):
    config = write_training_config(tmp_path / "a.yaml", psb3_small, tmp_path / "run", training={"max_epochs": 1})
    train(load_config(config), progress=False)
    changed = write_training_config(
        tmp_path / "a.yaml", psb3_small, tmp_path / "run", training={"max_epochs": 2, "lr": 0.1}
    )
    with pytest.raises(RuntimeError, match="different config"):
        train(load_config(changed), progress=False)


def test_kill_9_mid_epoch_loses_at_most_that_epoch(psb3_small, tmp_path):
    epochs = 8
    reference = write_training_config(tmp_path / "r.yaml", psb3_small, tmp_path / "reference", training={"max_epochs": epochs})
    train(load_config(reference), progress=False)

    killed = write_training_config(tmp_path / "k.yaml", psb3_small, tmp_path / "killed", training={"max_epochs": epochs})
    command = [str(BIN / "bayesrace"), "train", str(killed), "--quiet"]
    log = tmp_path / "killed.log"
    with open(log, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    log_file = tmp_path / "killed" / "member_0" / "metrics.jsonl"

    def epochs_done() -> int:
        return len(history(tmp_path / "killed")) if log_file.exists() else 0

    # generous: a loaded CI machine may take minutes to import torch and start
    deadline = time.time() + 600
    while time.time() < deadline and epochs_done() < 2 and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, f"training ended before it could be killed:\n{log.read_text()}"
    time.sleep(0.3)  # into the next epoch
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = epochs_done()
    assert 2 <= done < epochs, f"the kill should land mid-run ({done} epochs done); output:\n{log.read_text()}"
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert len(history(tmp_path / "killed")) == epochs
    assert_same_weights(member_weights(tmp_path / "killed"), member_weights(tmp_path / "reference"))


def test_mpi_ensemble_equals_serial_ensemble(psb3_small, tmp_path):
    serial = write_training_config(
        tmp_path / "s.yaml", psb3_small, tmp_path / "serial", training={"max_epochs": 2}, ensemble={"members": 3}
    )
    train(load_config(serial), progress=False)
    parallel = write_training_config(
        tmp_path / "p.yaml", psb3_small, tmp_path / "parallel", training={"max_epochs": 2}, ensemble={"members": 3}
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [str(BIN / "mpirun"), "-np", "2", str(BIN / "bayesrace"), "train", str(parallel), "--quiet"],
        check=True, env=env, timeout=600,
    )
    a = load_posterior(tmp_path / "serial" / "posterior.pt")
    b = load_posterior(tmp_path / "parallel" / "posterior.pt")
    assert len(b.members) == 3
    for member_a, member_b in zip(a.members, b.members):
        assert_same_weights(member_a.state_dict(), member_b.state_dict())
    # members differ from one another (different seeds)
    first, second = a.members[0].state_dict(), a.members[1].state_dict()
    assert any(not torch.equal(first[k], second[k]) for k in first)


def test_reading_and_the_held_out_split_use_no_mpi_collective(psb3_small, tmp_path, monkeypatch):
    """Under mpirun (mpi4py imported) ASE's read and write broadcast from rank 0 by default.
    Rank 0 alone writes the held-out frames, so those broadcasts were never joined by the
    other ranks: on acac rank 0 waited in MPI_Bcast while rank 1 trained, and an earlier run
    ended in "Message truncated". Every read and write of the training data must be local."""
    import ase.parallel

    from bayesrace.train._data import prepare_data, write_held_out

    class TwoRankWorld:
        size, rank = 2, 0

        def __getattr__(self, name):
            raise AssertionError(f"an MPI collective ({name}) was called while reading or writing training data")

    def broadcast(*args, **kwargs):
        raise AssertionError("an MPI broadcast was called while reading or writing training data")

    monkeypatch.setattr(ase.parallel, "world", TwoRankWorld())
    monkeypatch.setattr(ase.parallel, "broadcast", broadcast)
    config = load_config(write_training_config(
        tmp_path / "c.yaml", psb3_small, tmp_path / "run",
        data={"train": str(psb3_small / "train.xyz"), "valid": None, "n_valid": 5}))
    data = prepare_data(config, progress=False)
    (tmp_path / "run").mkdir()
    path = write_held_out(config, data, tmp_path / "run")
    monkeypatch.undo()
    assert len(ase.io.read(path, index=":")) == 5


def test_warm_start_skips_the_mse_warm_up():
    """A warm-started run (training.init_from) has trained variance heads: no MSE epochs."""
    from bayesrace.train import config_from_dict
    from bayesrace.train import mse_warmup_epochs

    values = {"data": {"train": "t.xyz"}, "loss": {"kind": "nll_jef", "mse_warmup_epochs": 3}}
    assert mse_warmup_epochs(config_from_dict(values)) == 3
    values["training"] = {"init_from": "posterior.pt"}
    assert mse_warmup_epochs(config_from_dict(values)) == 0


def test_init_shrink_needs_a_warm_start():
    from bayesrace.train import ConfigError, config_from_dict

    values = {"data": {"train": "t.xyz"}, "training": {"init_shrink": 0.5}}
    with pytest.raises(ConfigError, match="init_shrink .*init_from names no posterior"):
        config_from_dict(values)
    values["training"]["init_from"] = "posterior.pt"
    assert config_from_dict(values).training.init_shrink == 0.5
    values["training"]["init_shrink"] = 1.0
    with pytest.raises(ConfigError, match="init_shrink"):
        config_from_dict(values)


def test_n_valid_writes_the_held_out_frames_and_the_split(psb3_small, tmp_path):
    import ase.io
    import numpy as np

    from bayesrace.train import prepare_data

    config = write_training_config(tmp_path / "c.yaml", psb3_small, tmp_path / "run", training={"max_epochs": 1})
    values = load_config(config)
    values.data.valid = None
    values.data.n_valid = 7
    train(values, progress=False)
    run = tmp_path / "run"
    split = json.loads((run / "split.json").read_text())
    source = ase.io.read(psb3_small / "train.xyz", ":")
    assert len(split["valid"]) == 7 and not set(split["valid"]) & set(split["train"])
    assert sorted(split["valid"] + split["train"]) == list(range(len(source)))
    held_out = ase.io.read(run / "valid_held_out.xyz", ":")
    assert len(held_out) == 7
    for atoms, index in zip(held_out, split["valid"]):
        np.testing.assert_array_equal(atoms.positions, source[index].positions)
        assert atoms.get_potential_energy() == source[index].get_potential_energy()
    # they are exactly the frames training validated on
    data = prepare_data(values)
    assert [len(g.species) for g in data.valid] == [len(a) for a in held_out]
    np.testing.assert_allclose([g.energy for g in data.valid], [a.get_potential_energy() for a in held_out])


def test_a_member_says_why_it_stopped_and_which_epoch_it_keeps(psb3_small, tmp_path, capsys):
    config = write_training_config(tmp_path / "c.yaml", psb3_small, tmp_path / "run", training={"max_epochs": 2},
                                   loss={"kind": "mse", "mse_warmup_epochs": 0})
    train(load_config(config), progress=True)
    best = min(history(tmp_path / "run"), key=lambda entry: entry["valid_loss"])
    err = capsys.readouterr().err
    assert f"member 0: stopped after epoch 2: max_epochs (2) reached; keeps epoch {best['epoch']}" in err, err

    values = load_config(config)
    values.out = str(tmp_path / "timed")
    values.training.max_epochs = 50
    values.training.max_minutes = 1e-4  # past after the first epoch
    train(values, progress=True)
    err = capsys.readouterr().err
    assert "member 0: stopped after epoch 1: its wall-clock budget of 0.0001 min is used" in err, err
    assert "/50" not in err  # no epoch total (and ETA) that the budget makes meaningless
