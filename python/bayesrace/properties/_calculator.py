"""An ASE calculator that puts one electronic state of a multi-state ensemble under ASE.

``StateCalculator(ensemble, state=1)`` gives ``energy`` and ``forces`` of that state (the
member mean) and, in ``calc.results``: ``energy_std`` (eV) and ``forces_std`` ([N], eV/Å,
per Cartesian component, √(epistemic + aleatoric)) of that state, ``state_energies`` [S]
(eV, every state), and with two or more states ``gap`` = E_1 − E_0 and ``gap_std`` (eV).
Change the state between steps with ``calc.set_state(k)``.
"""

from __future__ import annotations

import numpy as np
from ase.calculators.calculator import Calculator, all_changes

from ..data import Frame, TypeMap, frames_to_graphs
from ._predict import PropertyEnsemble
from ._targets import PropertySet


class StateCalculator(Calculator):
    implemented_properties = ["energy", "free_energy", "forces"]

    def __init__(self, ensemble: PropertyEnsemble, state: int = 0, **kwargs):
        super().__init__(**kwargs)
        if not ensemble.state_names:
            raise ValueError("StateCalculator needs an ensemble with state targets; this one predicts "
                             f"{ensemble.scalar_names}")
        self.ensemble = ensemble
        self.type_map = TypeMap(ensemble.type_names)
        self.state = 0
        self.set_state(state)

    def set_state(self, state: int) -> None:
        n_states = len(self.ensemble.state_names)
        if not 0 <= int(state) < n_states:
            raise ValueError(f"state {state} does not exist: the model has states 0..{n_states - 1} "
                             f"({self.ensemble.state_names})")
        self.state = int(state)
        self.reset()

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        frame = Frame(numbers=atoms.numbers.astype(np.int64), positions=atoms.positions.astype(np.float64),
                      cell=np.asarray(atoms.cell.array, dtype=np.float64), pbc=np.asarray(atoms.pbc, dtype=bool),
                      source="StateCalculator atoms")
        graphs = frames_to_graphs([frame], self.type_map, self.ensemble.cutoff)
        n_states = len(self.ensemble.state_names)
        data = PropertySet(graphs, np.zeros((1, len(self.ensemble.scalar_names))), np.zeros((1, n_states)),
                           [np.zeros((len(atoms), n_states, 3))])
        pred = self.ensemble.predict(data, forces=True)
        s = self.state
        energy = float(pred["energy"][0, s])
        self.results["energy"] = self.results["free_energy"] = energy
        self.results["forces"] = pred["forces"][:, s].copy()
        self.results["energy_std"] = float(np.sqrt(pred["energy_var_epistemic"][0, s] + pred["energy_var_aleatoric"][0, s]))
        force_var = pred["forces_var_epistemic"][:, s] + pred["forces_var_aleatoric"][:, s]
        self.results["forces_std"] = np.sqrt(force_var.mean(axis=-1))
        self.results["state_energies"] = pred["energy"][0].copy()
        if "gap" in pred:
            self.results["gap"] = float(pred["gap"][0])
            self.results["gap_std"] = float(np.sqrt(pred["gap_var_epistemic"][0] + pred["gap_var_aleatoric"][0]))
