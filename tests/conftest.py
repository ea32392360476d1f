"""Shared helpers: small random structures and tiny models, built through the real pipeline."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


torch.set_num_threads(int(os.environ.get("BAYESRACE_TEST_THREADS", "1")))


def random_molecule(n_atoms: int, symbols=("H", "C", "N"), seed: int = 0, box: float = 3.0, min_distance: float = 0.9):
    """Random positions with no pair closer than min_distance (rejection sampling)."""
    import ase

    rng = np.random.default_rng(seed)
    positions = []
    while len(positions) < n_atoms:
        candidate = rng.uniform(0, box, size=3)
        if all(np.linalg.norm(candidate - p) >= min_distance for p in positions):
            positions.append(candidate)
    chosen = [symbols[i % len(symbols)] for i in range(n_atoms)]
    return ase.Atoms(chosen, positions=np.array(positions))


def batch_of(atoms_list, type_names, cutoff, dtype=torch.float64):
    """Collated batch for ASE Atoms objects through the package's own data path."""
    from bayesrace.data import Frame, TypeMap, collate, frames_to_graphs

    frames = [
        Frame(
            numbers=a.numbers.astype(np.int64),
            positions=a.positions.astype(np.float64),
            cell=np.array(a.cell, dtype=np.float64) if a.pbc.any() else np.zeros((3, 3)),
            pbc=np.array(a.pbc, dtype=bool),
            source=f"test structure {k}",
        )
        for k, a in enumerate(atoms_list)
    ]
    return collate(frames_to_graphs(frames, TypeMap(list(type_names)), cutoff), dtype=dtype)


def tiny_model(seed=0, covariance="cholesky", preset="tiny", dtype=torch.float64, **overrides):
    from bayesrace.model import build_model, model_config_from

    config = model_config_from(preset, avg_num_neighbors=8.0, covariance=covariance, **overrides)
    # non-trivial reference energies and scale so their handling is exercised too
    return build_model(config, ["H", "C", "N"], [-13.6, -1030.0, -1480.0], 0.1, 0.7, dtype=dtype, seed=seed)


@pytest.fixture
def acac_dir():
    path = SHARED_DATA / "acac"
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path}")
    return path


@pytest.fixture(scope="session")
def psb3_small(tmp_path_factory):
    """A small PSB3 data set (GFN2-xTB through tblite), generated once per test session."""
    from bayesrace.data import generate_psb3

    out = tmp_path_factory.mktemp("psb3_small")
    generate_psb3(out, seed=1, scale=0.1, progress=False)
    return out


def write_training_config(path, data_dir, out, **sections):
    """A YAML config for a fast run on PSB3 data; sections override the defaults."""
    import yaml

    config = {
        "out": str(out),
        "seed": 0,
        "data": {"train": str(data_dir / "train.xyz"), "valid": str(data_dir / "valid.xyz")},
        "model": {"preset": "tiny"},
        "loss": {"kind": "nll_jef", "mse_warmup_epochs": 1},
        "training": {"batch_size": 4, "max_epochs": 3, "lr": 0.005},
        "ensemble": {"members": 1},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            config.setdefault(name, {}).update(values)
        else:
            config[name] = values
    path.write_text(yaml.safe_dump(config))
    return path
