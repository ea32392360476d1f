"""Posterior kind shallow: one trunk, several readout heads trained on it frozen."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bayesrace import ConfigError, load_config, load_posterior
from bayesrace.train import CHECKPOINT, train
from test_posteriors import assert_sane_posterior, run_config

HEADS = 3


def _is_head(name: str) -> bool:
    return name.startswith("readouts.") or name == "head_log_variance_offset"


def _head_history(run_dir: Path, member: int):
    lines = (run_dir / f"member_{member}" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def shallow_run(psb3_small, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("shallow")
    config = run_config(tmp_path, psb3_small, "shallow", "shallow", training={"max_epochs": 3},
                        shallow={"heads": HEADS, "head_epochs": 2})
    return train(load_config(config), progress=False)


def test_shallow_members_share_the_trunk_and_differ_in_their_heads(psb3_small, shallow_run):
    posterior = assert_sane_posterior(shallow_run, "shallow", HEADS, psb3_small / "valid.xyz")
    states = [member.state_dict() for member in posterior.members]
    trunk = [name for name in states[0] if not _is_head(name)]
    heads = [name for name in states[0] if name.startswith("readouts.")]
    assert trunk and heads
    for state in states[1:]:
        for name in trunk:
            assert torch.equal(state[name], states[0][name]), name
        assert any(not torch.equal(state[name], states[0][name]) for name in heads)
    # each head is its own best validated weights (readouts and variance offsets) on member 0's trunk
    run_dir = Path(shallow_run).parent
    for member, state in enumerate(states):
        best = torch.load(run_dir / f"member_{member}" / CHECKPOINT, weights_only=False)["state"]["best_state"]
        for name in state:
            if _is_head(name):
                assert torch.equal(state[name], best[name]), (member, name)
    # the heads differ from each other as well, not only from member 0's co-trained readouts
    assert any(not torch.equal(states[1][name], states[2][name]) for name in heads)
    summary = posterior.record_info["shallow"]
    assert summary["heads"] == HEADS and summary["head_epochs"] == 2 and summary["trunk_epochs"] == 3


def test_shallow_member_0_is_the_mve_model(psb3_small, shallow_run, tmp_path):
    """Member 0 trains exactly like kind mve (same seed, same loop): the heads are what is added."""
    mve = train(load_config(run_config(tmp_path, psb3_small, "mve", "mve", training={"max_epochs": 3})),
                progress=False)
    for (name, x), y in zip(load_posterior(shallow_run).members[0].state_dict().items(),
                            load_posterior(mve).members[0].state_dict().values()):
        assert torch.equal(x, y), name


def test_shallow_heads_train_on_a_frozen_trunk(shallow_run):
    run_dir = Path(shallow_run).parent
    trunk_best = torch.load(run_dir / "member_0" / CHECKPOINT, weights_only=False)["state"]["best_state"]
    for member in range(1, HEADS):
        checkpoint = torch.load(run_dir / f"member_{member}" / CHECKPOINT, weights_only=False)
        for name, value in checkpoint["model"].items():
            if not _is_head(name):
                assert torch.equal(value, trunk_best[name]), (member, name)
        # a quarter of the head epochs (at least one) of MSE, then the NLL on fitted offsets
        assert [entry["loss_kind"] for entry in _head_history(run_dir, member)] == ["mse", "nll_jef"]
    assert len(_head_history(run_dir, 0)) == 3


def test_shallow_training_resumes_without_retraining(psb3_small, shallow_run):
    run_dir = Path(shallow_run).parent
    before = load_posterior(shallow_run)
    stamps = [(run_dir / f"member_{m}" / CHECKPOINT).stat().st_mtime_ns for m in range(HEADS)]
    # a different head_epochs is a resumable change (like training.max_epochs): nothing is refused
    config = run_config(run_dir.parent, psb3_small, "shallow", "shallow", training={"max_epochs": 3},
                        shallow={"heads": HEADS, "head_epochs": 2})
    after = load_posterior(train(load_config(config), progress=False))
    assert stamps == [(run_dir / f"member_{m}" / CHECKPOINT).stat().st_mtime_ns for m in range(HEADS)]
    for a, b in zip(before.members, after.members):
        for x, y in zip(a.parameters(), b.parameters()):
            assert torch.equal(x, y)


def test_shallow_heads_keep_their_warm_up_under_a_warm_start(psb3_small, shallow_run, tmp_path):
    """training.init_from skips the MSE warm-up (the start's variance heads are trained), but a
    head's readouts start fresh: it warms up and fits its offsets all the same."""
    config = run_config(tmp_path, psb3_small, "warm", "shallow",
                        training={"max_epochs": 2, "init_from": str(shallow_run)},
                        shallow={"heads": 2, "head_epochs": 2})
    posterior = assert_sane_posterior(train(load_config(config), progress=False), "shallow", 2,
                                      psb3_small / "valid.xyz")
    run_dir = tmp_path / "warm"
    assert [entry["loss_kind"] for entry in _head_history(run_dir, 0)] == ["nll_jef", "nll_jef"]
    assert [entry["loss_kind"] for entry in _head_history(run_dir, 1)] == ["mse", "nll_jef"]
    offsets = [member.head_log_variance_offset.detach() for member in posterior.members]
    assert not torch.equal(offsets[0], offsets[1])


@pytest.mark.parametrize("posterior, ensemble, message", [
    ({"kind": "shallow", "shallow": {"heads": 1}}, None, "posterior.shallow.heads must be at least 2"),
    ({"kind": "ensemble", "shallow": {"heads": 3}}, {"members": 2}, "posterior.shallow applies only"),
    ({"kind": "shallow"}, {"members": 2}, "posterior.shallow.heads"),
])
def test_shallow_config_errors_name_the_key(psb3_small, tmp_path, posterior, ensemble, message):
    from conftest import write_training_config

    path = write_training_config(tmp_path / "c.yaml", psb3_small, tmp_path / "run", posterior=posterior,
                                 ensemble=ensemble)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_shallow_heads_over_mpi_ranks_equal_serial_ones(psb3_small, shallow_run, tmp_path):
    """Under mpirun rank 0 trains the trunk, then the heads are spread over the ranks."""
    import os
    import subprocess
    import sys

    config = run_config(tmp_path, psb3_small, "shallow", "shallow", training={"max_epochs": 3},
                        shallow={"heads": HEADS, "head_epochs": 2})
    binaries = Path(sys.executable).parent
    subprocess.run([str(binaries / "mpirun"), "-np", "2", str(binaries / "bayesrace"), "train", str(config), "--quiet"],
                   check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    serial, parallel = load_posterior(shallow_run), load_posterior(tmp_path / "shallow" / "posterior.pt")
    assert len(parallel.members) == HEADS
    for a, b in zip(serial.members, parallel.members):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), name
