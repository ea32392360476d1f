"""What the pool loop and the on-the-fly loop share, round by round: the run's ``state.json``
(refused when the configuration it was started with differs; saved atomically after every
stage), training a round, and the progress lines on stderr."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

from .._files import write_json_atomic

STATE_FILE = "state.json"


class Display:
    """``say(message)``: a progress line ``bayesrace al: message`` on stderr, when enabled."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"bayesrace al: {message}", file=sys.stderr, flush=True)


def open_state(out: Path, fingerprint: Dict[str, Any], fresh: Dict[str, Any],
               say: Callable[[str], None]) -> Tuple[Dict[str, Any], Callable[[], None]]:
    """The state of the run in ``out`` (``fresh`` plus ``fingerprint`` when there is none) and
    the function that saves it. ``fingerprint``: what a restarted run must agree with."""
    from ..train import ConfigError  # only here: ..train imports torch

    state_path = out / STATE_FILE
    if state_path.is_file():
        state = json.loads(state_path.read_text())
        if state.get("fingerprint") != fingerprint:
            changed = sorted(k for k in fingerprint if state.get("fingerprint", {}).get(k) != fingerprint[k])
            raise ConfigError(f"{out}: this directory holds an active-learning run with different {changed}; "
                              "use another 'out' or delete it to start over")
        say(f"continuing the run in {out}")
    else:
        state = dict(fingerprint=fingerprint, **fresh)
    return state, lambda: write_json_atomic(state_path, state)


def train_round(training_config, ranks: int, progress: bool) -> None:
    """Train one round: in this process, or under ``mpirun -np ranks`` from the round's
    ``train_config.yaml`` (the same Config, written out)."""
    from ..train import train, train_config_file, train_under_mpirun

    if ranks <= 1:
        train(training_config, progress=progress)
        return
    path = train_config_file(training_config, Path(training_config.out) / "train_config.yaml")
    train_under_mpirun(path, ranks, quiet=not progress)
