"""The pool-based loop: train, score the unlabelled pool, label the best batch, repeat.

(``mode: on_the_fly``, LAMMPS MD that halts at high σ, lives in ``_onthefly``; both share the
config (``_config``), the oracles (``_oracles``), the crash-safe labelled file (``_store``)
and the run state (``_rounds``).)

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
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np

from .._figures import new_figure, save_figure
from .._files import jsonable, write_json_atomic
from ._config import ActiveConfig, round_training_config
from ._oracles import Oracle, label_structures, make_oracle
from ._picks import describe_picks, picks_line, pool_tags, summarize_picks
from ._rounds import Display, open_state, train_round
from ._store import (
    AL_ROUND,
    LABELLED_FILE,
    POOL_INDEX,
    append_frame,
    frame_atoms,
    labelled_atoms,
    read_labelled,
    write_training_file,
)

CURVE_FILE = "learning_curve.json"
CURVE_PLOT = "learning_curve.png"
# the numbers of each test set that go into the learning curve (set_metrics names)
CURVE_METRICS = (
    "forces_mae_eV_per_A",
    "forces_rmse_eV_per_A",
    "energy_rmse_eV",
    "energy_rmse_meV_per_atom",
    "forces_nll",
    "energy_nll",
)


def _fingerprint(config: ActiveConfig) -> Dict[str, Any]:
    """What a restarted loop must agree with (n_rounds, test sets and oracle workers may change)."""
    return dict(mode=config.mode, pool=config.pool, initial=config.initial, n_initial=config.n_initial,
                seed=config.seed, strategy=config.strategy, batch_size=config.batch_size,
                batch_aware=config.batch_aware, warm_start=config.warm_start,
                pool_sha256=hashlib.sha256(Path(config.pool).read_bytes()).hexdigest())


def run_pool_al(config: ActiveConfig, progress: bool = True, oracle: Optional[Oracle] = None) -> Dict[str, Any]:
    """Run (or continue) the pool loop of ``config``; returns the learning curve.

    ``oracle`` overrides the configured one (e.g. a wrapped or counting oracle)."""
    from ..bayes import load_posterior
    from ..data import read_frames
    from ..train import ConfigError
    from ..uq import evaluate_sets, predict_frames
    from ._acquisition import select_batch

    if config.mode != "pool":
        raise ConfigError(f"run_pool_al needs mode 'pool', got {config.mode!r}")
    say = Display(progress)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    read = dict(energy_key=config.energy_key, forces_key=config.forces_key)
    from_pool = config.oracle.kind == "from_pool"
    pool = read_frames(config.pool, require_energy=from_pool, require_forces=from_pool, **read)
    tags = pool_tags(config.pool, **read)
    if oracle is None:
        oracle = make_oracle(config.oracle, pool)
    # energies are required, forces not: a scan or NEB path may carry energies only
    test_sets = {name: read_frames(path, require_forces=False, **read) for name, path in config.test.items()}

    state, save_state = open_state(out, _fingerprint(config), dict(initial_picks=None, rounds=[]), say)

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
            append_frame(labelled_path, atoms)
            labelled[int(atoms.info[POOL_INDEX])] = atoms

        atoms_list = [frame_atoms(pool[i], i) for i in missing]
        label_structures(oracle, atoms_list, store, workers=config.oracle.workers, progress=progress,
                         description=description)
        return time.perf_counter() - started

    # the initial set
    if config.initial is not None:
        initial_frames = read_frames(config.initial, **read)
        initial_atoms = []
        for frame in initial_frames:
            atoms = frame_atoms(frame)
            initial_atoms.append(labelled_atoms(atoms, frame.energy, frame.forces))
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
                write_training_file(train_file, training_atoms, training_config.data.energy_key,
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
            write_json_atomic(round_dir / "metrics.json", evaluation["sets"])
            record["metrics"] = {name: {m: metrics.get(m) for m in CURVE_METRICS}
                                 for name, metrics in jsonable(evaluation["sets"]).items()}
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
        record["picks"] = describe_picks(prediction, chosen, record["selected"], tags)
        say(f"round {round_index}: {picks_line(summarize_picks(record['picks']))}")
        record["selection_done"] = True
        record["select_s_for_next"] = time.perf_counter() - started  # a cost of the next point
        save_state()
    curve = write_learning_curve(config, state)
    say(f"done: {CURVE_FILE} and {CURVE_PLOT} in {out}")
    return curve


def write_learning_curve(config: ActiveConfig, state: Dict[str, Any]) -> Dict[str, Any]:
    """Write ``learning_curve.json`` and ``learning_curve.png`` from the rounds evaluated so far.

    Per point: round, n_labels (training structures), n_acquired (from the pool, beyond the
    initial set), test-set metrics (CURVE_METRICS), time_s {train, evaluate, select, label}:
    select and label are the selection and labelling of the structures new in this round;
    picked: ``summarize_picks`` of those structures (their σ's when picked, the pool's tags)."""
    points = []
    rounds = state["rounds"]
    for index, record in enumerate(rounds):
        if record.get("metrics") is None or not record.get("trained"):
            continue
        times = dict(record["time_s"])
        times["select"] = rounds[index - 1].get("select_s_for_next", 0.0) if index > 0 else 0.0
        # the structures new in this point's training set: the previous round's picks
        picked = summarize_picks(rounds[index - 1].get("picks", [])) if index > 0 else {}
        points.append(dict(round=record["round"], n_labels=record["n_labels"], n_acquired=record["n_acquired"],
                           test=record["metrics"], time_s=times, picked=picked))
    curve = dict(strategy=config.strategy, batch_size=config.batch_size, batch_aware=config.batch_aware,
                 n_rounds=config.n_rounds, points=points)
    out = Path(config.out)
    write_json_atomic(out / CURVE_FILE, curve)
    _plot_learning_curve(curve, out / CURVE_PLOT)
    return curve


def _plot_learning_curve(curve: Dict[str, Any], path: Path) -> None:
    figure, axes = new_figure(2)
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
    save_figure(figure, path)
