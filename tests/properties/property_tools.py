"""Small made-up molecules with labels for every kind of property target (tests only)."""

from __future__ import annotations

import ase
import numpy as np


def molecules(n: int, seed: int):
    """Small random C/O/H molecules with made-up smooth labels for every target."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        symbols = rng.choice(["C", "O"], size=2).tolist() + ["H"] * int(rng.integers(1, 4))
        positions = rng.normal(scale=0.9, size=(len(symbols), 3))
        positions[1] += [1.3, 0.0, 0.0]
        atoms = ase.Atoms(symbols, positions=positions)
        d = atoms.get_all_distances()[np.triu_indices(len(atoms), 1)]
        if d.min() < 0.7:
            positions += rng.normal(scale=0.1, size=positions.shape)
            atoms.positions = positions
        energy_pairs = float(np.sum(np.exp(-atoms.get_all_distances()[np.triu_indices(len(atoms), 1)])))
        atoms.info["U0"] = -10.0 * symbols.count("C") - 7.0 * symbols.count("O") - 1.0 * symbols.count("H") + energy_pairs
        atoms.info["R2"] = float(np.sum((1.0 + 0.5 * (np.array(symbols) != "H")) * np.sum((positions - positions.mean(0)) ** 2, 1)))
        atoms.info["gap"] = 5.0 + 0.3 * float(np.mean(np.linalg.norm(positions - positions.mean(0), axis=1)))
        charges = np.array([0.3 if s == "O" else (-0.1 if s == "C" else 0.05) for s in symbols])
        charges -= charges.mean()
        atoms.info["mu"] = float(np.linalg.norm((charges[:, None] * positions).sum(0)) * 4.803204)
        # two "states": harmonic-ish surfaces with forces
        for s, k in ((0, 1.0), (1, 0.6)):
            centre = positions.mean(axis=0)
            r2 = np.sum((positions - centre) ** 2, axis=1)
            atoms.info[f"energy_s{s}"] = float(k * r2.sum() + 2.0 * s)
            atoms.arrays[f"forces_s{s}"] = -2.0 * k * (positions - centre)
        frames.append(atoms)
    return frames
