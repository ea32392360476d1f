"""Training one member: the epoch loop with validation, plateau schedule, early stopping
and resumption, and the training phases of posterior kinds swag and ivon.

One member: Adam/AdamW, an exponential moving average (EMA) of the weights that is what
gets validated and kept, ReduceLROnPlateau and early stopping on the validation loss,
gradient clipping. A checkpoint is written atomically after every epoch (model,
EMA, optimiser, scheduler, history, torch RNG state and any SWAG moments), so a killed
run loses at most the epoch under way; batch order is a function of (seed, epoch) only,
so a resumed run continues exactly.

- swag: from ``swag.start_epoch`` (or when the validation loss stagnates) at a constant
  learning rate, the raw weights are collected into SWAG moments (``bayes.SwagCollector``).
- ivon: trained like an MVE member until ``ivon.start_epoch`` (or stagnation); then its
  best validated (EMA) weights become the mean of the IVON optimizer, which trains on
  without EMA, validated on its mean.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Dict, List

import torch
from torch.nn.utils import parameters_to_vector
from torch.optim.swa_utils import AveragedModel

from .. import keys
from ..bayes import SwagCollector
from ..data import Graph, iterate_batches
from ..model import RACE
from ._checkpoints import (
    CHECKPOINT,
    METRICS_LOG,
    checkpoint_optimizer_kind,
    comparable_config,
    read_checkpoint,
    same_training,
    save_checkpoint,
    write_history,
)
from ._config import Config
from ._data import TrainingData
from ._heads import fit_head_offsets, heads_phase_pending, heads_should_start, make_heads_optimizer, start_heads_phase
from ._losses import loss_function
from ._members import (
    initial_member_model,
    member_seed,
    model_with_weights,
    new_member_model,
)
from ._optim import (
    CosineToBudget,
    ema_update,
    ivon_training_step,
    make_ivon_optimizer,
    make_optimizer,
    make_scheduler,
)
from ._progress import EpochProgress
from ._shallow import freeze_trunk, is_shallow_head


def mse_warmup_epochs(config: Config, member: int = 0) -> int:
    """MSE epochs before the configured loss; none on a warm start (training.init_from), whose
    variance heads are already trained: a warm-up there moves the means while the variances
    stay put, and the switch back to the NLL then spikes the loss. A shallow ensemble's head
    starts from fresh readouts, warm start or not, so it keeps its warm-up."""
    if config.training.init_from and not is_shallow_head(config, member):
        return 0
    return config.loss.mse_warmup_epochs


def evaluate_loss(model: torch.nn.Module, graphs: List[Graph], config: Config, loss_kind: str) -> Dict[str, float]:
    """Mean loss and energy/force RMSE of a model on graphs (in eval mode)."""
    was_training = model.training
    model.eval()
    loss_fn = loss_function(loss_kind, config.loss.means, config.loss.force_huber)
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


def _finished(state: Dict, config: Config) -> bool:
    """Recomputed from the saved state, so a resumed run may be given more epochs or time.
    SWAG has no early stopping, and IVON none before its phase: stagnation starts that
    phase instead (whose clocks start afresh, so IVON trains at least one epoch)."""
    training = config.training
    if heads_phase_pending(state, config):  # the heads train for at least one epoch, even past the budget
        return False
    out_of_time = training.max_minutes is not None and state["elapsed"] > 60.0 * training.max_minutes
    stale = state["stale_epochs"] >= training.early_stopping_patience and state["epoch"] > mse_warmup_epochs(config)
    ivon_waiting = config.posterior.kind == "ivon" and state.get("ivon_start_epoch") is None
    early_stop = stale and config.posterior.kind != "swag" and not ivon_waiting
    return out_of_time or early_stop or state["epoch"] >= training.max_epochs


def _stop_reason(state: Dict, config: Config) -> str:
    """Why ``_finished`` ended the member (or the epoch limit), and which epoch it keeps."""
    training = config.training
    if training.max_minutes is not None and state["elapsed"] > 60.0 * training.max_minutes:
        why = f"its wall-clock budget of {training.max_minutes:g} min is used ({state['elapsed'] / 60.0:.1f} min)"
    elif state["epoch"] >= training.max_epochs:
        why = f"max_epochs ({training.max_epochs}) reached"
    else:
        why = (f"no validation improvement for {state['stale_epochs']} epochs "
               f"(early_stopping_patience {training.early_stopping_patience})")
    kept = state.get("best_epoch")
    kept_text = f"; keeps epoch {kept} (best validation loss {state['best_loss']:.4g})" if kept else ""
    return f"stopped after epoch {state['epoch']}: {why}{kept_text}"


def _swag_should_start(state: Dict, config: Config) -> bool:
    if config.posterior.kind != "swag" or state.get("swag") is not None:
        return False
    stale = (state["stale_epochs"] >= config.training.early_stopping_patience
             and state["epoch"] > mse_warmup_epochs(config))
    return state["epoch"] >= config.posterior.swag.start_epoch or stale


def _ivon_should_start(state: Dict, config: Config) -> bool:
    """Like :func:`_swag_should_start`: at ivon.start_epoch, or when the warm start stagnates."""
    if config.posterior.kind != "ivon" or state.get("ivon_start_epoch") is not None:
        return False
    stale = (state["stale_epochs"] >= config.training.early_stopping_patience
             and state["epoch"] > mse_warmup_epochs(config))
    return state["epoch"] >= config.posterior.ivon.resolved_start_epoch(config.training.max_epochs) or stale


def _start_ivon(model: RACE, state: Dict, config: Config, data: TrainingData):
    """Enter the IVON phase: the best validated (EMA) weights of the warm start become IVON's
    mean (the weights an MVE member stopped here would keep); a fresh IVON optimizer and
    plateau schedule; best-loss and early-stopping clocks restart, so what is kept is an
    IVON epoch with its Hessian."""
    if state["best_state"] is not None:
        model.load_state_dict(state["best_state"])
    optimizer = make_ivon_optimizer(config, model, data)
    state.update(ivon_start_epoch=state["epoch"], best_loss=math.inf, stale_epochs=0)
    return optimizer, make_scheduler(config, optimizer)


def _start_swag(model: RACE, optimizer: torch.optim.Optimizer, state: Dict, config: Config) -> SwagCollector:
    """Enter the SWAG phase: a constant learning rate and empty moments (recorded in state)."""
    settings = config.posterior.swag
    lr = settings.lr if settings.lr is not None else optimizer.param_groups[0]["lr"]
    for group in optimizer.param_groups:
        group["lr"] = lr
    n_parameters = sum(p.numel() for p in model.parameters())
    swag = SwagCollector(n_parameters, settings.rank, dtype=next(model.parameters()).dtype)
    state.update(swag=swag.state_dict(), swag_steps=0, swag_start_epoch=state["epoch"], swag_lr=lr)
    return swag


def train_member(
    config: Config, data: TrainingData, member: int, progress: bool = True, use_bar: bool = True
) -> Path:
    """Train (or resume) one member; returns its checkpoint path.

    For posterior kind swag the collection phase is part of this training; for ivon the
    warm start and the IVON phase (its Gaussian's mean is what gets validated and kept).
    The checkpoint names the optimizer whose state it holds (``optimizer_kind``)."""
    member_dir = Path(config.out) / f"member_{member}"
    member_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = member_dir / CHECKPOINT
    training = config.training
    kind = config.posterior.kind

    # a warm start (training.init_from) only where there is no checkpoint to resume
    model = (new_member_model if checkpoint_path.exists() else initial_member_model)(config, data, member)
    if is_shallow_head(config, member):
        freeze_trunk(model)
    model.train()
    optimizer = make_optimizer(config, model)
    scheduler = make_scheduler(config, optimizer)
    ema = AveragedModel(model, avg_fn=ema_update(training.ema_decay), use_buffers=True) \
        if training.ema_decay > 0 else None
    state = dict(epoch=0, best_loss=math.inf, best_state=None, stale_epochs=0, history=[], elapsed=0.0)
    seed = member_seed(config, member)
    rng_state = None

    if checkpoint_path.exists():
        checkpoint = read_checkpoint(checkpoint_path)
        if not same_training(checkpoint["config"], comparable_config(config)):
            raise RuntimeError(
                f"{checkpoint_path}: this checkpoint was written with a different config; "
                f"use another 'out' directory or delete {member_dir} to start over"
            )
        model.load_state_dict(checkpoint["model"])
        state = checkpoint["state"]
        if state.get("heads_start_epoch") is not None:
            optimizer, scheduler = make_heads_optimizer(config, model)
            optimizer.load_state_dict(checkpoint["optimizer"])
        elif checkpoint_optimizer_kind(checkpoint) == "ivon":
            optimizer = make_ivon_optimizer(config, model, data)
            scheduler = make_scheduler(config, optimizer)
            optimizer.load_state_dict(checkpoint["optimizer"])
            optimizer.current_step = checkpoint["ivon_step"]  # IVON's bias correction; not in its state_dict
            ema = None  # the IVON phase has none
        else:
            optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if ema is not None:
            ema.load_state_dict(checkpoint["ema"])
        rng_state = checkpoint.get("rng_state")
    if _finished(state, config):
        return checkpoint_path

    # under a wall-clock budget the epoch count is unknown: no total, so no invented ETA
    bar = EpochProgress(member, None if training.max_minutes is not None else training.max_epochs,
                        state["epoch"], progress, use_bar, budget_minutes=training.max_minutes)
    started = time.time() - state["elapsed"]
    swag = SwagCollector.from_state_dict(state["swag"]) if state.get("swag") is not None else None
    # IVON samples weights from torch's global generator: seeded per member, saved with every
    # checkpoint and restored on resumption, and the caller's generator is left untouched
    with torch.random.fork_rng(devices=[]):
        if rng_state is None:
            torch.manual_seed(seed)
        else:
            torch.set_rng_state(rng_state)
        try:
            while state["epoch"] < training.max_epochs:
                epoch = state["epoch"]
                if heads_should_start(state, config):
                    optimizer, scheduler, ema = start_heads_phase(model, state, config, data.train)
                    offsets = state["head_offsets"]
                    moved = state.get("energy_zero_move")
                    bar.say(f"member {member}: the network is frozen at epoch {epoch}; its variance heads learn "
                            f"{config.loss.kind} on its residuals (log-variance offsets E {offsets['energy']:.3g}, "
                            f"F {offsets['forces']:.3g})"
                            + ("" if moved is None else f"; energy zero moved {1000 * moved:+.2f} meV/atom"))
                warmup = mse_warmup_epochs(config, member)
                mse_phase = epoch < warmup or heads_phase_pending(state, config)
                loss_kind = "mse" if mse_phase else config.loss.kind
                loss_fn = loss_function(loss_kind, config.loss.means, config.loss.force_huber)
                if epoch == warmup and warmup > 0 and not mse_phase:
                    # the loss changes meaning: restart the plateau and early-stopping clocks, and
                    # start the heads at the level of the residuals (ema keeps the same offsets)
                    state["best_loss"], state["stale_epochs"] = math.inf, 0
                    scheduler.best = scheduler.mode_worse
                    fit_head_offsets(model, data.train, config, ema=ema)
                if _ivon_should_start(state, config):
                    optimizer, scheduler = _start_ivon(model, state, config, data)
                    ema = None
                    bar.say(f"member {member}: IVON takes over at epoch {epoch} "
                            f"(lr {optimizer.param_groups[0]['lr']:.3g}, ess {optimizer.param_groups[0]['ess']:.3g}, "
                            f"hess_init {config.posterior.ivon.hess_init:.3g})")
                ivon_phase = state.get("ivon_start_epoch") is not None
                if _swag_should_start(state, config):
                    swag = _start_swag(model, optimizer, state, config)
                    bar.say(f"member {member}: SWAG collection starts at epoch {epoch} "
                            f"(lr {state['swag_lr']:.3g}, rank {swag.rank})")
                train_loss, n_batches = 0.0, 0
                steps_per_epoch = max(1, math.ceil(len(data.train) / training.batch_size))
                follows_budget = isinstance(scheduler, CosineToBudget) and swag is None and not ivon_phase
                for batch in iterate_batches(
                    data.train, training.batch_size, shuffle=True, seed=seed, epoch=epoch, dtype=config.torch_dtype
                ):
                    if follows_budget:
                        scheduler.at(epoch + n_batches / steps_per_epoch, time.time() - started)
                    hint = "posterior.ivon.lr or raise posterior.ivon.hess_init" if ivon_phase else "training.lr"
                    try:
                        if ivon_phase:
                            loss = ivon_training_step(model, optimizer, batch, loss_fn, config)
                        else:
                            optimizer.zero_grad(set_to_none=True)
                            pred = model(batch)
                            loss = loss_fn(pred, batch, config.loss.energy_weight, config.loss.force_weight)
                    except torch.linalg.LinAlgError as error:  # the force covariance lost positive definiteness
                        raise FloatingPointError(
                            f"member {member}, epoch {epoch}: {error}; lower {hint} or use loss.mse_warmup_epochs"
                        ) from error
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"member {member}, epoch {epoch}: training loss became {float(loss)}; "
                            f"lower {hint} or use loss.mse_warmup_epochs"
                        )
                    if not ivon_phase:
                        loss.backward()
                        if training.grad_clip > 0:
                            torch.nn.utils.clip_grad_norm_(model.parameters(), training.grad_clip)
                        optimizer.step()
                    if ema is not None:
                        ema.update_parameters(model)
                    if swag is not None:
                        state["swag_steps"] += 1
                        every = config.posterior.swag.collect_every
                        if every is not None and state["swag_steps"] % every == 0:
                            swag.collect(parameters_to_vector(model.parameters()))
                    train_loss += float(loss.detach())
                    n_batches += 1
                if swag is not None:
                    if config.posterior.swag.collect_every is None:
                        swag.collect(parameters_to_vector(model.parameters()))
                    state["swag"] = swag.state_dict()
                    # monitor the SWA mean; the learning rate stays constant and nothing stops early
                    valid = evaluate_loss(model_with_weights(model, swag.mean), data.valid, config, loss_kind)
                else:
                    evaluated = ema.module if ema is not None else model
                    valid = evaluate_loss(evaluated, data.valid, config, loss_kind)
                    scheduler.step(valid["loss"])
                    improved = valid["loss"] < state["best_loss"]
                    if improved:
                        state["best_loss"] = valid["loss"]
                        state["best_epoch"] = epoch + 1
                        state["best_state"] = {k: v.detach().clone() for k, v in evaluated.state_dict().items()}
                        if ivon_phase:
                            state["best_ivon_hess"] = [group["hess"].clone() for group in optimizer.param_groups]
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
                if kind == "ivon":
                    entry["optimizer"] = "ivon" if ivon_phase else training.optimizer
                if swag is not None:
                    entry["swag_snapshots"] = swag.count
                state["history"].append(entry)
                save_checkpoint(checkpoint_path, config, model, ema, optimizer,
                                "ivon" if ivon_phase else training.optimizer, scheduler, state)
                write_history(state["history"], member_dir / METRICS_LOG)
                bar.update(entry)
                if _finished(state, config):
                    break
            bar.say(f"member {member}: {_stop_reason(state, config)}")
        finally:
            bar.close()
    return checkpoint_path
