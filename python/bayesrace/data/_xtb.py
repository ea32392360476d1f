"""GFN2-xTB through tblite for generating labelled data: an ASE calculator, relaxation and Langevin MD.

Shared by the PSB3 set (``_psb3``), its CASSCF geometries and the benchmarks' extra test sets.
xTB runs on one OpenMP thread (fastest for molecules this small, and the bits then do not
depend on the thread count); velocities and Langevin noise come from the caller's seeded
numpy generator, so samples are a deterministic function of the seed on a given machine.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import numpy as np

METHOD = "GFN2-xTB"
TIMESTEP_FS = 0.5
FRICTION_PER_FS = 0.01
EQUILIBRATION_STEPS = 300  # 150 fs = 1.5 / friction, after a start at twice the temperature (below)
SAMPLE_EVERY = 15  # 7.5 fs between samples


def import_tblite():
    """tblite's ``Calculator`` class (``tblite.interface``); an ImportError says how to install it."""
    try:
        from tblite.interface import Calculator
    except ImportError as error:
        raise ImportError(
            "generating data with xTB needs GFN2-xTB from the 'tblite' package "
            f"(pip install tblite); importing tblite.interface failed: {error}"
        ) from error
    return Calculator


def _xtb_calculator_class():
    """An ASE calculator that asks tblite for the energy and gradient only.

    tblite's own ``tblite.ase.TBLite`` gives the same numbers but also fetches charges,
    bond orders and the dipole at every call, which makes MD about 1.6x slower here.
    Like TBLite, it restarts each SCF from the previous wavefunction.
    """
    from ase.calculators.calculator import CalculationFailed, Calculator, all_changes
    from ase.units import Bohr, Hartree

    TBLiteInterface = import_tblite()

    class GFN2xTB(Calculator):
        implemented_properties = ["energy", "free_energy", "forces"]

        def __init__(self, charge: float):
            super().__init__()
            self.charge = float(charge)
            self._xtb = None
            self._result = None

        def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
            super().calculate(atoms, properties, system_changes)
            positions = self.atoms.positions / Bohr
            if self._xtb is None or set(system_changes) - {"positions"}:
                self._xtb = TBLiteInterface(METHOD, self.atoms.numbers, positions, charge=self.charge)
                self._xtb.set("verbosity", 0)
                self._result = None
            else:
                self._xtb.update(positions)
            try:
                self._result = self._xtb.singlepoint(self._result)
            except RuntimeError as error:
                raise CalculationFailed(f"tblite {METHOD}: {error}") from error
            energy = float(self._result.get("energy")) * Hartree
            self.results = {
                "energy": energy,
                "free_energy": energy,
                "forces": -np.asarray(self._result.get("gradient")) * (Hartree / Bohr),
            }

    return GFN2xTB


def one_openmp_thread():
    """Context that runs xTB on one OpenMP thread when threadpoolctl is available."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="openmp")


def xtb_calculator(charge: float):
    """A GFN2-xTB ASE calculator for a molecule of total ``charge`` (energy and forces only)."""
    return _xtb_calculator_class()(charge=charge)


def labelled_copy(atoms, info: dict):
    """Positions, energy and raw (unconstrained) xTB forces, with nothing else attached."""
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    energy = float(atoms.get_potential_energy())
    forces = np.array(atoms.get_forces(apply_constraint=False), dtype=np.float64)
    frame = Atoms(numbers=atoms.numbers, positions=atoms.positions, pbc=False)
    frame.info.update(info)
    frame.calc = SinglePointCalculator(frame, energy=energy, forces=forces)
    return frame


def xtb_relax(atoms, fmax: float, steps: int) -> bool:
    """BFGS on ``atoms`` (calculator attached) to ``fmax`` eV/Å or ``steps``; True when converged."""
    from ase.optimize import BFGS

    return bool(BFGS(atoms, logfile=None).run(fmax=fmax, steps=steps))


def xtb_md_samples(start, charge: float, temperature_K: float, n_samples: int, rng: np.random.Generator,
               config_type: str, bar=None, constraints: Sequence = (), info: Optional[dict] = None):
    """Langevin MD from ``start`` with xTB: EQUILIBRATION_STEPS, then one labelled sample every
    SAMPLE_EVERY steps. The centre of mass stays fixed; ``constraints`` (e.g. FixInternals holding
    a dihedral) are added to that; ``info`` goes into every sample beside config_type,
    temperature_K and md_step; ``bar`` (tqdm) is advanced by the steps run."""
    from ase import units
    from ase.constraints import FixCom
    from ase.md import velocitydistribution
    from ase.md.langevin import Langevin

    atoms = start.copy()
    atoms.calc = xtb_calculator(charge)
    atoms.set_constraint([FixCom(), *constraints])  # fixcm=True in Langevin is deprecated and biased for small systems
    thermalize = getattr(velocitydistribution, "thermalize_momenta", None)
    # Starting at a minimum, about half the kinetic energy flows into potential energy
    # within a few vibrations: drawing velocities at 2T lands near T at once.
    if thermalize is not None:
        thermalize(atoms, 2.0 * temperature_K, rng=rng)
    else:  # ASE < 3.29
        velocitydistribution.MaxwellBoltzmannDistribution(atoms, temperature_K=2.0 * temperature_K, rng=rng)
    velocitydistribution.Stationary(atoms)
    dynamics = Langevin(atoms, timestep=TIMESTEP_FS * units.fs, temperature_K=temperature_K,
                        friction=FRICTION_PER_FS / units.fs, fixcm=False, rng=rng)
    samples = []
    step = 0
    try:
        dynamics.run(EQUILIBRATION_STEPS)
        step += EQUILIBRATION_STEPS
        if bar is not None:
            bar.update(EQUILIBRATION_STEPS)
        for _ in range(n_samples):
            dynamics.run(SAMPLE_EVERY)
            step += SAMPLE_EVERY
            if bar is not None:
                bar.update(SAMPLE_EVERY)
            samples.append(labelled_copy(atoms, {"config_type": config_type, "temperature_K": float(temperature_K),
                                                 "md_step": step, **(info or {})}))
    except Exception as error:
        raise RuntimeError(f"{config_type}: xTB MD at {temperature_K:g} K failed at step {step}: {error}") from error
    return samples
