"""PSB3 with two electronic states: SA-2-CASSCF(6,6) energies and forces of S0 and S1.

The seed paper labels PSB3 with SSR (spin-restricted ensemble-referenced Kohn-Sham):
the ground-state ensemble energy E_PPS, the open-shell singlet E_OSS and their gap Δ.
There is no open SSR implementation to run, so this data set uses the closest standard
multireference method available openly: state-averaged CASSCF over S0 and S1 with equal
weights, 6 π electrons in the 6 π orbitals of the C=C-C=C-C=N chain, computed with
PySCF. The stand-ins are

* E_PPS (ground state)        -> SA-CASSCF S0 energy   ``info["energy_s0"]``
* E_OSS (first excited state) -> SA-CASSCF S1 energy   ``info["energy_s1"]``
* Δ (S1 - S0 gap)             -> ``energy_s1 - energy_s0``

Both states are described on the same footing, so the gap closes near the twisted S1/S0
crossing region, which is what the SSR quantities were used for. CASSCF lacks dynamic
correlation: absolute gaps are too large by roughly 1 eV compared with SSR or CASPT2.

Active space: the π space is chosen at every geometry by projection (AVAS-like) onto one
2p function per C and N atom, pointing along that atom's local normal (the normal of the
plane through the atom and its bonded neighbours). Unlike AVAS with fixed 'C 2pz' labels
this does not assume a molecular plane, so it works at twisted geometries. The 3 occupied
and 3 virtual RHF orbitals with the largest π weight form the active space; a geometry
where the count of orbitals with π weight > ``PI_THRESHOLD`` is not exactly 3 + 3 is an
error. S1 is kept a singlet by PySCF's spin penalty (``fix_spin_(ss=0)``); without it
the second root is a triplet.

Units: energies eV, forces eV/Å (= -gradient), positions Å; total energies (no
reference subtracted). Files and keys: see ``generate_psb3_casscf``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from ._casscf_geometry import FRAME_PATTERN, NOISE_SIGMA, frame_geometry, geometry_hash

__all__ = ["CASSCFFailure", "generate_psb3_casscf", "label_casscf", "pi_active_space"]

CHARGE = 1
SPIN = 0
N_ACTIVE_ORBITALS = 6
N_ACTIVE_ELECTRONS = 6
STATE_WEIGHTS = (0.5, 0.5)
PI_THRESHOLD = 0.5
CONV_TOL = 1e-9  # Hartree, CASSCF energy
TORSION_OOD_DEG = 30.0  # torsion frames twisted more than this from trans are out of distribution
SPLIT = (0.70, 0.15, 0.15)


class CASSCFFailure(RuntimeError):
    """A frame that could not be labelled (no convergence, no clean π space)."""


def import_pyscf():
    try:
        import pyscf  # noqa: F401
        from pyscf import gto
    except ImportError as error:
        raise ImportError(
            "the PSB3 CASSCF data set needs PySCF (pip install 'bayesrace[casscf]' or pip install pyscf); "
            f"importing it failed: {error}"
        ) from error
    return gto


def _molecule(atoms, basis: str, charge: int = CHARGE, spin: int = SPIN):
    gto = import_pyscf()
    return gto.M(
        atom=[(s, tuple(p)) for s, p in zip(atoms.get_chemical_symbols(), atoms.positions)],
        basis=basis, charge=charge, spin=spin, unit="Angstrom", verbose=0,
    )


def _local_normals(atoms, centres):
    from ase.data import covalent_radii

    x, z = atoms.positions, atoms.numbers
    normals = []
    for i in centres:
        distance = np.linalg.norm(x - x[i], axis=1)
        reach = 1.25 * (covalent_radii[z[i]] + covalent_radii[z])
        bonded = [j for j in range(len(atoms)) if j != i and distance[j] < reach[j]]
        if len(bonded) < 2:
            raise CASSCFFailure(f"π space: atom {i} has {len(bonded)} bonded neighbours, no local plane")
        points = x[[i] + bonded]
        normals.append(np.linalg.svd(points - points.mean(axis=0))[2][-1])
    return normals


def pi_active_space(mf, atoms, n_orbitals: int = N_ACTIVE_ORBITALS, n_electrons: int = N_ACTIVE_ELECTRONS):
    """Orbitals for CASSCF with the π space in the middle: ``(mo_coeff, weights_occ, weights_vir)``.

    The occupied and the virtual RHF orbitals are each rotated among themselves to
    diagonalise their projection onto the local-normal 2p functions (MINAO) of all C and N
    atoms; the weights are that projection's eigenvalues, largest first."""
    gto = import_pyscf()
    mol = mf.mol
    centres = [i for i, z in enumerate(atoms.numbers) if z in (6, 7)]
    reference_mol = gto.M(atom=mol._atom, basis="minao", charge=mol.charge, spin=mol.spin, unit="Bohr", verbose=0)
    labels = reference_mol.ao_labels(fmt=False)
    reference = np.zeros((reference_mol.nao, len(centres)))
    for k, (i, normal) in enumerate(zip(centres, _local_normals(atoms, centres))):
        rows = [a for a, label in enumerate(labels) if label[0] == i and label[2] == "2p"]
        if len(rows) != 3:
            raise CASSCFFailure(f"π space: atom {i} has {len(rows)} MINAO 2p functions, expected 3")
        reference[rows, k] = normal  # pyscf orders p functions x, y, z
    s_ref = reference.T @ reference_mol.intor("int1e_ovlp") @ reference
    s_cross = reference.T @ gto.intor_cross("int1e_ovlp", reference_mol, mol)
    n_occ = mol.nelectron // 2
    half = n_electrons // 2

    def rotate(block):
        projected = s_cross @ block
        weights, vectors = np.linalg.eigh(projected.T @ np.linalg.solve(s_ref, projected))
        return weights[::-1], block @ vectors[:, ::-1]

    w_occ, c_occ = rotate(mf.mo_coeff[:, :n_occ])
    w_vir, c_vir = rotate(mf.mo_coeff[:, n_occ:])
    n_pi_occ, n_pi_vir = int(np.sum(w_occ > PI_THRESHOLD)), int(np.sum(w_vir > PI_THRESHOLD))
    if (n_pi_occ, n_pi_vir) != (half, n_orbitals - half):
        raise CASSCFFailure(
            f"π space: found {n_pi_occ} occupied + {n_pi_vir} virtual orbitals with π weight > {PI_THRESHOLD} "
            f"(occupied {np.round(w_occ[:half + 2], 3).tolist()}, "
            f"virtual {np.round(w_vir[:n_orbitals - half + 2], 3).tolist()}), "
            f"expected {half} + {n_orbitals - half} for CAS({n_electrons},{n_orbitals})"
        )
    mo = np.hstack([c_occ[:, half:], c_occ[:, :half], c_vir[:, : n_orbitals - half], c_vir[:, n_orbitals - half :]])
    return mo, w_occ, w_vir


