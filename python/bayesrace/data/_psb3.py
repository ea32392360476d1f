"""The default data set: PSB3 (C5H8N+) labelled with GFN2-xTB, generated on demand.

PSB3 is penta-2,4-dieniminium, H2C=CH-CH=CH-CH=NH2+ (charge +1, closed shell). Atom
order of the built molecule: C1..C5 (0-4), N (5), then H on C1 (6, 7), H on N (8, 9)
and one H each on C2, C3, C4, C5 (10-13). The central C3=C4 bond is atoms 2-3, so the
torsion scanned for the out-of-distribution set is the dihedral C2-C3=C4-C5 (1, 2, 3, 4):
180 deg is the all-trans minimum, 0 deg the cis isomer, 90 deg the twisted cation.

Everything is a deterministic function of ``seed`` and ``scale`` on a given machine:
velocities and Langevin noise come from seeded numpy generators, and xTB runs with one
OpenMP thread (fastest for 14 atoms, and thread count no longer changes the bits).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from ._xtb import (
    EQUILIBRATION_STEPS,
    FRICTION_PER_FS,
    METHOD,
    SAMPLE_EVERY,
    TIMESTEP_FS,
    import_tblite,
    labelled_copy,
    one_openmp_thread,
    xtb_calculator,
    xtb_md_samples,
    xtb_relax,
)

__all__ = ["generate_psb3", "build_psb3", "write_torsion_beyond_training",
           "write_thermal_torsion", "PSB3_FILES", "TORSION_BEYOND_FILE", "TORSION_THERMAL_FILE", "TORSION_DIHEDRAL"]

CHARGE = 1.0
ID_TEMPERATURES_K = (300.0, 450.0, 600.0)
HOT_TEMPERATURES_K = (1000.0, 1500.0)
FRAMES_PER_ID_TEMPERATURE = 200  # 600 in distribution: train 400, valid 100, test 100
FRAMES_PER_HOT_TEMPERATURE = 100
TORSION_POINTS = 19  # 0, 10, ..., 180 deg
TORSION_RELAX_STEPS = 40
TORSION_FMAX = 0.05  # eV/Å, partial relaxation of the other coordinates
RELAX_FMAX = 0.01
TORSION_DIHEDRAL = (1, 2, 3, 4)  # C2-C3=C4-C5
TORSION_BEYOND_FILE = "test_ood_torsion_beyond.xyz"  # the scan's frames outside the training's twists
TORSION_THERMAL_FILE = "test_ood_torsion_thermal.xyz"  # 300 K MD with the twist held outside training
# twists the 300-600 K training MD never visits (it stays within ~35° of trans, 180°)
THERMAL_TORSION_ANGLES_DEG = (0.0, 30.0, 60.0, 90.0, 120.0)
_TORSION_ROTATING_ATOMS = (3, 4, 5, 8, 9, 12, 13)  # C4 and everything beyond it

PSB3_FILES = (
    "train.xyz",
    "valid.xyz",
    "test_id.xyz",
    "test_ood_hot.xyz",
    "test_ood_torsion.xyz",
    "isolated_atoms.xyz",
)


def _rotate_in_plane(vector: np.ndarray, degrees: float) -> np.ndarray:
    angle = np.deg2rad(degrees)
    c, s = np.cos(angle), np.sin(angle)
    return np.array([c * vector[0] - s * vector[1], s * vector[0] + c * vector[1], 0.0])


def build_psb3():
    """Planar all-trans PSB3 with textbook bond lengths and 120 deg angles (not relaxed)."""
    from ase import Atoms

    # C1=C2, C2-C3, C3=C4, C4-C5, C5=N (Å): the alternation of a conjugated iminium
    heavy_bonds = (1.35, 1.43, 1.37, 1.41, 1.31)
    heavy = [np.zeros(3)]
    for k, length in enumerate(heavy_bonds):
        direction = np.deg2rad(30.0 if k % 2 == 0 else -30.0)  # zig-zag: 120 deg angles
        heavy.append(heavy[-1] + length * np.array([np.cos(direction), np.sin(direction), 0.0]))
    heavy = np.array(heavy)

    hydrogens = []
    for atom, neighbour, length in ((0, 1, 1.08), (5, 4, 1.01)):  # terminal CH2 and NH2
        outward = (heavy[atom] - heavy[neighbour]) / np.linalg.norm(heavy[atom] - heavy[neighbour])
        hydrogens += [heavy[atom] + length * _rotate_in_plane(outward, d) for d in (60.0, -60.0)]
    for atom in range(1, 5):  # one H on C2..C5, along the outer bisector
        bisector = sum(
            (heavy[atom] - heavy[n]) / np.linalg.norm(heavy[atom] - heavy[n]) for n in (atom - 1, atom + 1)
        )
        hydrogens.append(heavy[atom] + 1.08 * bisector / np.linalg.norm(bisector))
    return Atoms("C5N" + "H8", positions=np.vstack([heavy, hydrogens]))


def _twisted(minimum, angle: float):
    """The minimum with C2-C3=C4-C5 at ``angle``: rigid rotation of the C4 side, then a partial
    relaxation (BFGS, at most TORSION_RELAX_STEPS steps) of every other coordinate with the
    dihedral held by FixInternals. Returns (atoms with the xTB calculator, converged)."""
    from ase.constraints import FixInternals

    mask = np.zeros(len(minimum), dtype=bool)
    mask[list(_TORSION_ROTATING_ATOMS)] = True
    atoms = minimum.copy()
    atoms.set_dihedral(*TORSION_DIHEDRAL, float(angle), mask=mask)
    atoms.set_constraint(FixInternals(dihedrals_deg=[[float(angle), list(TORSION_DIHEDRAL)]]))
    atoms.calc = xtb_calculator(CHARGE)
    try:
        converged = xtb_relax(atoms, TORSION_FMAX, TORSION_RELAX_STEPS)
    except Exception as error:
        raise RuntimeError(f"PSB3: twisting C=C to {angle:g} deg failed: {error}") from error
    return atoms, converged


def _torsion_scan(minimum, n_points: int):
    """Dihedral C2-C3=C4-C5 from 0 to 180 deg, each point partially relaxed (``_twisted``)."""
    frames = []
    for angle in np.linspace(0.0, 180.0, n_points):
        atoms, converged = _twisted(minimum, float(angle))
        frames.append(
            labelled_copy(
                atoms,
                {
                    "config_type": "torsion_scan",
                    "temperature_K": 0.0,
                    "dihedral_deg": float(angle),
                    "relaxed": converged,
                },
            )
        )
    return frames


def _isolated_atoms():
    """Neutral H, C, N with the molecule's Hamiltonian (spin-restricted GFN2-xTB, Fermi
    smearing at tblite's default 300 K, lowest multiplicity): the lowest energy of the
    atom under the same Hamiltonian that labels the molecule. Spin-polarised atoms
    (high-spin ground states) would be 1-3 eV lower but are not what the molecule's
    energies are consistent with."""
    from ase import Atoms

    frames = []
    for symbol in ("H", "C", "N"):
        atoms = Atoms(symbol, positions=[[0.0, 0.0, 0.0]], pbc=False)
        atoms.calc = xtb_calculator(0.0)
        frames.append(
            labelled_copy(atoms, {"config_type": "isolated_atom", "temperature_K": 0.0, "spin_polarization": False})
        )
    return frames


def _scaled(count: int, scale: float, minimum: int) -> int:
    return max(minimum, int(round(count * scale)))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def generate_psb3(out_dir, seed: int = 0, scale: float = 1.0, progress: bool = True) -> dict:
    """Writes the PSB3 data set (extxyz, eV and eV/Å) and its manifest into ``out_dir``.

    Files: ``train.xyz``, ``valid.xyz``, ``test_id.xyz`` (Langevin MD at 300, 450 and
    600 K, one trajectory each, pooled and split 4:1:1 at random), ``test_ood_hot.xyz``
    (MD at 1000 and 1500 K), ``test_ood_torsion.xyz`` (C3=C4 torsion scan, 0-180 deg),
    ``isolated_atoms.xyz`` (H, C, N) and ``manifest.json``. ``scale`` multiplies the
    number of sampled frames (the equilibration and the scan's end points stay). Returns
    the manifest.
    """
    import ase
    import ase.io
    from tqdm.auto import tqdm

    import_tblite()  # fails with how to install it before any work
    if scale <= 0:
        raise ValueError(f"generate_psb3: scale must be positive, got {scale}")
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    n_id = _scaled(FRAMES_PER_ID_TEMPERATURE, scale, minimum=2)
    n_hot = _scaled(FRAMES_PER_HOT_TEMPERATURE, scale, minimum=1)
    n_torsion = _scaled(TORSION_POINTS, scale, minimum=3)
    temperatures = ID_TEMPERATURES_K + HOT_TEMPERATURES_K
    counts = [n_id] * len(ID_TEMPERATURES_K) + [n_hot] * len(HOT_TEMPERATURES_K)
    # one independent stream per trajectory and one for the split
    streams = np.random.SeedSequence(int(seed)).spawn(len(temperatures) + 1)

    with one_openmp_thread():
        minimum = build_psb3()
        minimum.calc = xtb_calculator(CHARGE)
        if not xtb_relax(minimum, RELAX_FMAX, 1000):
            raise RuntimeError("PSB3: the xTB relaxation of the starting geometry did not converge")
        minimum.calc = None

        total_steps = sum(EQUILIBRATION_STEPS + n * SAMPLE_EVERY for n in counts)
        trajectories = []
        with tqdm(total=total_steps, desc="PSB3 xTB MD", unit="step", disable=not progress) as bar:
            for temperature, count, stream in zip(temperatures, counts, streams):
                config_type = ("md_" if temperature in ID_TEMPERATURES_K else "md_hot_") + f"{temperature:g}K"
                rng = np.random.default_rng(stream)
                trajectories.append(xtb_md_samples(minimum, CHARGE, temperature, count, rng, config_type, bar))
        torsion = _torsion_scan(minimum, n_torsion)
        isolated = _isolated_atoms()

    in_distribution = [frame for trajectory in trajectories[: len(ID_TEMPERATURES_K)] for frame in trajectory]
    hot = [frame for trajectory in trajectories[len(ID_TEMPERATURES_K) :] for frame in trajectory]
    n_test = max(1, int(round(len(in_distribution) / 6)))
    part = np.zeros(len(in_distribution), dtype=np.int64)  # 0 train, 1 valid, 2 test
    order = np.random.default_rng(streams[-1]).permutation(len(in_distribution))
    part[order[:n_test]] = 1
    part[order[n_test : 2 * n_test]] = 2
    contents = {
        "train.xyz": [f for f, p in zip(in_distribution, part) if p == 0],
        "valid.xyz": [f for f, p in zip(in_distribution, part) if p == 1],
        "test_id.xyz": [f for f, p in zip(in_distribution, part) if p == 2],
        "test_ood_hot.xyz": hot,
        "test_ood_torsion.xyz": torsion,
        "isolated_atoms.xyz": isolated,
    }
    files = {}
    for name, frames in contents.items():
        path = out / name
        ase.io.write(path, frames, format="extxyz")
        files[name] = {"frames": len(frames), "sha256": _sha256(path)}

    from importlib.metadata import PackageNotFoundError, version

    try:
        tblite_version = version("tblite")
    except PackageNotFoundError:
        tblite_version = "unknown"
    manifest = {
        "data_set": "PSB3 (penta-2,4-dieniminium, C5H8N+, charge +1)",
        "seed": int(seed),
        "scale": float(scale),
        "method": METHOD,
        "charge": CHARGE,
        "calculator": f"tblite {tblite_version} (energy and gradient through tblite.interface), one OpenMP thread",
        "ase_version": ase.__version__,
        "units": {"energy": "eV", "forces": "eV/Å", "positions": "Å"},
        "md": {
            "integrator": "ase.md.langevin.Langevin",
            "timestep_fs": TIMESTEP_FS,
            "friction_per_fs": FRICTION_PER_FS,
            "initial_velocities": "Maxwell-Boltzmann at twice the temperature, from the xTB minimum",
            "equilibration_steps": EQUILIBRATION_STEPS,
            "sample_every_steps": SAMPLE_EVERY,
        },
        "temperatures_K": {"in_distribution": list(ID_TEMPERATURES_K), "ood_hot": list(HOT_TEMPERATURES_K)},
        "split": "in-distribution frames of all temperatures pooled, random 4:1:1 train/valid/test",
        "torsion": {
            "dihedral_atoms": list(TORSION_DIHEDRAL),
            "angles_deg": [float(a) for a in np.linspace(0.0, 180.0, n_torsion)],
            "procedure": f"rigid rotation from the minimum, then at most {TORSION_RELAX_STEPS} BFGS steps "
            f"(fmax {TORSION_FMAX} eV/Å) with the dihedral fixed by FixInternals",
        },
        "isolated_atoms": "neutral atoms, spin-restricted GFN2-xTB (same Hamiltonian as the molecule)",
        "files": files,
        "wall_time_s": round(time.perf_counter() - started, 3),
    }
    with open(out / "manifest.json", "w") as handle:
        json.dump(manifest, handle, indent=2, ensure_ascii=False)
        handle.write("\n")
    return manifest


def _twist_deg(atoms) -> float:
    """|C2-C3=C4-C5| folded to [0, 180] degrees (180 = trans, the minimum)."""
    return abs(((atoms.get_dihedral(*TORSION_DIHEDRAL) + 180.0) % 360.0) - 180.0)


def write_torsion_beyond_training(data_dir, out_name: str = TORSION_BEYOND_FILE) -> dict:
    """Write the frames of ``test_ood_torsion.xyz`` whose C=C twist lies more than 1° outside
    the range the training set covers to ``out_name``; returns {path, n_frames, n_torsion, train_range_deg}.

    The scan runs 0–180°, and MD at 300–600 K already visits the trans end of it (the
    training set reaches about 146°); frames inside that range are not out of distribution,
    so no score can flag them, and an AUROC over the whole scan mixes the two."""
    import ase.io

    data_dir = Path(data_dir)
    twists = [_twist_deg(a) for a in ase.io.read(data_dir / "train.xyz", index=":")]
    low, high = min(twists), max(twists)
    scan = ase.io.read(data_dir / "test_ood_torsion.xyz", index=":")
    # 1° of slack: the scan's 180° point is covered by training twists of 179.9°
    beyond = [a for a in scan if not low - 1.0 <= _twist_deg(a) <= high + 1.0]
    if not beyond:
        raise ValueError(f"{data_dir / 'test_ood_torsion.xyz'}: every frame's twist lies inside the training range "
                         f"[{low:.1f}, {high:.1f}] deg")
    path = data_dir / out_name
    ase.io.write(path, beyond, format="extxyz")
    return dict(path=str(path), n_frames=len(beyond), n_torsion=len(scan), train_range_deg=[float(low), float(high)])


def write_thermal_torsion(data_dir, angles_deg=THERMAL_TORSION_ANGLES_DEG, frames_per_angle: int = 12,
                          temperature_K: float = 300.0, seed: int = 0, progress: bool = True,
                          out_name: str = TORSION_THERMAL_FILE) -> dict:
    """Write ``out_name`` into ``data_dir``: Langevin MD at ``temperature_K`` with the C=C twist
    held (FixInternals) at each of ``angles_deg``, ``frames_per_angle`` samples each, labelled
    with GFN2-xTB like the rest of the set; returns {path, n_frames, angles_deg, mean_force_eV_per_A}.

    The scan in ``test_ood_torsion.xyz`` is partially relaxed, so its forces are a fifth of
    thermal ones and "small forces" alone tells it from the 300-600 K test set; these frames
    carry thermal forces, so only the twist is new."""
    import ase.io
    from ase.constraints import FixInternals
    from tqdm.auto import tqdm

    if frames_per_angle < 1 or not len(angles_deg):
        raise ValueError(f"write_thermal_torsion: need angles and frames_per_angle >= 1, got {list(angles_deg)}, "
                         f"{frames_per_angle}")
    import_tblite()
    streams = np.random.SeedSequence([int(seed), 7]).spawn(len(angles_deg))
    frames = []
    with one_openmp_thread():
        minimum = build_psb3()
        minimum.calc = xtb_calculator(CHARGE)
        if not xtb_relax(minimum, RELAX_FMAX, 1000):
            raise RuntimeError("PSB3: the xTB relaxation of the starting geometry did not converge")
        total = len(angles_deg) * (EQUILIBRATION_STEPS + frames_per_angle * SAMPLE_EVERY)
        with tqdm(total=total, desc="PSB3 twisted xTB MD", unit="step", disable=not progress) as bar:
            for angle, stream in zip(angles_deg, streams):
                start, _ = _twisted(minimum, float(angle))
                start.set_constraint()
                start.calc = None
                hold = FixInternals(dihedrals_deg=[[float(angle), list(TORSION_DIHEDRAL)]])
                frames += xtb_md_samples(start, CHARGE, temperature_K, frames_per_angle, np.random.default_rng(stream),
                                     f"md_twist_{angle:g}deg", bar, constraints=[hold],
                                     info={"dihedral_deg": float(angle)})
    path = Path(data_dir) / out_name
    ase.io.write(path, frames, format="extxyz")
    mean_force = float(np.mean([np.linalg.norm(f.get_forces(), axis=1).mean() for f in frames]))
    return dict(path=str(path), n_frames=len(frames), angles_deg=[float(a) for a in angles_deg],
                temperature_K=float(temperature_K), mean_force_eV_per_A=mean_force)
