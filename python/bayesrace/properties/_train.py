"""Training property and multi-state models: losses, one member within a time budget, an
ensemble of members, and saving/loading the result.

Losses (every target's error is divided by its scale from ``TargetStatistics``, so targets in
different units weigh alike):

- ``mse``      Σ_t mean_b[(Δ_t/scale_t)²]; for a state, its energy per atom plus its forces;
- ``nll``      the conventional mean–variance NLL: Gaussian NLL of every scalar target and of
               each state's energy; state forces by MSE;
- ``nll_jef``  ``nll`` plus the forces' Gaussian NLL with each state's per-atom variance (the
               joint energy–force likelihood, per state). For scalar targets alone it is ``nll``.

A member trains by MSE for the first ``mse_fraction`` of its budget (the means settle before
the variances take over), then by the chosen loss; an exponential moving average of the weights
is validated after every epoch and the best one kept.

Posterior kinds: ``ensemble`` (M members from different seeds; M = 1 is a mean–variance model)
and ``swag`` (each member collects SWAG moments of its weights over the last ``swag_fraction`` of
its budget, one snapshot per epoch at constant learning rate, and ``swag_samples`` weight sets
drawn from them become the members; M > 1 is MultiSWAG).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel

from .. import keys
from ..bayes import SwagCollector
from ..model import ModelConfig
from ..train import ema_update
from ._model import PropertyRACE, build_property_model
from ._targets import PropertySet, Target, TargetStatistics, average_neighbours

LOSS_NAMES = ("mse", "nll", "nll_jef")
POSTERIOR_KINDS = ("ensemble", "swag")


@dataclasses.dataclass
class PropertyTraining:
    loss: str = "nll_jef"
    minutes: float = 5.0  # wall-clock budget of one member
    max_epochs: int = 10_000  # the budget is whichever of the two ends first (fractions below apply to it)
    batch_size: int = 16
    lr: float = 5e-3
    ema_decay: float = 0.99
    mse_fraction: float = 0.3  # of the budget trained by MSE before the loss above
    force_weight: float = 10.0  # state forces against state energies
    seed: int = 0
    posterior: str = "ensemble"
    swag_fraction: float = 0.25  # of the budget collecting SWAG snapshots (posterior swag)
    swag_samples: int = 8  # weight sets drawn per member
    swag_rank: int = 10  # deviation columns of the low-rank part

    def validate(self) -> None:
        if self.loss not in LOSS_NAMES:
            raise ValueError(f"loss {self.loss!r}; expected one of {list(LOSS_NAMES)}")
        if not 0.0 <= self.mse_fraction <= 1.0:
            raise ValueError(f"mse_fraction must lie in [0, 1], got {self.mse_fraction}")
        if self.posterior not in POSTERIOR_KINDS:
            raise ValueError(f"posterior {self.posterior!r}; expected one of {list(POSTERIOR_KINDS)}")
        if self.posterior == "swag" and not 0.0 < self.swag_fraction < 1.0 - self.mse_fraction:
            raise ValueError(f"swag_fraction must lie in (0, 1 - mse_fraction), got {self.swag_fraction}")
        if self.minutes <= 0 or self.batch_size < 1:
            raise ValueError("minutes must be positive and batch_size at least 1")


def property_loss(model: PropertyRACE, pred, batch, loss: str, force_weight: float) -> torch.Tensor:
    scale = model.scale.to(batch[keys.POSITIONS].dtype)
    total = torch.zeros((), dtype=scale.dtype)

    def gaussian(error, variance):
        return (error.pow(2) / variance + torch.log(variance)).mean()

    if model.n_scalars:
        error = pred[keys.PROPERTIES] - batch[keys.PROPERTIES]
        loss_scale = model.loss_scale.to(scale.dtype)
        for k in range(model.n_scalars):
            if loss == "mse":
                total = total + (error[:, k] / loss_scale[k]).pow(2).mean()
            else:  # normalised so the NLL is on the same footing as the MSE: log(σ²/scale²)
                variance = pred[keys.PROPERTY_VARIANCE][:, k] / loss_scale[k] ** 2
                total = total + gaussian(error[:, k] / loss_scale[k], variance)
    if model.n_states:
        n_atoms = batch[keys.NUM_ATOMS].to(scale.dtype)
        energy_error = pred[keys.STATE_ENERGIES] - batch[keys.STATE_ENERGIES]
        force_error = pred[keys.STATE_FORCES] - batch[keys.STATE_FORCES]
        for s in range(model.n_states):
            k = model.n_scalars + s
            e, f = energy_error[:, s] / scale[k], force_error[:, s] / scale[k]
            if loss == "mse":
                total = total + (e / n_atoms).pow(2).mean()
            else:
                total = total + gaussian(e, pred[keys.STATE_ENERGY_VARIANCE][:, s] / scale[k] ** 2)
            if loss == "nll_jef":
                variance = (pred[keys.STATE_FORCE_VARIANCE][:, s] / scale[k] ** 2)[:, None]
                total = total + force_weight * gaussian(f, variance.expand_as(f))
            else:
                total = total + force_weight * f.pow(2).mean()
    return total


def _batches(data: PropertySet, batch_size: int, rng: Optional[np.random.Generator], dtype):
    order = rng.permutation(len(data)) if rng is not None else np.arange(len(data))
    for start in range(0, len(order), batch_size):
        yield data.batch(order[start : start + batch_size], dtype=dtype)


def validation_error(model: torch.nn.Module, data: PropertySet, batch_size: int = 64) -> float:
    """Σ_t mean squared normalised error on ``data`` (what picks the kept weights)."""
    core = model.module if isinstance(model, AveragedModel) else model
    was_training = core.training
    core.eval()
    total, count = 0.0, 0
    for batch in _batches(data, batch_size, None, core.scale.dtype):
        pred = core(batch, compute_forces=core.n_states > 0)
        total += float(property_loss(core, pred, batch, "mse", 1.0).detach()) * batch[keys.NUM_ATOMS].shape[0]
        count += batch[keys.NUM_ATOMS].shape[0]
    core.train(was_training)
    return total / max(count, 1)


def train_member(model: PropertyRACE, train: PropertySet, valid: PropertySet, settings: PropertyTraining,
                 progress: bool = True, label: str = "member") -> Dict[str, object]:
    """Trains ``model`` in place within ``settings.minutes``; returns its history. The model
    ends holding the best validated EMA weights."""
    settings.validate()
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=10)
    ema = AveragedModel(model, avg_fn=ema_update(settings.ema_decay), use_buffers=True)
    rng = np.random.default_rng(settings.seed)
    budget = settings.minutes * 60.0
    start = time.perf_counter()
    best = (math.inf, copy.deepcopy(model.state_dict()), -1)
    phase = "mse" if settings.mse_fraction > 0 else settings.loss
    history: List[Dict[str, float]] = []
    swag = SwagCollector(sum(p.numel() for p in model.parameters()), settings.swag_rank) \
        if settings.posterior == "swag" else None
    model.train()
    for epoch in range(settings.max_epochs):
        # how far through the budget: time or epochs, whichever binds first
        progress_made = max((time.perf_counter() - start) / budget, epoch / settings.max_epochs)
        if progress_made >= 1.0:
            break
        collecting = swag is not None and progress_made >= 1.0 - settings.swag_fraction
        loss_name = "mse" if progress_made < settings.mse_fraction else settings.loss
        losses = []
        for batch in _batches(train, settings.batch_size, rng, model.scale.dtype):
            optimizer.zero_grad(set_to_none=True)
            loss = property_loss(model, model(batch), batch, loss_name, settings.force_weight)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
            ema.update_parameters(model)
            losses.append(float(loss.detach()))
        error = validation_error(ema, valid)
        if collecting:  # SWAG samples around the iterates of a constant learning rate
            swag.collect(torch.nn.utils.parameters_to_vector(model.parameters()))
        elif loss_name == settings.loss:
            scheduler.step(error)
        if loss_name != phase:  # the kept weights come from the last phase: trained variance heads
            phase, best = loss_name, (math.inf, None, -1)
        if error < best[0]:
            best = (error, copy.deepcopy(ema.module.state_dict()), epoch)
        history.append({"epoch": epoch, "loss": loss_name, "train": float(np.mean(losses)), "valid": error,
                        "minutes": (time.perf_counter() - start) / 60.0, "lr": optimizer.param_groups[0]["lr"]})
        if progress:
            print(f"{label}: epoch {epoch} ({loss_name}) train {np.mean(losses):.4g} valid {error:.4g} "
                  f"[{history[-1]['minutes']:.1f}/{settings.minutes:g} min]", file=sys.stderr, flush=True)
    model.load_state_dict(best[1])
    model.eval()
    record = {"history": history, "best_epoch": best[2], "best_valid": best[0], "epochs": len(history)}
    if swag is not None:
        record["swag"] = swag
        record["swag_snapshots"] = swag.count
    return record


def swag_members(model: PropertyRACE, swag, n_samples: int, seed: int) -> List[PropertyRACE]:
    """``n_samples`` copies of ``model`` with weights drawn from its SWAG moments."""
    if swag.count < 2:
        raise RuntimeError(f"SWAG collected {swag.count} snapshot(s); give the member more minutes or a larger "
                           "swag_fraction (at least two epochs must fall in the SWAG phase)")
    generator = torch.Generator().manual_seed(seed)
    members = []
    for _ in range(n_samples):
        member = copy.deepcopy(model)
        torch.nn.utils.vector_to_parameters(swag.sample(generator).to(model.scale.dtype), member.parameters())
        members.append(member.eval())
    return members


def train_property_ensemble(config: ModelConfig, type_names: Sequence[str], targets: Sequence[Target],
                            train: PropertySet, valid: PropertySet, settings: PropertyTraining,
                            n_members: int = 4, progress: bool = True) -> "PropertyEnsemble":
    """``n_members`` members from different seeds (a deep ensemble; one member: a mean–variance
    model); with ``settings.posterior == "swag"``, ``swag_samples`` weight sets of each."""
    from ._predict import PropertyEnsemble

    config = dataclasses.replace(config)
    if config.avg_num_neighbors <= 0:
        config.avg_num_neighbors = average_neighbours(train.graphs)
    statistics = TargetStatistics.measure(train, targets, len(type_names))
    members, records = [], []
    for m in range(n_members):
        model = build_property_model(config, type_names, targets, statistics, seed=settings.seed + m)
        member_settings = dataclasses.replace(settings, seed=settings.seed + m)
        record = train_member(model, train, valid, member_settings, progress, label=f"member {m}")
        if settings.posterior == "swag":
            members += swag_members(model, record.pop("swag"), settings.swag_samples, settings.seed + m)
        else:
            members.append(model)
        records.append(record)
    return PropertyEnsemble(members, records=records)
