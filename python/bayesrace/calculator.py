"""An ASE calculator for a bayesrace posterior: mean predictions plus their uncertainty.

Besides the standard ASE properties (``energy``, ``free_energy``, ``forces``, ``stress``,
``energies``) every calculation stores the predictive uncertainty in ``calc.results``
under the names below (each also readable as ``calc.get_property(name, atoms)``):

========================  ===========  ====  ==================================================
name                      shape        unit  meaning
========================  ===========  ====  ==================================================
``energy_std``            scalar       eV    total σ of the energy, sqrt(epistemic² + aleatoric²)
``energy_std_epistemic``  scalar       eV    standard deviation of the member energies
``energy_std_aleatoric``  scalar       eV    sqrt of the mean member σ²_E (NLL_JEF head)
``forces_std``            [N]          eV/Å  per-atom force σ, sqrt(tr Σ_i / 3), Σ_i total
``forces_std_epistemic``  [N]          eV/Å  the same from the covariance of member forces
``forces_std_aleatoric``  [N]          eV/Å  the same from the mean member Σ_i (NLL_JEF head)
``forces_std_relative``   [N]          1     forces_std_epistemic / (|F_i| + 1 eV/Å), relative to the force
``energies_std``          [N]          eV    standard deviation of member atomic energies
``member_energies``       [M]          eV    energy of every posterior member
``member_forces``         [M, N, 3]    eV/Å  forces of every posterior member
========================  ===========  ====  ==================================================

A force σ is the standard deviation of one Cartesian component, so it is on the scale
of a per-component force error. ``UNCERTAINTY_RESULTS`` maps each name to the fields
(``bayesrace.keys``) of the posterior's prediction it is made from; where those fields
are variances (the energy σ's) the result is the square root of their sum.

``stress`` (eV/Å³, ASE sign and Voigt order xx, yy, zz, yz, xz, xy) is the mean over
members and exists only for cells periodic in all three directions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple, Union

import numpy as np
import torch
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from . import keys
from .data import Graph, TypeMap, collate, contact_ratios, edge_distances, neighbour_list
from .bayes import Posterior, load_posterior, relative_force_std

UNCERTAINTY_RESULTS: Dict[str, Tuple[str, ...]] = {
    "energy_std": (keys.ENERGY_VAR_EPISTEMIC, keys.ENERGY_VAR_ALEATORIC),
    "energy_std_epistemic": (keys.ENERGY_VAR_EPISTEMIC,),
    "energy_std_aleatoric": (keys.ENERGY_VAR_ALEATORIC,),
    "forces_std": (keys.ATOMIC_FORCE_STD,),
    "forces_std_epistemic": (keys.ATOMIC_FORCE_STD_EPISTEMIC,),
    "forces_std_aleatoric": (keys.ATOMIC_FORCE_STD_ALEATORIC,),
    "energies_std": (keys.ATOMIC_ENERGY_STD,),
    "member_energies": (keys.MEMBER_ENERGY,),
    "member_forces": (keys.MEMBER_FORCES,),
}
"""Results name -> the posterior fields it is computed from (variances: sqrt of the sum)."""

_VARIANCE_FIELDS = (keys.ENERGY_VAR_EPISTEMIC, keys.ENERGY_VAR_ALEATORIC)


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy().astype(np.float64)


class BayesRaceCalculator(Calculator):
    """ASE calculator evaluating all M members of a posterior together.

    ``posterior`` is a ``Posterior`` or the path of a file written by ``save_posterior``.
    A ``Posterior`` object passed in is moved to ``dtype`` and ``device`` and put in
    eval mode in place (``torch.nn.Module.to`` semantics).
    """

    # contact_ratio: per atom, min_j r_ij / the training set's shortest distance of that pair of
    # elements (data.contact_ratios; < 1: closer than anything seen); only for posteriors that
    # recorded their training contacts (trained by this version or later); feature_distance: per
    # atom, the distance of its features to the training atoms' (bayes._feature_density), only
    # for posteriors with a feature density
    implemented_properties = ["energy", "free_energy", "forces", "stress", "energies", *UNCERTAINTY_RESULTS,
                              "forces_std_relative", "contact_ratio", "feature_distance"]

    def __init__(
        self,
        posterior: Union[Posterior, str, Path],
        dtype: torch.dtype = torch.float64,
        device: Union[str, torch.device] = "cpu",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(posterior, (str, Path)):
            posterior = load_posterior(posterior, dtype=dtype)
        if not isinstance(posterior, Posterior):
            raise TypeError(f"BayesRaceCalculator needs a Posterior or a path to one, got {type(posterior).__name__}")
        self.dtype = dtype
        self.device = torch.device(device)
        self.posterior = posterior.to(dtype=dtype, device=self.device).eval()
        self.type_map = TypeMap(self.posterior.type_names)
        self.cutoff = float(self.posterior.cutoff)

    # -- the graph of one structure ---------------------------------------------------
    def _check_elements(self, atoms) -> None:
        known = set(int(z) for z in self.type_map.atomic_numbers)
        for index, (number, symbol) in enumerate(zip(atoms.numbers, atoms.get_chemical_symbols())):
            if int(number) not in known:
                raise ValueError(
                    f"BayesRaceCalculator: element {symbol} (atom {index}) is not known to the model; "
                    f"the model's elements are {self.type_map.type_names}"
                )

    def _graph(self, atoms) -> Graph:
        self._check_elements(atoms)
        pbc = np.asarray(atoms.pbc, dtype=bool).reshape(3)
        # the data contract: a structure periodic in no direction carries a zero cell
        cell = np.array(atoms.cell.array, dtype=np.float64) if pbc.any() else np.zeros((3, 3))
        positions = np.array(atoms.positions, dtype=np.float64)
        edge_index, cell_shift = neighbour_list(positions, cell, pbc, self.cutoff, numbers=atoms.numbers,
                                                source="BayesRaceCalculator")
        return Graph(
            species=self.type_map.species(atoms.numbers),
            atomic_numbers=np.asarray(atoms.numbers, dtype=np.int64),
            positions=positions,
            cell=cell,
            pbc=pbc,
            edge_index=edge_index,
            edge_cell_shift=cell_shift,
        )

    # -- ASE entry point ----------------------------------------------------------------
    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        periodic = bool(np.all(atoms.pbc))
        if "stress" in properties and not periodic:
            raise PropertyNotImplementedError(
                f"stress needs a cell periodic in all three directions; this structure has pbc={atoms.pbc.tolist()}"
            )
        # forces need autograd, so no torch.no_grad here; results are detached below
        graph = self._graph(atoms)
        batch = {name: value.to(self.device) for name, value in collate([graph], dtype=self.dtype).items()}
        prediction = self.posterior(batch, compute_virial=periodic)

        energy = float(prediction[keys.ENERGY][0].detach())
        results = {
            "energy": energy,
            "free_energy": energy,
            "forces": _to_numpy(prediction[keys.FORCES]),
            "energies": _to_numpy(prediction[keys.ATOMIC_ENERGY]),
        }
        if periodic:
            results["stress"] = full_3x3_to_voigt_6_stress(_to_numpy(prediction[keys.STRESS][0]))
        for name, fields in UNCERTAINTY_RESULTS.items():
            if fields[0] in _VARIANCE_FIELDS:
                variance = sum(prediction[field][0] for field in fields)
                results[name] = float(torch.sqrt(variance).detach())
            elif fields[0] == keys.MEMBER_ENERGY:
                results[name] = _to_numpy(prediction[fields[0]][:, 0])  # [M, B=1] -> [M]
            else:
                results[name] = _to_numpy(prediction[fields[0]])
        results["forces_std_relative"] = relative_force_std(
            {keys.FORCES: results["forces"], keys.ATOMIC_FORCE_STD_EPISTEMIC: results["forces_std_epistemic"]})
        if self.posterior.shortest_contacts is not None:
            results["contact_ratio"] = contact_ratios(graph.species, graph.edge_index, edge_distances(graph),
                                                      self.posterior.shortest_contacts, self.cutoff)
        if keys.ATOMIC_FEATURE_DISTANCE in prediction:
            results["feature_distance"] = _to_numpy(prediction[keys.ATOMIC_FEATURE_DISTANCE])
        self.results = results
