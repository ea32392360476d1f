"""Training of RACE members and deep ensembles.

One member: Adam/AdamW, an exponential moving average (EMA) of the weights that is what
gets validated and kept, ReduceLROnPlateau and early stopping on the validation loss,
gradient clipping. A checkpoint is written atomically after every epoch (model,
EMA, optimiser, scheduler, history), so a killed run loses at most the epoch under way;
batch order is a function of (seed, epoch) only, so a resumed run continues exactly.

An ensemble trains its members one after another, or in parallel under
``mpirun -np K bayesrace train`` (member m on rank m mod K, one torch thread per rank);
rank 0 then writes ``posterior.pt``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel

from . import keys
from ._config import Config, config_to_dict
from ._data import (
    DataError,
    Graph,
    TypeMap,
    fit_reference_energies,
    frames_to_graphs,
    isolated_atom_energies,
    iterate_batches,
    read_frames,
    split,
)
from ._losses import TRAINED_HEADS, loss_function
from ._model import RACE, build_model
from ._mpi import mpi_world
from ._posterior import load_posterior, save_posterior

CHECKPOINT = "checkpoint.pt"
METRICS_LOG = "metrics.jsonl"
POSTERIOR_FILE = "posterior.pt"
# config entries that may change between a run and its resumption
_RESUMABLE_CHANGES = ("max_epochs", "max_minutes", "early_stopping_patience", "threads")


@dataclasses.dataclass
class TrainingData:
    train: List[Graph]
    valid: List[Graph]
    type_names: List[str]
    reference_energies: List[float]
    energy_shift: float
    energy_scale: float
    avg_num_neighbors: float
    data_sha256: str


def _sha256_files(paths: List[Optional[str]]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        if path:
            digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def prepare_data(config: Config, progress: bool = False) -> TrainingData:
    """Read, validate and featurise the training and validation sets (deterministic)."""
    data = config.data
    read = dict(energy_key=data.energy_key, forces_key=data.forces_key, stress_key=data.stress_key)
    frames = read_frames(data.train, **read)
    # single-atom frames (e.g. isolated atoms shipped with a data set) carry no forces to learn
    frames = [f for f in frames if len(f.numbers) > 1]
    if data.max_train is not None:
        frames = frames[: data.max_train]
    if data.valid:
        train_frames, valid_frames = frames, read_frames(data.valid, **read)
    else:
        if data.n_valid >= len(frames):
            raise DataError(
                f"{data.train}: {len(frames)} frames, cannot split off n_valid={data.n_valid} for validation"
            )
        train_frames, valid_frames = split(frames, data.n_valid, config.seed)
    type_map = TypeMap.from_frames(train_frames)
    if isinstance(data.reference_energies, dict):
        references = data.reference_energies
    elif data.reference_energies == "isolated":
        references = isolated_atom_energies(read_frames(data.isolated_atoms, require_forces=False, **{
            k: v for k, v in read.items() if k != "forces_key"}))
    else:
        references = fit_reference_energies(train_frames, type_map.type_names)
    missing = [t for t in type_map.type_names if t not in references]
    if missing:
        raise DataError(f"no reference energy for element(s) {missing}; given for {sorted(references)}")
    reference_list = [float(references[t]) for t in type_map.type_names]

    model_config = config.model.model_config()
    train = frames_to_graphs(train_frames, type_map, model_config.cutoff, progress=progress)
    valid = frames_to_graphs(valid_frames, type_map, model_config.cutoff, progress=progress)

    residual_per_atom = np.array(
        [(g.energy - sum(reference_list[s] for s in g.species)) / len(g.species) for g in train]
    )
    all_forces = np.concatenate([g.forces.reshape(-1) for g in train])
    energy_scale = float(np.sqrt(np.mean(all_forces**2))) if all_forces.size else float(residual_per_atom.std())
    avg_neighbors = float(np.mean([g.edge_index.shape[1] / len(g.species) for g in train]))
    return TrainingData(
        train=train,
        valid=valid,
        type_names=type_map.type_names,
        reference_energies=reference_list,
        energy_shift=float(residual_per_atom.mean()),
        energy_scale=energy_scale if energy_scale > 0 else 1.0,
        avg_num_neighbors=avg_neighbors,
        data_sha256=_sha256_files([data.train, data.valid]),
    )


def _member_seed(config: Config, member: int) -> int:
    return config.seed * 1000 + member


def _new_member_model(config: Config, data: TrainingData, member: int) -> RACE:
    model_config = config.model.model_config()
    if model_config.avg_num_neighbors <= 0:
        model_config.avg_num_neighbors = data.avg_num_neighbors
    return build_model(
        model_config,
        data.type_names,
        data.reference_energies,
        data.energy_shift,
        data.energy_scale,
        dtype=config.torch_dtype,
        seed=_member_seed(config, member),
    )


def _comparable_config(config: Config) -> Dict:
    values = config_to_dict(config)
    for name in _RESUMABLE_CHANGES:
        values["training"].pop(name, None)
    values.pop("out", None)
    values["ensemble"].pop("members", None)
    return values


def _ema_update(decay: float):
    """EMA whose decay warms up as min(decay, (1+n)/(10+n)) over the first updates, so the
    average is not dominated by the random initial weights in short runs."""

    def update(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        n = float(num_averaged)
        rate = min(decay, (1.0 + n) / (10.0 + n))
        return rate * averaged + (1.0 - rate) * current

    return update


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_history(history: List[Dict], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(entry) + "\n" for entry in history))
    os.replace(tmp, path)


def evaluate_loss(model: torch.nn.Module, graphs: List[Graph], config: Config, loss_kind: str) -> Dict[str, float]:
    """Mean loss and energy/force RMSE of a model on graphs (in eval mode)."""
    was_training = model.training
    model.eval()
    loss_fn = loss_function(loss_kind)
    total_loss, n_structures = 0.0, 0
    energy_sq, n_energy, force_sq, n_force = 0.0, 0, 0.0, 0
    for batch in iterate_batches(graphs, config.training.batch_size, shuffle=False, dtype=config.torch_dtype):
        pred = model(batch)
        b = batch[keys.NUM_ATOMS].shape[0]
        total_loss += float(loss_fn(pred, batch, config.loss.energy_weight, config.loss.force_weight).detach()) * b
        n_structures += b
        energy_sq += float(((pred[keys.ENERGY] - batch[keys.ENERGY]).detach() / batch[keys.NUM_ATOMS]).pow(2).sum())
        n_energy += b
        force_sq += float((pred[keys.FORCES] - batch[keys.FORCES]).detach().pow(2).sum())
        n_force += batch[keys.FORCES].numel()
    model.train(was_training)
    return {
        "loss": total_loss / max(n_structures, 1),
        "energy_rmse_per_atom": math.sqrt(energy_sq / max(n_energy, 1)),
        "force_rmse": math.sqrt(force_sq / max(n_force, 1)),
    }


class _Progress:
    """A tqdm bar when one process trains; a line per epoch (at most every 10 s) under MPI."""

    def __init__(self, member: int, total: int, start: int, enabled: bool, use_bar: bool):
        self.enabled = enabled
        self.member = member
        self.bar = None
        self.last_line = 0.0
        if enabled and use_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc=f"member {member}", unit="epoch", dynamic_ncols=True)

    def update(self, entry: Dict) -> None:
        if not self.enabled:
            return
        summary = dict(
            train=f"{entry['train_loss']:.3g}",
            valid=f"{entry['valid_loss']:.3g}",
            E=f"{1000 * entry['valid_energy_rmse_per_atom']:.2f}meV/at",
            F=f"{1000 * entry['valid_force_rmse']:.1f}meV/Å",
        )
        if self.bar is not None:
            self.bar.set_postfix(summary, refresh=False)
            self.bar.update(1)
        elif time.time() - self.last_line > 10.0:
            self.last_line = time.time()
            print(f"member {self.member} epoch {entry['epoch']}: " + " ".join(f"{k}={v}" for k, v in summary.items()),
                  flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _finished(state: Dict, training, loss_warmup: int) -> bool:
    """Recomputed from the saved state, so a resumed run may be given more epochs or time."""
    out_of_time = training.max_minutes is not None and state["elapsed"] > 60.0 * training.max_minutes
    stale = state["stale_epochs"] >= training.early_stopping_patience and state["epoch"] > loss_warmup
    return out_of_time or stale or state["epoch"] >= training.max_epochs


def train_member(
    config: Config, data: TrainingData, member: int, progress: bool = True, use_bar: bool = True
) -> Path:
    """Train (or resume) one member; returns its checkpoint path."""
    member_dir = Path(config.out) / f"member_{member}"
    member_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = member_dir / CHECKPOINT
    training = config.training

    model = _new_member_model(config, data, member)
    model.train()
    optimizer_cls = torch.optim.AdamW if training.optimizer == "adamw" else torch.optim.Adam
    optimizer = optimizer_cls(model.parameters(), lr=training.lr, weight_decay=training.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=training.lr_factor, patience=training.lr_patience, min_lr=training.min_lr
    )
    ema = AveragedModel(model, avg_fn=_ema_update(training.ema_decay), use_buffers=True) \
        if training.ema_decay > 0 else None
    state = dict(epoch=0, best_loss=math.inf, best_state=None, stale_epochs=0, history=[], elapsed=0.0)

    if checkpoint_path.exists():
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        if checkpoint["config"] != _comparable_config(config):
            raise RuntimeError(
                f"{checkpoint_path}: this checkpoint was written with a different config; "
                f"use another 'out' directory or delete {member_dir} to start over"
            )
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if ema is not None:
            ema.load_state_dict(checkpoint["ema"])
        state = checkpoint["state"]
    loss_warmup = config.loss.mse_warmup_epochs
    if _finished(state, training, loss_warmup):
        return checkpoint_path

    bar = _Progress(member, training.max_epochs, state["epoch"], progress, use_bar)
    seed = _member_seed(config, member)
    started = time.time() - state["elapsed"]
    try:
        while state["epoch"] < training.max_epochs:
            epoch = state["epoch"]
            loss_kind = "mse" if epoch < loss_warmup else config.loss.kind
            loss_fn = loss_function(loss_kind)
            if epoch == loss_warmup and loss_warmup > 0:
                # the loss changes meaning: restart the plateau and early-stopping clocks
                state["best_loss"], state["stale_epochs"] = math.inf, 0
                scheduler.best = scheduler.mode_worse
            train_loss, n_batches = 0.0, 0
            for batch in iterate_batches(
                data.train, training.batch_size, shuffle=True, seed=seed, epoch=epoch, dtype=config.torch_dtype
            ):
                optimizer.zero_grad(set_to_none=True)
                pred = model(batch)
                loss = loss_fn(pred, batch, config.loss.energy_weight, config.loss.force_weight)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"member {member}, epoch {epoch}: training loss became {float(loss)}; "
                        "lower training.lr or use loss.mse_warmup_epochs"
                    )
                loss.backward()
                if training.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), training.grad_clip)
                optimizer.step()
                if ema is not None:
                    ema.update_parameters(model)
                train_loss += float(loss.detach())
                n_batches += 1
            evaluated = ema.module if ema is not None else model
            valid = evaluate_loss(evaluated, data.valid, config, loss_kind)
            scheduler.step(valid["loss"])
            improved = valid["loss"] < state["best_loss"]
            if improved:
                state["best_loss"] = valid["loss"]
                state["best_state"] = {k: v.detach().clone() for k, v in evaluated.state_dict().items()}
                state["stale_epochs"] = 0
            else:
                state["stale_epochs"] += 1
            state["epoch"] = epoch + 1
            state["elapsed"] = time.time() - started
            entry = dict(
                epoch=epoch + 1,
                loss_kind=loss_kind,
                train_loss=train_loss / max(n_batches, 1),
                valid_loss=valid["loss"],
                valid_energy_rmse_per_atom=valid["energy_rmse_per_atom"],
                valid_force_rmse=valid["force_rmse"],
                lr=optimizer.param_groups[0]["lr"],
                elapsed_s=state["elapsed"],
            )
            state["history"].append(entry)
            _atomic_save(
                dict(
                    config=_comparable_config(config),
                    model=model.state_dict(),
                    ema=ema.state_dict() if ema is not None else None,
                    optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict(),
                    state=state,
                ),
                checkpoint_path,
            )
            _write_history(state["history"], member_dir / METRICS_LOG)
            bar.update(entry)
            if _finished(state, training, loss_warmup):
                break
    finally:
        bar.close()
    return checkpoint_path


def best_member_model(config: Config, data: TrainingData, member: int) -> RACE:
    checkpoint = torch.load(Path(config.out) / f"member_{member}" / CHECKPOINT, map_location="cpu", weights_only=False)
    model = _new_member_model(config, data, member)
    best = checkpoint["state"]["best_state"]
    if best is None:
        raise RuntimeError(f"member {member} has no validated weights yet (no epoch finished)")
    model.load_state_dict(best)
    model.set_trained_heads(TRAINED_HEADS[config.loss.kind])
    return model.eval()


def train(config: Config, progress: bool = True) -> Path:
    """Train every member of the ensemble (resuming where checkpoints exist); write posterior.pt."""
    comm, rank, size = mpi_world()
    torch.set_num_threads(config.training.threads)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (out / "config.json").write_text(json.dumps(config_to_dict(config), indent=2))
    data = prepare_data(config, progress=False)
    if rank == 0 and progress:
        print(
            f"bayesrace train: {len(data.train)} training / {len(data.valid)} validation structures, "
            f"types {data.type_names}, {config.ensemble.members} member(s) on {size} process(es), "
            f"avg neighbours {data.avg_num_neighbors:.1f}",
            file=sys.stderr,
            flush=True,
        )
    for member in range(rank, config.ensemble.members, size):
        train_member(config, data, member, progress=progress, use_bar=size == 1)
    if comm is not None:
        comm.Barrier()
    path = out / POSTERIOR_FILE
    if rank == 0:
        members = [best_member_model(config, data, m) for m in range(config.ensemble.members)]
        save_posterior(
            path,
            members,
            kind="ensemble",
            config=config_to_dict(config),
            data_sha256=data.data_sha256,
        )
    if comm is not None:
        comm.Barrier()
    return path


__all__ = ["TrainingData", "prepare_data", "train_member", "train", "evaluate_loss", "load_posterior"]
