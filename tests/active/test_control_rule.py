"""The run_length rule of control thresholds: an exponential tail fitted to a control run's
largest σ per frame, extrapolated to the length of the run it guards."""

import numpy as np
import pytest

from bayesrace.active._config import active_config_from_dict
from bayesrace.active._control import run_length_level
from bayesrace._schema import ConfigError


def test_run_length_level_known_answer_for_an_exponential_tail():
    """For Exp(1) frame maxima the σ that N frames exceed α times in expectation is ln(N/α)."""
    frames = np.random.default_rng(0).exponential(size=200_000)
    tail = run_length_level(frames, n_checks=1000, false_halts=0.1)
    assert tail["tail_start"] == pytest.approx(np.log(10.0), rel=0.01)  # the 0.9 quantile
    assert tail["tail_scale"] == pytest.approx(1.0, rel=0.02)
    assert tail["tail_rate"] == pytest.approx(0.1, rel=1e-3)
    assert tail["level"] == pytest.approx(np.log(1000 / 0.1), rel=0.01)


def test_run_length_level_grows_with_the_run_and_shrinks_with_the_false_halts():
    frames = np.random.default_rng(1).normal(size=400)
    levels = [run_length_level(frames, n, 0.1)["level"] for n in (10, 100, 1000, 10_000)]
    assert np.all(np.diff(levels) > 0)
    assert run_length_level(frames, 1000, 0.01)["level"] > run_length_level(frames, 1000, 0.5)["level"]
    # never below the tail's start (the fit says nothing there), even for a run shorter than the control
    short = run_length_level(frames, 1, 0.5)
    assert short["level"] == short["tail_start"]


@pytest.mark.parametrize("draw, lowest, highest", [
    (lambda rng, n: rng.normal(size=n), 0.0, 0.05),  # lighter than exponential: fewer false halts than α
    (lambda rng, n: rng.exponential(size=n), 0.05, 0.25),  # α = 0.1 up to the fit's noise on 40 tail frames
])
def test_false_halts_of_in_distribution_runs(draw, lowest, highest):
    """Runs 5× the control's length (2000 frames against 400), drawn from the control's own
    distribution, exceed the level in about α = 0.1 of the cases or fewer."""
    rng = np.random.default_rng(2)
    halted = [draw(rng, 2000).max() > run_length_level(draw(rng, 400), 2000, 0.1)["level"] for _ in range(300)]
    assert lowest <= np.mean(halted) <= highest


def test_run_length_level_refuses_too_short_controls_and_bad_arguments():
    with pytest.raises(ValueError, match=">= 20 checked frames"):
        run_length_level(np.ones(19), 100, 0.1)
    with pytest.raises(ValueError, match="0 < false_halts < 1"):
        run_length_level(np.ones(40), 100, 1.5)


def test_the_run_length_rule_needs_a_long_enough_control_run():
    values = {"mode": "on_the_fly", "initial": "i.xyz", "training": {"model": {}}, "threshold_from": "control",
              "md": {"structure": "s.xyz", "control_temperature": 300.0, "control_steps": 190, "dump_every": 10,
                     "control_rule": "run_length"}}
    with pytest.raises(ConfigError, match="needs md.control_steps >= 20 × md.dump_every \\(200\\), got 190"):
        active_config_from_dict(values)
    values["md"]["control_steps"] = 200
    assert active_config_from_dict(values).md.control_rule == "run_length"
    values["md"]["control_false_halts"] = 1.0
    with pytest.raises(ConfigError, match="control_false_halts"):
        active_config_from_dict(values)
