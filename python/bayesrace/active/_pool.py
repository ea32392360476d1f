"""Active learning: the configuration, the oracles and the pool-based loop.

(``mode: on_the_fly``, LAMMPS MD that halts at high σ, lives in ``_onthefly``; it shares the
config, the oracles and the crash-safe labelled file defined here.)

Pool-based: train, score the unlabelled pool, label the best batch, repeat.

Round r = 0 .. n_rounds trains a posterior on the initial set plus every structure acquired
before it (``<out>/round_<r>``, the training YAML with ``out`` and ``data.train`` replaced and,
with ``warm_start``, ``training.init_from`` = the previous round's posterior), evaluates it on
the test sets, and, unless it is the last round, predicts the rest of the pool, selects
``batch_size`` structures with ``_acquisition.select_batch`` and labels them with the oracle.
Every point of ``learning_curve.json`` therefore belongs to one trained posterior; its times
are what that point cost: the training, the selection that chose its newest structures and
their labelling (round 0: the initial picks).

Kill safety. Labels go to ``<out>/labelled.xyz`` one frame at a time (appended, flushed and
fsynced; ``pool_index`` and ``al_round`` in the comment line), so a restart relabels
nothing; a frame cut off by the kill is dropped. ``<out>/state.json`` (written atomically
after every stage) records the initial picks, each round's selection, times and metrics;
training resumes from the round's checkpoints (``bayesrace train``'s own resume logic).

Oracles: ``label(atoms_list) -> atoms_list`` with energy (eV) and forces (eV/Å) attached as
a SinglePointCalculator. ``tblite`` (GFN2-xTB by default, one OpenMP thread per process),
``ase`` (any ASE calculator by import path and keyword arguments) and ``from_pool`` (the
labels already in the pool file, for benchmarks). With ``oracle.workers`` > 1 structures are
labelled in a pool of spawned processes.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from ._config import ORACLE_KINDS, ActiveConfig, OracleSection, round_training_config

LABELLED_FILE = "labelled.xyz"
STATE_FILE = "state.json"
CURVE_FILE = "learning_curve.json"
CURVE_PLOT = "learning_curve.png"
POOL_INDEX = "pool_index"  # atoms.info key of a labelled frame's index in the pool file
AL_ROUND = "al_round"  # atoms.info key: the first round that trains on the frame
# the numbers of each test set that go into the learning curve (set_metrics names)
CURVE_METRICS = (
    "forces_mae_eV_per_A",
    "forces_rmse_eV_per_A",
    "energy_rmse_eV",
    "energy_rmse_meV_per_atom",
    "forces_nll",
    "energy_nll",
)


def train_round(training_config, ranks: int, progress: bool) -> None:
    """Train one round: in this process, or under ``mpirun -np ranks`` from the round's
    ``train_config.yaml`` (the same Config, written out)."""
    from ..train import train, train_config_file, train_under_mpirun

    if ranks <= 1:
        train(training_config, progress=progress)
        return
    path = train_config_file(training_config, Path(training_config.out) / "train_config.yaml")
    train_under_mpirun(path, ranks, quiet=not progress)


# ------------------------------------------------------------------ oracles


def _labelled_atoms(atoms, energy: float, forces: np.ndarray):
    """A bare copy of ``atoms`` (numbers, positions, cell, pbc, info) with its labels."""
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    labelled = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    labelled.info.update(atoms.info)
    labelled.calc = SinglePointCalculator(labelled, energy=float(energy),
                                          forces=np.asarray(forces, dtype=np.float64).reshape(-1, 3))
    return labelled


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

        from ..data._psb3 import _import_tblite, _one_openmp_thread

        calculator_class = _import_tblite()
        periodic = np.asarray(atoms.pbc, dtype=bool)
        extra = dict(lattice=np.asarray(atoms.cell.array) / Bohr, periodic=periodic) if periodic.any() else {}
        with _one_openmp_thread():
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
        return _labelled_atoms(atoms, energy, forces)


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
        return _labelled_atoms(atoms, work.get_potential_energy(), work.get_forces(apply_constraint=False))


class FromPoolOracle(Oracle):
    """The labels already stored in the pool file (no computation)."""

    def __init__(self, frames: Sequence):
        self.frames = frames

    def label_one(self, atoms):
        index = int(atoms.info[POOL_INDEX])
        frame = self.frames[index]
        if frame.energy is None or frame.forces is None:
            raise RuntimeError(f"oracle from_pool: {frame.source} has no energy/forces labels")
        return _labelled_atoms(atoms, frame.energy, frame.forces)


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


# ------------------------------------------------------------------ the labelled file


def _append_frame(path: Path, atoms) -> None:
    """Append one frame as a single write, flushed and fsynced."""
    import io

    import ase.io

    buffer = io.StringIO()
    ase.io.write(buffer, atoms, format="extxyz")
    with open(path, "a") as handle:
        handle.write(buffer.getvalue())
        handle.flush()
        os.fsync(handle.fileno())


def read_labelled(path: Path) -> Dict[int, Any]:
    """{pool index: labelled Atoms} of the complete frames of ``path``; a frame cut off by a
    kill (the file's tail) is removed from the file."""
    import io

    import ase.io

    if not path.is_file():
        return {}
    lines = path.read_text().splitlines(keepends=True)
    position, complete = 0, 0
    while position < len(lines):
        try:
            count = int(lines[position].strip())
        except ValueError:
            break
        if position + 2 + count > len(lines) or not lines[position + 1 + count].endswith("\n"):
            break
        position += 2 + count
        complete = position
    if complete < len(lines):
        path.write_text("".join(lines[:complete]))
    if complete == 0:
        return {}
    frames = ase.io.read(io.StringIO("".join(lines[:complete])), index=":", format="extxyz")
    return {int(atoms.info[POOL_INDEX]): atoms for atoms in frames}


# ------------------------------------------------------------------ the loop


def _atomic_json(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


def _frame_to_atoms(frame, index: Optional[int] = None):
    from ase import Atoms

    atoms = Atoms(numbers=frame.numbers, positions=frame.positions, cell=frame.cell, pbc=frame.pbc)
    if index is not None:
        atoms.info[POOL_INDEX] = int(index)
    return atoms


def _write_training_file(path: Path, labelled: Sequence, energy_key: str, forces_key: str) -> None:
    """extxyz with the labels under the training config's keys (written once per round)."""
    import ase.io
    from ase import Atoms

    frames = []
    for atoms in labelled:
        energy, forces = atoms.get_potential_energy(), atoms.get_forces(apply_constraint=False)
        copy = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        copy.info.update({k: v for k, v in atoms.info.items() if k not in (energy_key, forces_key)})
        if (energy_key, forces_key) == ("energy", "forces"):
            from ase.calculators.singlepoint import SinglePointCalculator

            copy.calc = SinglePointCalculator(copy, energy=energy, forces=forces)
        else:
            copy.info[energy_key] = energy
            copy.arrays[forces_key] = np.asarray(forces)
        frames.append(copy)
    tmp = path.with_name(path.name + ".tmp.xyz")
    ase.io.write(tmp, frames, format="extxyz")
    os.replace(tmp, path)


def _fingerprint(config: ActiveConfig) -> Dict[str, Any]:
    """What a restarted loop must agree with (n_rounds, test sets and oracle workers may change)."""
    return dict(mode=config.mode, pool=config.pool, initial=config.initial, n_initial=config.n_initial,
                seed=config.seed, strategy=config.strategy, batch_size=config.batch_size,
                batch_aware=config.batch_aware, warm_start=config.warm_start,
                pool_sha256=hashlib.sha256(Path(config.pool).read_bytes()).hexdigest())


class _Display:
    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"bayesrace al: {message}", file=sys.stderr, flush=True)


def run_pool_al(config: ActiveConfig, progress: bool = True, oracle: Optional[Oracle] = None) -> Dict[str, Any]:
    """Run (or continue) the pool loop of ``config``; returns the learning curve.

    ``oracle`` overrides the configured one (e.g. a wrapped or counting oracle)."""
    from ..train import ConfigError

    from ._acquisition import select_batch
    from ..data import read_frames
    from ..uq import evaluate_sets, predict_frames
    from ..bayes import load_posterior

    if config.mode != "pool":
        raise ConfigError(f"run_pool_al needs mode 'pool', got {config.mode!r}")
    say = _Display(progress)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    read = dict(energy_key=config.energy_key, forces_key=config.forces_key)
    from_pool = config.oracle.kind == "from_pool"
    pool = read_frames(config.pool, require_energy=from_pool, require_forces=from_pool, **read)
    if oracle is None:
        oracle = make_oracle(config.oracle, pool)
    # energies are required, forces not: a scan or NEB path may carry energies only
    test_sets = {name: read_frames(path, require_forces=False, **read) for name, path in config.test.items()}

    state_path = out / STATE_FILE
    fingerprint = _fingerprint(config)
    if state_path.is_file():
        state = json.loads(state_path.read_text())
        if state["fingerprint"] != fingerprint:
            changed = sorted(k for k in fingerprint if state["fingerprint"].get(k) != fingerprint[k])
            raise ConfigError(f"{out}: this directory holds an active-learning run with different {changed}; "
                              "use another 'out' or delete it to start over")
        say(f"continuing the run in {out}")
    else:
        state = dict(fingerprint=fingerprint, initial_picks=None, rounds=[])
    save_state = lambda: _atomic_json(state_path, state)  # noqa: E731

    labelled_path = out / LABELLED_FILE
    labelled = read_labelled(labelled_path)

    def acquire(indices: Sequence[int], round_index: int, description: str) -> float:
        """Label the indices not labelled yet; returns the seconds spent."""
        missing = [int(i) for i in indices if int(i) not in labelled]
        if len(missing) < len(indices):
            say(f"{len(indices) - len(missing)} of {len(indices)} already labelled ({LABELLED_FILE})")
        started = time.perf_counter()

        def store(atoms):
            atoms.info[AL_ROUND] = round_index
            _append_frame(labelled_path, atoms)
            labelled[int(atoms.info[POOL_INDEX])] = atoms

        atoms_list = [_frame_to_atoms(pool[i], i) for i in missing]
        label_structures(oracle, atoms_list, store, workers=config.oracle.workers, progress=progress,
                         description=description)
        return time.perf_counter() - started

    # the initial set
    if config.initial is not None:
        initial_frames = read_frames(config.initial, **read)
        initial_atoms = []
        for frame in initial_frames:
            atoms = _frame_to_atoms(frame)
            initial_atoms.append(_labelled_atoms(atoms, frame.energy, frame.forces))
        initial_label_s = 0.0
    else:
        if config.n_initial > len(pool):
            raise ConfigError(f"n_initial = {config.n_initial} is larger than the pool ({len(pool)} structures)")
        if state["initial_picks"] is None:
            picks = np.random.default_rng(config.seed).choice(len(pool), size=config.n_initial, replace=False)
            state["initial_picks"] = sorted(int(i) for i in picks)
            save_state()
        initial_label_s = acquire(state["initial_picks"], 0, "label initial")
        initial_atoms = None  # read from `labelled` per round
    taken = set(state["initial_picks"] or [])

    curve = None
    for round_index in range(config.n_rounds + 1):
        if round_index < len(state["rounds"]):
            record = state["rounds"][round_index]
        else:
            record = dict(round=round_index, selected=[], time_s=dict(train=0.0, evaluate=0.0, select=0.0,
                                                                      label=initial_label_s if round_index == 0
                                                                      else 0.0))
            state["rounds"].append(record)
        previous = state["rounds"][round_index - 1] if round_index > 0 else None
        if previous is not None:
            # the structures chosen after the previous round (selected before its labelling)
            if previous.get("labelled") is not True:
                record["time_s"]["label"] = acquire(previous["selected"], round_index,
                                                    f"round {round_index} label")
                previous["labelled"] = True
                save_state()
            taken.update(previous["selected"])
        round_dir = out / f"round_{round_index}"
        round_dir.mkdir(exist_ok=True)
        acquired = [i for r in state["rounds"][:round_index] for i in r["selected"]]
        base = initial_atoms if initial_atoms is not None else [labelled[i] for i in state["initial_picks"]]
        training_atoms = list(base) + [labelled[i] for i in acquired]
        record["n_labels"] = len(training_atoms)
        record["n_acquired"] = len(acquired)
        train_file = round_dir / "train.xyz"
        training_config = round_training_config(config, round_index, str(train_file))
        training_config.validate()

        if not record.get("trained"):
            if not train_file.is_file():
                _write_training_file(train_file, training_atoms, training_config.data.energy_key,
                                     training_config.data.forces_key)
            say(f"round {round_index}/{config.n_rounds}: training on {len(training_atoms)} structures"
                f"{' (warm start)' if training_config.training.init_from else ''} -> {round_dir}")
            started = time.perf_counter()
            train_round(training_config, config.training_ranks, progress)
            record["time_s"]["train"] += time.perf_counter() - started
            record["trained"] = True
            save_state()
        posterior = None
        if test_sets and record.get("metrics") is None:
            say(f"round {round_index}/{config.n_rounds}: evaluating on {', '.join(test_sets)}")
            started = time.perf_counter()
            posterior = load_posterior(round_dir / "posterior.pt", dtype=training_config.torch_dtype)
            evaluation = evaluate_sets(posterior, test_sets, progress=False,
                                       batch_size=config.predict_batch_size)
            _atomic_json(round_dir / "metrics.json", _plain(evaluation["sets"]))
            record["metrics"] = {name: {m: metrics.get(m) for m in CURVE_METRICS}
                                 for name, metrics in _plain(evaluation["sets"]).items()}
            record["time_s"]["evaluate"] = time.perf_counter() - started
            save_state()
        elif not test_sets:
            record.setdefault("metrics", {})
        curve = write_learning_curve(config, state)

        if round_index == config.n_rounds or record.get("selection_done"):
            continue
        remaining = [i for i in range(len(pool)) if i not in taken]
        if not remaining:
            say(f"round {round_index}: the pool is exhausted; stopping")
            break
        k = min(config.batch_size, len(remaining))
        say(f"round {round_index}/{config.n_rounds}: selecting {k} of {len(remaining)} pool structures "
            f"by {config.strategy}{' (batch-aware)' if config.batch_aware else ''}")
        started = time.perf_counter()
        if posterior is None:
            posterior = load_posterior(round_dir / "posterior.pt", dtype=training_config.torch_dtype)
        prediction = predict_frames(posterior, [pool[i] for i in remaining], batch_size=config.predict_batch_size,
                                    dtype=training_config.torch_dtype, progress=progress,
                                    progress_label=f"round {round_index} predict pool")
        chosen = select_batch(prediction, k, config.strategy, seed=config.seed + round_index,
                              batch_aware=config.batch_aware)
        record["selected"] = [int(remaining[c]) for c in chosen]
        record["selection_done"] = True
        record["select_s_for_next"] = time.perf_counter() - started  # a cost of the next point
        save_state()
    curve = write_learning_curve(config, state)
    say(f"done: {CURVE_FILE} and {CURVE_PLOT} in {out}")
    return curve


def _plain(value):
    from ..uq._evaluate import _jsonable

    return _jsonable(value)


def write_learning_curve(config: ActiveConfig, state: Dict[str, Any]) -> Dict[str, Any]:
    """Write ``learning_curve.json`` and ``learning_curve.png`` from the rounds evaluated so far.

    Per point: round, n_labels (training structures), n_acquired (from the pool, beyond the
    initial set), test-set metrics (CURVE_METRICS), time_s {train, evaluate, select, label}:
    select and label are the selection and labelling of the structures new in this round."""
    points = []
    rounds = state["rounds"]
    for index, record in enumerate(rounds):
        if record.get("metrics") is None or not record.get("trained"):
            continue
        times = dict(record["time_s"])
        times["select"] = rounds[index - 1].get("select_s_for_next", 0.0) if index > 0 else 0.0
        points.append(dict(round=record["round"], n_labels=record["n_labels"], n_acquired=record["n_acquired"],
                           test=record["metrics"], time_s=times))
    curve = dict(strategy=config.strategy, batch_size=config.batch_size, batch_aware=config.batch_aware,
                 n_rounds=config.n_rounds, points=points)
    out = Path(config.out)
    _atomic_json(out / CURVE_FILE, curve)
    _plot_learning_curve(curve, out / CURVE_PLOT)
    return curve


def _plot_learning_curve(curve: Dict[str, Any], path: Path) -> None:
    from ..uq._evaluate import _new_figure  # the object API: no pyplot state, no global backend

    figure, axes = _new_figure(2)
    labels = [p["n_labels"] for p in curve["points"]]
    sets = sorted({name for p in curve["points"] for name in p["test"]})
    for axis, metric, title in ((axes[0], "forces_mae_eV_per_A", "force MAE (eV/Å)"),
                                (axes[1], "forces_nll", "force NLL per component")):
        for name in sets:
            values = [p["test"].get(name, {}).get(metric) for p in curve["points"]]
            values = [np.nan if v is None else v for v in values]
            axis.plot(labels, values, marker="o", label=name)
        axis.set_xlabel("labelled structures")
        axis.set_title(title)
        if metric == "forces_mae_eV_per_A" and sets:
            axis.set_yscale("log")
        if sets:
            axis.legend(fontsize=8)
    figure.suptitle(f"active learning, {curve['strategy']}, k = {curve['batch_size']}")
    tmp = path.with_name(path.stem + ".tmp.png")
    figure.savefig(tmp, dpi=110)
    os.replace(tmp, path)
