"""What a training member reports while it trains: a tqdm bar per member when one process
trains, a line per epoch (at most every 10 s) under MPI, and phase changes on stderr."""

from __future__ import annotations

import sys
import time
from typing import Dict, Optional


class EpochProgress:
    """A tqdm bar when one process trains; a line per epoch (at most every 10 s) under MPI."""

    def __init__(self, member: int, total: Optional[int], start: int, enabled: bool, use_bar: bool,
                 budget_minutes: Optional[float] = None):
        """``total`` None: the number of epochs is not known (a wall-clock budget,
        ``budget_minutes``, shown with the minutes used instead)."""
        self.enabled = enabled
        self.member = member
        self.budget_minutes = budget_minutes
        self.bar = None
        self.last_line = 0.0
        if enabled and use_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc=f"member {member}", unit="epoch", dynamic_ncols=True)

    def update(self, entry: Dict) -> None:
        if not self.enabled:
            return
        summary = dict(
            train=f"{entry['train_loss']:.3g}",
            valid=f"{entry['valid_loss']:.3g}",
            E=f"{1000 * entry['valid_energy_rmse_per_atom']:.2f}meV/at",
            F=f"{1000 * entry['valid_force_rmse']:.1f}meV/Å",
        )
        if self.budget_minutes is not None:
            summary["budget"] = f"{entry['elapsed_s'] / 60.0:.1f}/{self.budget_minutes:g}min"
        if self.bar is not None:
            self.bar.set_postfix(summary, refresh=False)
            self.bar.update(1)
        elif time.time() - self.last_line > 10.0:
            self.last_line = time.time()
            print(f"member {self.member} epoch {entry['epoch']}: " + " ".join(f"{k}={v}" for k, v in summary.items()),
                  flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


    def say(self, message: str) -> None:
        """A message between the bar's updates (e.g. a new training phase), on stderr."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)
