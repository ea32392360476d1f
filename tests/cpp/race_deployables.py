"""Real RACE deployables for the layer-mode tests (tiny untrained ensembles, fixed seeds).

Not fixtures by themselves: test modules wrap ``export_race`` in their own fixtures, so
that each module exports only what it uses.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TYPES = ["H", "C", "N"]


def export_race(path: Path, *, n_members: int = 3, n_layers: int = 2, dtype: str = "float64",
                seed: int = 0, threshold: float | None = None) -> str:
    """Export a tiny RACE ensemble (members seeded seed, seed+1, ...) to ``path``."""
    import torch

    from bayesrace import keys
    from bayesrace.bayes import Posterior
    from bayesrace.export import export_posterior
    from conftest import tiny_model

    members = [tiny_model(seed=seed + s, **({} if n_layers == 2 else {"n_layers": n_layers}))
               for s in range(n_members)]
    posterior = Posterior(members).eval()
    export_posterior(posterior, path, training_data_sha256="0" * 64, dtype=getattr(torch, dtype),
                     thresholds=None if threshold is None else {keys.ATOMIC_FORCE_STD: threshold})
    return str(path)


def fold(rows: np.ndarray, n_local: int, ghost_owner: np.ndarray, axis: int = 0) -> np.ndarray:
    """Rows of ghosts added onto their owners: [.., N, ..] -> [.., n_local, ..] along ``axis``."""
    rows = np.moveaxis(np.asarray(rows), axis, 0)
    out = rows[:n_local].copy()
    np.add.at(out, np.asarray(ghost_owner, dtype=np.int64), rows[n_local:])
    return np.moveaxis(out, 0, axis)
