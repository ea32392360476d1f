"""Helpers of the active-learning tests (pool and on-the-fly): a fast training section and
an oracle that counts, and can fail like a kill."""

from __future__ import annotations


def training_section(data_dir, members=2, epochs=1):
    """The ``training`` section of a fast run on the PSB3 set in ``data_dir`` (tiny model, nll_jef)."""
    return {
        "seed": 0,
        "data": {"valid": str(data_dir / "valid.xyz")},
        "model": {"preset": "tiny"},
        "loss": {"kind": "nll_jef", "mse_warmup_epochs": 0},
        "training": {"batch_size": 4, "max_epochs": epochs, "lr": 0.005},
        "ensemble": {"members": members},
    }


class CountingOracle:
    """Wraps an oracle, counts calls per pool index and can fail after n labels (a 'kill')."""

    def __init__(self, inner, fail_after=None):
        self.inner, self.fail_after, self.calls = inner, fail_after, []

    def label_one(self, atoms):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        self.calls.append(int(atoms.info["pool_index"]))
        return self.inner.label_one(atoms)
