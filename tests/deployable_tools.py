"""Evaluating a deployable in tests: the contract's inputs for a whole structure, a call of
the TorchScript module, and the C++ engine's output under the ASE calculator's names.
Shared by the export tests and the posterior-kind tests."""

from __future__ import annotations

import numpy as np
import torch

from bayesrace import keys
from bayesrace.data import neighbour_list

TYPES = ["H", "C", "N"]  # the elements of the test posteriors (species = index here)


def deployable_inputs(atoms, cutoff, dtype=torch.float64):
    """The contract's inputs for a whole structure: edge_shifts = cell_shift @ cell."""
    pbc = np.asarray(atoms.pbc, dtype=bool)
    cell = np.array(atoms.cell.array) if pbc.any() else np.zeros((3, 3))
    edge_index, cell_shift = neighbour_list(atoms.positions, cell, pbc, cutoff)
    species = np.array([TYPES.index(s) for s in atoms.get_chemical_symbols()], dtype=np.int64)
    return {
        "positions": np.array(atoms.positions, dtype=np.float64),
        "species": species,
        "edge_index": edge_index,
        "edge_shifts": cell_shift.astype(np.float64) @ cell,
    }


def call(module, inputs, n_local=None, atomic_virial=True, dtype=torch.float64):
    n = len(inputs["positions"]) if n_local is None else n_local
    out = module(
        torch.tensor(inputs["positions"], dtype=dtype),
        torch.tensor(inputs["species"]),
        torch.tensor(inputs["edge_index"]),
        torch.tensor(inputs["edge_shifts"], dtype=dtype),
        int(n),
        atomic_virial,
    )
    return {k: v.detach() for k, v in out.items()}


def engine_results(core_engine, atoms, cutoff):
    """The ASE calculator's result names, computed from the C++ engine's output."""
    inputs = deployable_inputs(atoms, cutoff)
    out = core_engine.evaluate(inputs["positions"], inputs["species"], inputs["edge_index"],
                               inputs["edge_shifts"], len(atoms), "mean", False)
    results = {
        "energy": float(out[keys.ENERGY]),
        "forces": out[keys.FORCES],
        "energies": out[keys.ATOMIC_ENERGY],
        "energy_std": float(out[keys.ENERGY_STD]),
        "energy_std_epistemic": float(np.sqrt(out[keys.ENERGY_VAR_EPISTEMIC])),
        "energy_std_aleatoric": float(np.sqrt(out[keys.ENERGY_VAR_ALEATORIC])),
        "forces_std": out[keys.ATOMIC_FORCE_STD],
        "forces_std_epistemic": out[keys.ATOMIC_FORCE_STD_EPISTEMIC],
        "forces_std_aleatoric": out[keys.ATOMIC_FORCE_STD_ALEATORIC],
        "energies_std": out[keys.ATOMIC_ENERGY_STD],
        "member_energies": out[keys.MEMBER_ENERGY],
        "member_forces": out[keys.MEMBER_FORCES],
    }
    if atoms.pbc.all():
        from ase.stress import full_3x3_to_voigt_6_stress

        results["stress"] = full_3x3_to_voigt_6_stress(-out[keys.VIRIAL] / atoms.get_volume())
    return results
