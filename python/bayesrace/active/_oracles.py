"""Oracles: ``label(atoms_list) -> atoms_list`` with energy (eV) and forces (eV/Å) attached as
a SinglePointCalculator.

``tblite`` (GFN2-xTB by default, one OpenMP thread per process), ``ase`` (any ASE calculator
by import path and keyword arguments) and ``from_pool`` (the labels already in the pool
file, for benchmarks). With ``oracle.workers`` > 1 structures are labelled in a pool of
spawned processes (``label_structures``).
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from ._config import ORACLE_KINDS, OracleSection
from ._store import POOL_INDEX, labelled_atoms


class Oracle:
    """Labels structures: ``label(atoms_list)`` returns copies with energy (eV) and forces (eV/Å)."""

    def label_one(self, atoms):
        raise NotImplementedError

    def label(self, atoms_list: Sequence) -> List:
        return [self.label_one(atoms) for atoms in atoms_list]


class TBLiteOracle(Oracle):
    """tblite single points (``tblite.interface.Calculator``) on one OpenMP thread."""

    def __init__(self, method: str = "GFN2-xTB", charge: float = 0.0, uhf: int = 0, accuracy: float = 1.0):
        self.method, self.charge, self.uhf, self.accuracy = method, float(charge), int(uhf), float(accuracy)

    def label_one(self, atoms):
        from ase.units import Bohr, Hartree

        from ..data import import_tblite, one_openmp_thread

        calculator_class = import_tblite()
        periodic = np.asarray(atoms.pbc, dtype=bool)
        extra = dict(lattice=np.asarray(atoms.cell.array) / Bohr, periodic=periodic) if periodic.any() else {}
        with one_openmp_thread():
            try:
                xtb = calculator_class(self.method, atoms.numbers, atoms.positions / Bohr, charge=self.charge,
                                       uhf=self.uhf, **extra)
                xtb.set("verbosity", 0)
                xtb.set("accuracy", self.accuracy)
                result = xtb.singlepoint()
            except RuntimeError as error:
                raise RuntimeError(f"tblite {self.method} failed on pool structure "
                                   f"{atoms.info.get(POOL_INDEX)}: {error}") from error
        energy = float(result.get("energy")) * Hartree
        forces = -np.asarray(result.get("gradient")) * (Hartree / Bohr)
        return labelled_atoms(atoms, energy, forces)


def _import_object(path: str):
    module_name, _, name = path.rpartition(".")
    try:
        if not module_name:
            raise ImportError("expected an import path module.Class")
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as error:
        from ..train import ConfigError  # only here: workers call this and need not import torch

        raise ConfigError(f"oracle.calculator {path!r} cannot be imported: {error}") from error


class ASEOracle(Oracle):
    """Any ASE calculator class, by import path, built once per process with ``kwargs``."""

    def __init__(self, calculator: str, kwargs: Optional[Dict[str, Any]] = None):
        self.calculator, self.kwargs = calculator, dict(kwargs or {})
        self._instance = None
        _import_object(calculator)  # fail early, naming the path

    def __getstate__(self):  # the calculator itself is rebuilt in each worker
        return dict(calculator=self.calculator, kwargs=self.kwargs, _instance=None)

    def label_one(self, atoms):
        if self._instance is None:
            self._instance = _import_object(self.calculator)(**self.kwargs)
        work = atoms.copy()
        work.calc = self._instance
        return labelled_atoms(atoms, work.get_potential_energy(), work.get_forces(apply_constraint=False))


class FromPoolOracle(Oracle):
    """The labels already stored in the pool file (no computation)."""

    def __init__(self, frames: Sequence):
        self.frames = frames

    def label_one(self, atoms):
        index = int(atoms.info[POOL_INDEX])
        frame = self.frames[index]
        if frame.energy is None or frame.forces is None:
            raise RuntimeError(f"oracle from_pool: {frame.source} has no energy/forces labels")
        return labelled_atoms(atoms, frame.energy, frame.forces)


def make_oracle(section: OracleSection, pool_frames: Sequence = ()) -> Oracle:
    """The oracle of an ``oracle`` section (``from_pool`` answers from ``pool_frames``)."""
    if section.kind == "tblite":
        return TBLiteOracle(section.method, section.charge, section.uhf, section.accuracy)
    if section.kind == "ase":
        return ASEOracle(section.calculator, section.kwargs)
    if section.kind == "from_pool":
        return FromPoolOracle(pool_frames)
    raise ValueError(f"oracle.kind is {section.kind!r}; expected one of {list(ORACLE_KINDS)}")


_WORKER_ORACLE: Optional[Oracle] = None


def _start_worker(oracle: Oracle) -> None:
    global _WORKER_ORACLE
    os.environ["OMP_NUM_THREADS"] = "1"
    _WORKER_ORACLE = oracle


def _label_in_worker(atoms):
    return _WORKER_ORACLE.label_one(atoms)


def label_structures(oracle: Oracle, atoms_list: Sequence, on_label: Callable, workers: int = 1,
                     progress: bool = False, description: str = "label") -> None:
    """Label every structure and call ``on_label(labelled)`` as each one arrives (any order
    with workers > 1: processes spawned with the oracle, one OpenMP thread each)."""
    from tqdm.auto import tqdm

    with tqdm(total=len(atoms_list), desc=description, unit="structure", disable=not progress,
              dynamic_ncols=True) as bar:
        if workers <= 1 or len(atoms_list) <= 1:
            for atoms in atoms_list:
                on_label(oracle.label_one(atoms))
                bar.update(1)
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=min(workers, len(atoms_list)),
                                 mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_start_worker, initargs=(oracle,)) as executor:
            futures = [executor.submit(_label_in_worker, atoms) for atoms in atoms_list]
            for future in as_completed(futures):
                on_label(future.result())
                bar.update(1)
