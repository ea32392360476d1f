"""Helpers for the plugin tests: test structures, reference edges, LAMMPS runs."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from bayesrace.lammps import lammps_in, new_lammps
from bayesrace.lammps import lammps_number as _f
from bayesrace.lammps import read_dump as read_dump_frames
from bayesrace.lammps import run_lmp as run_lammps_executable

MASSES = {"H": 1.008, "C": 12.011, "N": 14.007}


@dataclass
class Structure:
    positions: np.ndarray  # [N, 3] Å
    elements: list  # per atom
    ids: np.ndarray  # LAMMPS atom ids (non-contiguous on purpose)
    cell: np.ndarray = field(default_factory=lambda: np.zeros((3, 3)))  # rows a, b, c (LAMMPS lower-triangular)
    pbc: bool = False
    box_lo: tuple = (0.0, 0.0, 0.0)
    box_hi: tuple = (30.0, 30.0, 30.0)


def _random_points(rng, n, lo, hi, dmin, cell=None):
    pts = []
    while len(pts) < n:
        if cell is None:
            p = rng.uniform(lo, hi, 3)
        else:
            p = rng.uniform(0.0, 1.0, 3) @ cell
        ok = True
        for q in pts:
            d = p - q
            if cell is not None:
                frac = np.linalg.solve(cell.T, d)
                frac -= np.round(frac)
                d = frac @ cell
            if np.linalg.norm(d) < dmin:
                ok = False
                break
        if ok:
            pts.append(p)
    return np.array(pts)


def molecule(seed=1, n=10, origin=(10.0, 10.0, 10.0), box=30.0, span=4.0) -> Structure:
    rng = np.random.default_rng(seed)
    x = _random_points(rng, n, 0.0, span, 1.0) + np.asarray(origin)
    elements = [("H", "C", "N")[k % 3] for k in range(n)]
    ids = 7 + 5 * np.arange(n)[::-1]  # non-contiguous, not sorted by position
    return Structure(x, elements, ids, box_lo=(0.0, 0.0, 0.0), box_hi=(box, box, box))


def periodic(seed=2, n=14, triclinic=False) -> Structure:
    rng = np.random.default_rng(seed)
    if triclinic:
        cell = np.array([[6.5, 0.0, 0.0], [1.2, 6.0, 0.0], [-0.8, 0.9, 6.8]])
    else:
        cell = np.diag([6.5, 6.0, 6.8])
    x = _random_points(rng, n, 0.0, 1.0, 1.1, cell=cell)
    elements = [("C", "H", "N", "H")[k % 4] for k in range(n)]
    ids = 100 + 3 * np.arange(n)
    return Structure(x, elements, ids, cell=cell, pbc=True)


def reference_edges(s: Structure, cutoff: float):
    """All directed edges i->j (with Cartesian image shifts) within the cutoff, brute force."""
    x = s.positions
    n = len(x)
    if not s.pbc:
        d = x[None, :, :] - x[:, None, :]
        r = np.linalg.norm(d, axis=-1)
        i, j = np.nonzero((r < cutoff) & ~np.eye(n, dtype=bool))
        return np.stack([i, j]), np.zeros((len(i), 3))
    cell = s.cell
    volume = abs(np.linalg.det(cell))
    heights = [volume / np.linalg.norm(np.cross(cell[(k + 1) % 3], cell[(k + 2) % 3])) for k in range(3)]
    reps = [int(np.ceil(cutoff / h)) + 1 for h in heights]
    ii, jj, ss = [], [], []
    for nvec in itertools.product(*[range(-r, r + 1) for r in reps]):
        shift = np.asarray(nvec, dtype=float) @ cell
        d = x[None, :, :] + shift - x[:, None, :]
        r = np.linalg.norm(d, axis=-1)
        mask = r < cutoff
        if not any(nvec):
            mask &= ~np.eye(n, dtype=bool)
        i, j = np.nonzero(mask)
        ii.append(i)
        jj.append(j)
        ss.append(np.repeat(shift[None, :], len(i), axis=0))
    return np.stack([np.concatenate(ii), np.concatenate(jj)]), np.concatenate(ss)


def write_data(s: Structure, path: Path, type_names=("H", "C", "N")) -> None:
    tmap = {e: k + 1 for k, e in enumerate(type_names)}
    lines = ["bayesrace test structure", "", f"{len(s.positions)} atoms", f"{len(type_names)} atom types", ""]
    if s.pbc:
        c = s.cell
        lines += [
            f"0.0 {_f(c[0, 0])} xlo xhi",
            f"0.0 {_f(c[1, 1])} ylo yhi",
            f"0.0 {_f(c[2, 2])} zlo zhi",
        ]
        if abs(c[1, 0]) + abs(c[2, 0]) + abs(c[2, 1]) > 0:
            lines.append(f"{_f(c[1, 0])} {_f(c[2, 0])} {_f(c[2, 1])} xy xz yz")
    else:
        for k, ax in enumerate("xyz"):
            lines.append(f"{_f(s.box_lo[k])} {_f(s.box_hi[k])} {ax}lo {ax}hi")
    lines += ["", "Masses", ""]
    lines += [f"{tmap[e]} {MASSES.get(e, 1.0)}" for e in type_names]
    lines += ["", "Atoms # atomic", ""]
    for atom_id, e, p in zip(s.ids, s.elements, s.positions):
        lines.append(f"{int(atom_id)} {tmap[e]} {_f(p[0])} {_f(p[1])} {_f(p[2])}")
    path.write_text("\n".join(lines) + "\n")


def reference(core, model_path: str, s: Structure, cutoff: float, type_names=("H", "C", "N"), driving="mean"):
    """Binding result for a whole structure (all atoms local, images through shifts)."""
    engine = core.Engine(model_path)
    ei, shifts = reference_edges(s, cutoff)
    species = np.array([list(type_names).index(e) for e in s.elements], dtype=np.int64)
    out = engine.evaluate(s.positions, species, ei, shifts, len(s.positions), driving, True)
    return engine, out


def lammps_instance():
    """A LAMMPS instance in this process (output to nowhere), for tests that drive it command by command."""
    return new_lammps()


def run_in_process(input_text: str, workdir: Path):
    """Run an input with `from lammps import lammps` (the Python module path) in workdir."""
    workdir.mkdir(parents=True, exist_ok=True)
    with lammps_in(workdir) as lmp:
        lmp.commands_string(input_text)


def run_lmp(input_text: str, workdir: Path, nprocs: int = 1, timeout: int = 300, name: str = "in.lmp"):
    """Run the lmp executable (under the mpich wheel's mpirun when nprocs > 1); returns
    (exit status, stdout + stderr)."""
    workdir.mkdir(parents=True, exist_ok=True)
    inp = workdir / name
    inp.write_text(input_text)
    # one OpenMP thread unless the caller's environment says otherwise
    threads = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return run_lammps_executable(["-in", str(inp), "-log", "none", "-nocite"], workdir, nprocs, timeout=timeout,
                                 environment=threads, check=False)


def read_dump(path: Path):
    """Last frame of a 'dump custom' text file, as {column: array}, rows sorted by id."""
    return read_dump_frames(path)[-1]["columns"]


def parse_tagged(output: str, tag: str):
    """Rows of floats from lines that start with TAG (printed by 'print')."""
    rows = []
    for line in output.splitlines():
        if line.startswith(tag + " "):
            rows.append([float(v) for v in line.split()[1:]])
    return np.array(rows)


NKTV2P_METAL = 1.6021765e6  # LAMMPS force->nktv2p for units metal
KCAL_PER_EV = 23.060549  # LAMMPS metal -> real energy conversion


def lammps_input(
    plugin: str,
    model: str,
    s: Structure,
    *,
    settings: str = "",
    processors: str = "",
    units: str = "metal",
    elements: str = "H C N",
    extra: str = "",
    run: str = "run 0",
    dump: bool = True,
) -> str:
    bnd = "p p p" if s.pbc else "f f f"
    lines = [
        f"plugin load {plugin}" if plugin else "",
        f"units {units}",
        f"boundary {bnd}",
        "atom_style atomic",
        processors,
        "read_data data.lmp",
        f"pair_style bayesrace {settings}",
        f"pair_coeff * * {model} {elements}",
        "compute u all bayesrace/atom",
        "compute ug all bayesrace",
        "compute pea all pe/atom",
        "compute sa all stress/atom NULL virial",
        "compute p all pressure NULL virial",
        "thermo_style custom step pe vol c_ug[1] c_ug[2] c_ug[3] c_ug[4] c_ug[6] c_ug[7] c_p[1] c_p[2] c_p[3] c_p[4] c_p[5] c_p[6]",
        "thermo_modify format float %.17g",
    ]
    if dump:
        lines += [
            "dump d all custom 1 dump.txt id fx fy fz c_pea c_u[1] c_u[2] c_u[3] c_u[4] c_u[6] "
            "c_sa[1] c_sa[2] c_sa[3] c_sa[4] c_sa[5] c_sa[6]",
            "dump_modify d sort id format float %.17g",
        ]
    lines += [extra, run]
    glob = " ".join(
        f"$({v}:%.17g)"
        for v in ["pe", "vol", "c_ug[1]", "c_ug[2]", "c_ug[3]", "c_ug[4]"] + [f"c_p[{k}]" for k in range(1, 7)]
        + ["c_ug[6]", "c_ug[7]", "c_ug[8]"]
    )
    lines.append(f'print "GLOBAL {glob}" file global.txt')
    return "\n".join(lines) + "\n"


def parse_lammps_result(workdir: Path, nktv2p: float = NKTV2P_METAL):
    g = parse_tagged((workdir / "global.txt").read_text(), "GLOBAL")
    assert len(g) == 1
    g = g[0]
    pe, vol = g[0], g[1]
    p = g[6:12]
    res = {
        "energy": pe,
        "max_force_std": g[2],
        "mean_force_std": g[3],
        "energy_std": g[4],
        "n_over": g[5],
        "virial6": p * vol / nktv2p,  # xx yy zz xy xz yz
        "max_force_std_epistemic": g[12],
        "energy_std_epistemic_per_atom": g[13],
        "max_relative_force_std": g[14],
    }
    d = read_dump(workdir / "dump.txt")
    res["id"] = d["id"].astype(int)
    res["forces"] = np.stack([d["fx"], d["fy"], d["fz"]], 1)
    res["atomic_energy"] = d["c_pea"]
    res["uq"] = np.stack([d[f"c_u[{k}]"] for k in range(1, 5)], 1)
    res["relative_force_std"] = d["c_u[6]"]
    res["atomic_virial6"] = -np.stack([d[f"c_sa[{k}]"] for k in range(1, 7)], 1) / nktv2p
    return res


def reference_result(core, model: str, s: Structure, cutoff: float, driving="mean", threshold=None):
    """What LAMMPS must print, from the binding (rows sorted by atom id)."""
    engine, out = reference(core, model, s, cutoff, driving=driving)
    order = np.argsort(s.ids)
    w = out["virial"]
    aw = out["atomic_virial"]
    thr = engine.metadata["thresholds"]["atomic_force_std"] if threshold is None else threshold
    sig = out["atomic_force_std"]
    return {
        "energy": float(out["energy"]),
        "max_force_std": sig.max(),
        "mean_force_std": sig.mean(),
        "energy_std": float(out["energy_std"]),
        "n_over": float((sig > thr).sum()),
        "virial6": np.array([w[0, 0], w[1, 1], w[2, 2], w[0, 1], w[0, 2], w[1, 2]]),
        "max_force_std_epistemic": out["atomic_force_std_epistemic"].max(),
        "energy_std_epistemic_per_atom": float(np.sqrt(out["energy_var_epistemic"])) / len(s.ids),
        "id": np.asarray(s.ids)[order],
        "forces": out["forces"][order],
        "atomic_energy": out["atomic_energy"][order],
        "uq": np.stack(
            [out["atomic_force_std"], out["atomic_force_std_epistemic"], out["atomic_force_std_aleatoric"],
             out["atomic_energy_std"]], 1)[order],
        "atomic_virial6": np.stack(
            [aw[:, 0, 0], aw[:, 1, 1], aw[:, 2, 2], aw[:, 0, 1], aw[:, 0, 2], aw[:, 1, 2]], 1)[order],
    }


# quantities the same in every LAMMPS unit style: a count and the relative force σ's
UNIT_FREE = ("n_over", "relative_force_std", "max_relative_force_std")


def assert_same(got: dict, ref: dict, rtol: float = 1e-10, scale: float = 1.0, skip=()):
    """Every quantity within rtol relative to the largest magnitude of that quantity."""
    np.testing.assert_array_equal(got["id"], ref["id"])
    for key, value in ref.items():
        if key == "id" or key in skip:
            continue
        want = np.asarray(value, dtype=float) * (1.0 if key in UNIT_FREE else scale)
        have = np.asarray(got[key], dtype=float)
        mag = max(np.abs(want).max(initial=0.0), 1e-30)
        np.testing.assert_allclose(have, want, rtol=rtol, atol=rtol * mag, err_msg=key)