@contextlib.contextmanager
def _reuse_eri_derivatives(mol):
    """Caches ``mol.intor('int2e_ip1', ...)`` slices: PySCF's SA-CASSCF gradients ask for
    the same two-electron derivative integrals per atom three times per state (about 40%
    of a frame's time with sto-3g). The cached arrays are read-only."""
    cache = {}
    method = mol.intor

    def intor(name, *args, **kwargs):
        if name != "int2e_ip1" or kwargs.get("out") is not None:
            return method(name, *args, **kwargs)
        key = repr((args, sorted((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in kwargs.items())))
        if key not in cache:
            cache[key] = method(name, *args, **kwargs)
            cache[key].flags.writeable = False
        return cache[key]

    mol.intor = intor
    try:
        yield
    finally:
        del mol.intor


INCORE_JK_MAX_BYTES = 2.0e9  # two copies of all (∇i j|kl): 0.1 GB for sto-3g, 1.2 GB for 6-31g


@contextlib.contextmanager
def _incore_jk_derivatives(mol):
    """Serves PySCF's derivative J/K builds (``pyscf.grad.rhf.get_jk``) for ``mol`` from
    all (∇i j|kl) computed once: the SA-CASSCF gradients of two states call it six times,
    each recomputing every integral directly (about 60% of a frame's time). Same
    definitions as PySCF: J[x,i,j] = -(∇i j|kl) D[l,k], K[x,i,l] = -(∇i j|kl) D[j,k]."""
    from pyscf.grad import rhf as rhf_grad

    nao = mol.nao
    if 2 * 3 * nao**4 * 8 > INCORE_JK_MAX_BYTES:
        yield
        return
    eri = mol.intor("int2e_ip1", comp=3, aosym="s1").reshape(3, nao, nao, nao, nao)
    for_k = np.ascontiguousarray(eri.transpose(0, 1, 4, 2, 3)).reshape(3 * nao * nao, nao * nao)
    for_j = eri.reshape(3 * nao * nao, nao * nao)
    original = rhf_grad.get_jk

    def get_jk(mol_, dm):
        if mol_ is not mol:
            return original(mol_, dm)
        dms = np.asarray(dm, dtype=np.float64)
        flat = dms.reshape(-1, nao, nao)
        vj = -(for_j @ flat.transpose(0, 2, 1).reshape(-1, nao * nao).T).T.reshape(-1, 3, nao, nao)
        vk = -(for_k @ flat.reshape(-1, nao * nao).T).T.reshape(-1, 3, nao, nao)
        if dms.ndim == 2:
            return vj[0], vk[0]
        return vj.reshape(dms.shape[:-2] + (3, nao, nao)), vk.reshape(dms.shape[:-2] + (3, nao, nao))

    rhf_grad.get_jk = get_jk
    try:
        yield
    finally:
        rhf_grad.get_jk = original


def label_casscf(atoms, basis: str = "sto-3g", charge: int = CHARGE, spin: int = SPIN,
                 n_orbitals: int = N_ACTIVE_ORBITALS, n_electrons: int = N_ACTIVE_ELECTRONS) -> dict:
    """SA-2-CASSCF (S0, S1, equal weights) of ``atoms`` with PySCF.

    Returns ``energies`` (eV, [2]), ``forces`` (eV/Å, [2, N, 3], -gradient of each state),
    ``converged``, ``natural_occupations`` ([2, n_orbitals], per state, active space),
    ``ci_leading_weight`` ([2], weight of each state's largest determinant),
    ``pi_weights_occupied``/``_virtual`` and ``seconds``. Raises ``CASSCFFailure`` when RHF,
    CASSCF or the gradients' Lagrange equations do not converge, or the π space is unclear."""
    from ase.units import Bohr, Hartree
    from pyscf import fci, mcscf, scf

    started = time.process_time()
    mol = _molecule(atoms, basis, charge, spin)
    mf = scf.RHF(mol)
    mf.conv_tol = 1e-11
    mf.kernel()
    if not mf.converged:
        raise CASSCFFailure("RHF did not converge")
    mo, w_occ, w_vir = pi_active_space(mf, atoms, n_orbitals, n_electrons)
    mc = mcscf.CASSCF(mf, n_orbitals, n_electrons)
    mc.fix_spin_(ss=0)
    mc = mc.state_average_(list(STATE_WEIGHTS))
    mc.conv_tol = CONV_TOL
    mc.kernel(mo)
    if not mc.converged:
        raise CASSCFFailure("SA-CASSCF did not converge")
    nelec = mc.nelecas
    spins = [float(fci.spin_op.spin_square0(ci, n_orbitals, nelec)[0]) for ci in mc.ci]
    if max(spins) > 1e-3:
        raise CASSCFFailure(f"SA-CASSCF states are not singlets: <S^2> = {spins}")
    gradients = []
    with _reuse_eri_derivatives(mol), _incore_jk_derivatives(mol):
        for state in range(len(STATE_WEIGHTS)):
            solver = mc.nuc_grad_method()
            gradient = solver.kernel(state=state)
            if not solver.converged:
                raise CASSCFFailure(f"SA-CASSCF gradient of state {state}: Lagrange equations did not converge")
            gradients.append(np.asarray(gradient))
    occupations = [
        np.sort(np.linalg.eigvalsh(fci.direct_spin1.make_rdm1(ci, n_orbitals, nelec)))[::-1].tolist() for ci in mc.ci
    ]
    return {
        "energies": (np.asarray(mc.e_states, dtype=np.float64) * Hartree).tolist(),
        "forces": (-np.asarray(gradients) * (Hartree / Bohr)).tolist(),
        "converged": True,
        "spin_square": spins,
        "natural_occupations": occupations,
        "ci_leading_weight": [float(np.max(np.abs(ci)) ** 2) for ci in mc.ci],
        "pi_weights_occupied": w_occ[: n_electrons // 2 + 1].tolist(),
        "pi_weights_virtual": w_vir[: n_orbitals - n_electrons // 2 + 1].tolist(),
        "seconds": time.process_time() - started,
    }


# ---------------------------------------------------------------- generation, resume


def _write_json_atomic(path: Path, payload: dict) -> None:
    temporary = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(temporary, "w") as handle:
        json.dump(payload, handle, ensure_ascii=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _label_path(labels: Path, index: int) -> Path:
    return labels / f"frame_{index:05d}.json"


def _one_thread():
    from pyscf import lib

    lib.num_threads(1)


def _label_and_store(task) -> dict:
    """Worker: labels one frame and writes its record (or its failure) atomically."""
    from ase import Atoms

    index, numbers, positions, info, basis, seed, labels = task
    atoms = Atoms(numbers=numbers, positions=positions)
    record = {"index": index, "seed": seed, "basis": basis, "geometry_hash": geometry_hash(atoms),
              "numbers": list(numbers), "positions": atoms.positions.tolist(), "info": info}
    started = time.process_time()
    try:
        record.update(status="ok", labels=label_casscf(atoms, basis))
    except Exception as error:  # noqa: BLE001 - recorded as failed, never written as NaN
        record.update(status="failed", reason=f"{type(error).__name__}: {error}")
    record["cpu_seconds"] = time.process_time() - started
    _write_json_atomic(_label_path(Path(labels), index), record)
    return {"index": index, "status": record["status"], "cpu_seconds": record["cpu_seconds"]}


def _check_settings(labels: Path, settings: dict) -> None:
    path = labels / "settings.json"
    if path.exists():
        stored = json.loads(path.read_text())
        changed = {k: (stored.get(k), v) for k, v in settings.items() if stored.get(k) != v}
        if changed:
            listed = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in changed.items())
            raise ValueError(
                f"{labels} holds labels made with different settings ({listed}); "
                "use another --out directory or the same settings"
            )
    else:
        _write_json_atomic(path, settings)


def _frame_from_record(record: dict):
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    labels = record["labels"]
    atoms = Atoms(numbers=record["numbers"], positions=record["positions"], pbc=False)
    atoms.info.update(record["info"])
    energies, forces = labels["energies"], np.asarray(labels["forces"])
    atoms.info.update(
        energy_s0=energies[0], energy_s1=energies[1], gap_s1_s0=energies[1] - energies[0],
        casscf_converged=bool(labels["converged"]),
        natocc_s0=np.asarray(labels["natural_occupations"][0]), natocc_s1=np.asarray(labels["natural_occupations"][1]),
        ci_leading_weight_s0=labels["ci_leading_weight"][0], ci_leading_weight_s1=labels["ci_leading_weight"][1],
    )
    atoms.arrays["forces_s0"] = forces[0].copy()
    atoms.arrays["forces_s1"] = forces[1].copy()
    atoms.calc = SinglePointCalculator(atoms, energy=energies[0], forces=forces[0].copy())
    return atoms


def _progress(done: int, total: int, failed: int, elapsed: float, labelled: int) -> None:
    rate = elapsed / labelled if labelled else float("nan")
    eta = rate * (total - done) if labelled else float("nan")
    print(f"psb3-casscf: {done}/{total} frames ({failed} failed), {rate:.1f} s/frame, ETA {eta / 60:.1f} min",
          file=sys.stderr, flush=True)


def generate_psb3_casscf(out_dir, n_frames: int = 200, basis: str = "sto-3g", workers: int = 1, seed: int = 0,
                         progress: bool = True) -> dict:
    """Labels ``n_frames`` PSB3 geometries with SA-2-CASSCF(6,6) and writes the data set.

    Every labelled frame is kept as ``OUT/labels/frame_NNNNN.json`` (written atomically),
    so a killed run resumes where it stopped; a directory labelled with another seed or
    basis is an error. A failed frame is recorded too (with its reason) and not retried:
    delete its file to retry it. A larger ``n_frames`` later appends frames. Then writes
    extxyz files ``train.xyz``, ``valid.xyz``, ``test.xyz`` (equilibrium, bla and torsion
    frames within ``TORSION_OOD_DEG`` of trans, split 70/15/15 under the seed) and
    ``test_torsion.xyz`` (torsion frames twisted further), plus ``manifest.json``.
    Per frame: ``info`` ``energy`` (= S0), ``energy_s0``,
    ``energy_s1``, ``gap_s1_s0`` (eV), ``casscf_converged``, ``natocc_s0``/``natocc_s1``,
    ``ci_leading_weight_s0``/``_s1``, ``config_type``, ``torsion_deg``, ``bla`` (Å),
    ``frame_index``; arrays ``forces`` (= S0), ``forces_s0``, ``forces_s1`` (eV/Å).
    Returns the manifest."""
    import ase.io

    import_pyscf()
    if n_frames < 1 or workers < 1:
        raise ValueError(f"generate_psb3_casscf: n_frames and workers must be positive, got {n_frames}, {workers}")
    out = Path(out_dir)
    labels = out / "labels"
    labels.mkdir(parents=True, exist_ok=True)
    settings = {"data_set": "psb3-casscf", "seed": int(seed), "basis": str(basis).lower(),
                "method": f"SA-{len(STATE_WEIGHTS)}-CASSCF({N_ACTIVE_ELECTRONS},{N_ACTIVE_ORBITALS})",
                "noise_sigma": NOISE_SIGMA}
    _check_settings(labels, settings)

    geometries = [frame_geometry(seed, i) for i in range(n_frames)]
    tasks = []
    for atoms in geometries:
        index = atoms.info["frame_index"]
        path = _label_path(labels, index)
        if path.exists():
            stored = json.loads(path.read_text())
            if stored.get("geometry_hash") != geometry_hash(atoms):
                raise ValueError(f"{path}: its geometry is not frame {index} of seed {seed}; the labels in {labels} "
                                 "come from another version of the geometry generator; use another --out directory")
            continue
        info = {k: v for k, v in atoms.info.items()}
        tasks.append((index, atoms.numbers.tolist(), atoms.positions.tolist(), info, settings["basis"], int(seed),
                      str(labels)))

    started, labelled, done = time.perf_counter(), 0, n_frames - len(tasks)
    failed_now = 0
    if progress:
        print(f"psb3-casscf: {done}/{n_frames} frames labelled already, {len(tasks)} to go "
              f"({basis}, {workers} worker(s))",
              file=sys.stderr, flush=True)
    if tasks:
        if workers == 1:
            from pyscf import lib

            threads = lib.num_threads()
            lib.num_threads(1)
            try:
                results = map(_label_and_store, tasks)
                for result in results:
                    labelled, done = labelled + 1, done + 1
                    failed_now += result["status"] != "ok"
                    if progress:
                        _progress(done, n_frames, failed_now, time.perf_counter() - started, labelled)
            finally:
                lib.num_threads(threads)
        else:
            import multiprocessing

            os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the spawned workers
            with multiprocessing.get_context("spawn").Pool(workers, initializer=_one_thread) as pool:
                for result in pool.imap_unordered(_label_and_store, tasks):
                    labelled, done = labelled + 1, done + 1
                    failed_now += result["status"] != "ok"
                    if progress:
                        _progress(done, n_frames, failed_now, time.perf_counter() - started, labelled)

    records = [json.loads(_label_path(labels, i).read_text()) for i in range(n_frames)]
    ok = [r for r in records if r["status"] == "ok"]
    failed = [{"index": r["index"], "config_type": r["info"]["config_type"], "reason": r["reason"]}
              for r in records if r["status"] != "ok"]
    frames = [_frame_from_record(r) for r in ok]
    def is_twisted(f):
        return f.info["config_type"] == "torsion" and f.info["torsion_deg"] < 180.0 - TORSION_OOD_DEG

    twisted = [f for f in frames if is_twisted(f)]
    in_distribution = [f for f in frames if not is_twisted(f)]
    order = np.random.default_rng([int(seed), 2**31]).permutation(len(in_distribution))
    n_valid = round(SPLIT[1] * len(in_distribution))
    n_test = round(SPLIT[2] * len(in_distribution))
    part = np.zeros(len(in_distribution), dtype=np.int64)
    part[order[:n_valid]] = 1
    part[order[n_valid:n_valid + n_test]] = 2
    contents = {
        "train.xyz": [f for f, p in zip(in_distribution, part) if p == 0],
        "valid.xyz": [f for f, p in zip(in_distribution, part) if p == 1],
        "test.xyz": [f for f, p in zip(in_distribution, part) if p == 2],
        "test_torsion.xyz": twisted,
    }
    files = {}
    for name, content in contents.items():
        ase.io.write(out / name, content, format="extxyz")
        files[name] = {"frames": len(content)}
    manifest = _manifest(out, settings, n_frames, workers, records, failed, files, labelled)
    _write_json_atomic(out / "manifest.json", manifest)
    return manifest


def _manifest(out, settings, n_frames, workers, records, failed, files, labelled) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        pyscf_version = version("pyscf")
    except PackageNotFoundError:
        pyscf_version = "unknown"
    counts = {kind: sum(r["info"]["config_type"] == kind for r in records) for kind in sorted(set(FRAME_PATTERN))}
    return {
        **settings,
        "molecule": "PSB3 (penta-2,4-dieniminium, C5H8N+)", "charge": CHARGE, "spin": SPIN,
        "reference": "RHF", "program": f"PySCF {pyscf_version}",
        "active_space": {"electrons": N_ACTIVE_ELECTRONS, "orbitals": N_ACTIVE_ORBITALS,
                         "selection": f"π projection onto local-normal MINAO 2p of C and N, weight > {PI_THRESHOLD}"},
        "states": ["S0", "S1"], "state_weights": list(STATE_WEIGHTS), "spin_penalty": "fix_spin_(ss=0)",
        "ssr_stand_ins": {"E_PPS": "energy_s0", "E_OSS": "energy_s1", "delta": "gap_s1_s0"},
        "units": {"energy": "eV", "forces": "eV/Å", "positions": "Å", "bla": "Å", "torsion_deg": "deg"},
        "geometries": {"pattern": list(FRAME_PATTERN), "noise_sigma_A": NOISE_SIGMA,
                       "minimum": "GFN2-xTB (tblite) relaxation of build_psb3()",
                       "torsion": "C2-C3=C4-C5 set uniformly in [0, 180] deg, C4 side rotated rigidly",
                       "bla": "double bonds stretched, single bonds shortened equally, "
                              "BLA uniform in [-0.12, minimum's]"},
        "split": f"in distribution (equilibrium, bla, torsion within {TORSION_OOD_DEG} deg of trans) "
                 f"{SPLIT[0]:.2f}/{SPLIT[1]:.2f}/{SPLIT[2]:.2f} train/valid/test; test_torsion: twisted further",
        "n_frames": n_frames, "counts": counts, "labelled": n_frames - len(failed), "failed": failed,
        "labelled_this_run": labelled,
        "total_cpu_seconds": round(sum(r.get("cpu_seconds", 0.0) for r in records), 1),
        "regenerate": f"bayesrace data psb3-casscf --out {out} --n {n_frames} --basis {settings['basis']} "
                      f"--seed {settings['seed']} --workers {workers}",
        "files": files,
    }
