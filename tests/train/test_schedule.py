"""The learning-rate schedule 'cosine': constant, then a half cosine to min_lr at the end of the budget."""

from __future__ import annotations

import math

import pytest
import torch

from bayesrace.train import config_from_dict
from bayesrace.train._optim import CosineToBudget, make_scheduler


def schedule(**training):
    values = {"data": {"train": "train.xyz"}, "training": {"lr": 0.01, "min_lr": 1e-4, "schedule": "cosine",
                                                         "max_epochs": 100, **training}}
    config = config_from_dict(values)
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=config.training.lr)
    return make_scheduler(config, optimizer), optimizer


def test_constant_then_half_cosine_over_the_last_fraction_of_the_epochs():
    scheduler, optimizer = schedule(decay_fraction=0.25)
    assert isinstance(scheduler, CosineToBudget)
    expected = {0.0: 0.01, 50.0: 0.01, 75.0: 0.01, 87.5: 0.5 * (0.01 + 1e-4), 100.0: 1e-4, 130.0: 1e-4}
    for epochs, lr in expected.items():
        scheduler.at(epochs, elapsed_s=0.0)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-12), epochs
    scheduler.at(81.25, elapsed_s=0.0)  # a quarter into the decay
    quarter = 1e-4 + 0.5 * (0.01 - 1e-4) * (1 + math.cos(math.pi / 4))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(quarter, rel=1e-12)


def test_a_wall_clock_budget_counts_when_it_runs_out_first():
    scheduler, optimizer = schedule(decay_fraction=1.0, max_minutes=2.0)
    scheduler.at(1.0, elapsed_s=60.0)  # half the minutes, 1 % of the epochs
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * (0.01 + 1e-4), rel=1e-12)
    scheduler.at(1.0, elapsed_s=120.0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4, rel=1e-12)
    # stateless: nothing to save, and the plateau interface is accepted
    scheduler.step(0.3)
    assert scheduler.state_dict() == {}


def test_plateau_stays_the_default_and_bad_fractions_are_refused():
    from bayesrace.train import ConfigError

    config = config_from_dict({"data": {"train": "train.xyz"}})
    assert config.training.schedule == "plateau"
    with pytest.raises(ConfigError, match="decay_fraction"):
        config_from_dict({"data": {"train": "train.xyz"}, "training": {"schedule": "cosine", "decay_fraction": 0}})
