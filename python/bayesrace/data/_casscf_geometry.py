"""Geometries of the PSB3 SA-CASSCF data set: around the minimum, along the C3=C4 torsion
and along the bond-length alternation (BLA), each frame a deterministic function of
``(seed, index)`` alone, so that a larger ``n`` only appends frames.

Frame ``i`` is of kind ``FRAME_PATTERN[i % 4]``: half ``equilibrium``, a quarter
``torsion``, a quarter ``bla`` (50/25/25). Every frame gets independent Gaussian
displacements of every Cartesian coordinate (``NOISE_SIGMA``), so no subset is a line.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np

from ._psb3 import _TORSION_ROTATING_ATOMS, CHARGE, RELAX_FMAX, TORSION_DIHEDRAL, build_psb3
from ._xtb import one_openmp_thread, xtb_calculator, xtb_relax

FRAME_PATTERN = ("equilibrium", "equilibrium", "torsion", "bla")
NOISE_SIGMA = 0.03  # Å, every Cartesian coordinate of every frame
TORSION_RANGE_DEG = (0.0, 180.0)  # C2-C3=C4-C5, uniform; 180 is the all-trans minimum
BLA_TARGET_MIN = -0.12  # Å; frames draw a BLA uniformly between this and the minimum's
# heavy-atom chain C1=C2-C3=C4-C5=N: bonds (0,1) (1,2) (2,3) (3,4) (4,5)
DOUBLE_BONDS = ((0, 1), (2, 3), (4, 5))
SINGLE_BONDS = ((1, 2), (3, 4))
# hydrogens carried along with each heavy atom when a bond of the chain is stretched
_HYDROGENS_OF = {0: (6, 7), 1: (10,), 2: (11,), 3: (12,), 4: (13,), 5: (8, 9)}


def bond_length_alternation(positions) -> float:
    """Mean length of the formal single bonds minus that of the double bonds (Å).

    Positive for the ground-state PSB3 pattern (C1=C2-C3=C4-C5=N), about 0 where the
    bonds are equalised, negative where the pattern is inverted toward the S1 minimum
    and the S1/S0 crossing region."""
    x = np.asarray(positions, dtype=np.float64)
    single = np.mean([np.linalg.norm(x[a] - x[b]) for a, b in SINGLE_BONDS])
    double = np.mean([np.linalg.norm(x[a] - x[b]) for a, b in DOUBLE_BONDS])
    return float(single - double)


def torsion_angle(atoms) -> float:
    """The C2-C3=C4-C5 dihedral folded into [0, 180] deg (180 = trans)."""
    angle = float(atoms.get_dihedral(*TORSION_DIHEDRAL)) % 360.0
    return 360.0 - angle if angle > 180.0 else angle


@functools.lru_cache(maxsize=1)
def _minimum_positions() -> tuple:
    """GFN2-xTB minimum of PSB3 (same relaxation as ``generate_psb3``), cached."""
    atoms = build_psb3()
    with one_openmp_thread():
        atoms.calc = xtb_calculator(CHARGE)
        if not xtb_relax(atoms, RELAX_FMAX, 1000):
            raise RuntimeError("PSB3: the xTB relaxation of the starting geometry did not converge")
    return tuple(map(tuple, np.round(atoms.positions, 8)))


def psb3_minimum():
    """ASE Atoms of the planar all-trans GFN2-xTB minimum (positions rounded to 1e-8 Å)."""
    atoms = build_psb3()
    atoms.positions = np.array(_minimum_positions())
    return atoms


def _set_bla(atoms, target: float) -> None:
    """Stretches the double bonds and shortens the single bonds by equal amounts so the BLA
    becomes ``target``; each bond change moves the far side of the chain rigidly along it."""
    change = bond_length_alternation(atoms.positions) - target  # > 0: BLA must drop
    deltas = {bond: +0.5 * change for bond in DOUBLE_BONDS}
    deltas.update({bond: -0.5 * change for bond in SINGLE_BONDS})
    x = atoms.positions.copy()
    for a, b in sorted(deltas, reverse=True):  # from the N end, so each shift uses its own bond
        unit = (x[b] - x[a]) / np.linalg.norm(x[b] - x[a])
        moved = [j for heavy in range(b, 6) for j in (heavy,) + _HYDROGENS_OF[heavy]]
        x[moved] += deltas[(a, b)] * unit
    atoms.positions = x


def frame_geometry(seed: int, index: int):
    """Frame ``index`` of the data set under ``seed``: ASE Atoms with ``config_type``,
    ``torsion_deg`` (measured, folded to [0, 180]), ``bla`` (measured, Å), ``frame_index``
    and ``target`` (the torsion angle or BLA aimed at before the noise) in ``info``."""
    rng = np.random.default_rng([int(seed), int(index)])
    kind = FRAME_PATTERN[int(index) % len(FRAME_PATTERN)]
    atoms = psb3_minimum()
    target = None
    if kind == "torsion":
        target = float(rng.uniform(*TORSION_RANGE_DEG))
        mask = np.zeros(len(atoms), dtype=bool)
        mask[list(_TORSION_ROTATING_ATOMS)] = True
        atoms.set_dihedral(*TORSION_DIHEDRAL, target, mask=mask)
    elif kind == "bla":
        target = float(rng.uniform(BLA_TARGET_MIN, bond_length_alternation(atoms.positions)))
        _set_bla(atoms, target)
    atoms.positions = atoms.positions + rng.normal(0.0, NOISE_SIGMA, size=atoms.positions.shape)
    atoms.positions = np.round(atoms.positions, 8)
    atoms.info.update(
        {
            "config_type": kind,
            "frame_index": int(index),
            "torsion_deg": torsion_angle(atoms),
            "bla": bond_length_alternation(atoms.positions),
        }
    )
    if target is not None:
        atoms.info["target"] = target
    return atoms


def geometry_hash(atoms) -> str:
    """sha256 of the atomic numbers and the positions printed to 1e-6 Å."""
    text = ",".join(map(str, atoms.numbers)) + ";" + ",".join(f"{v:.6f}" for v in atoms.positions.ravel())
    return hashlib.sha256(text.encode()).hexdigest()
