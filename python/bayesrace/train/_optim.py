"""The optimisers of a member and their schedules: Adam/AdamW with an exponential moving
average (EMA) of the weights, IVON (a diagonal Gaussian over the weights, posterior kind
ivon) and its training step, and the learning-rate schedules they use (ReduceLROnPlateau,
or a cosine decay at the end of the training budget)."""

from __future__ import annotations

import math
from typing import Dict, List

import torch

from ..data import Graph
from ..model import RACE
from ._config import Config
from ._data import TrainingData


def ema_update(decay: float):
    """EMA whose decay warms up as min(decay, (1+n)/(10+n)) over the first updates, so the
    average is not dominated by the random initial weights in short runs."""

    def update(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        # constants (index buffers, the model's derived coefficients, and frozen weights, down to
        # single elements) stay exactly as they are: rate·a + (1 − rate)·a is not always a in
        # floating point, and truncates integers
        if not averaged.is_floating_point() or torch.equal(averaged, current):
            return averaged
        n = float(num_averaged)
        rate = min(decay, (1.0 + n) / (10.0 + n))
        return torch.where(averaged == current, averaged, rate * averaged + (1.0 - rate) * current)

    return update


def make_optimizer(config: Config, model: RACE) -> torch.optim.Optimizer:
    """The member's Adam/AdamW (also the warm start of posterior kind ivon)."""
    training = config.training
    optimizer_cls = torch.optim.AdamW if training.optimizer == "adamw" else torch.optim.Adam
    # a frozen parameter (a shallow head's trunk) is not the optimizer's
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    return optimizer_cls(trainable, lr=training.lr, weight_decay=training.weight_decay)


def default_ivon_ess(graphs: List[Graph]) -> float:
    """Half the number of training atoms: the force term of the NLL losses is twice the mean
    per-atom force NLL, so the data's total force NLL is (N_atoms/2)·loss, and IVON's
    posterior exp(−ess·loss) is the Bayesian one with ess = N_atoms/2."""
    return 0.5 * sum(len(graph.species) for graph in graphs)


def make_ivon_optimizer(config: Config, model: RACE, data: TrainingData):
    import ivon as ivon_package

    settings = config.posterior.ivon
    return ivon_package.IVON(
        model.parameters(),
        lr=settings.lr,
        ess=float(settings.ess if settings.ess is not None else default_ivon_ess(data.train)),
        hess_init=settings.hess_init,
        beta1=settings.beta1,
        beta2=settings.beta2,
        weight_decay=settings.weight_decay,
        mc_samples=settings.train_samples,
        clip_radius=settings.clip_radius if settings.clip_radius is not None else math.inf,
    )


def budget_fraction(training, epochs: float, elapsed_s: float) -> float:
    """The fraction of a member's budget used: the larger of epochs/max_epochs and
    elapsed/max_minutes (``training`` is the config's training section), in [0, 1]."""
    used = epochs / training.max_epochs
    if training.max_minutes is not None:
        used = max(used, elapsed_s / (60.0 * training.max_minutes))
    return min(max(used, 0.0), 1.0)


class CosineToBudget:
    """lr constant at ``training.lr``, then min_lr + (lr − min_lr)·(1 + cos πg)/2 over the last
    ``decay_fraction`` of the budget (g runs 0 → 1 there), where the fraction f of the budget
    used is the larger of epochs/max_epochs and elapsed/max_minutes. Under a wall-clock budget
    the plateau schedule never decays while the EMA-validated loss keeps falling (acac, 40 min:
    152 epochs at the initial lr): the weights then end at the noise level of that lr. ``at`` is
    called before every step; f comes from the training state, so a resumed run continues on the
    same curve and the schedule itself holds nothing."""

    def __init__(self, optimizer, config: Config):
        self.optimizer = optimizer
        self.training = config.training

    def at(self, epochs: float, elapsed_s: float) -> None:
        training = self.training
        start = 1.0 - training.decay_fraction
        decayed = max(0.0, budget_fraction(training, epochs, elapsed_s) - start) / training.decay_fraction
        lr = training.min_lr + 0.5 * (training.lr - training.min_lr) * (1.0 + math.cos(math.pi * decayed))
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self, valid_loss=None) -> None:  # the plateau schedule's interface: nothing to do
        pass

    def state_dict(self) -> Dict:
        return {}

    def load_state_dict(self, state: Dict) -> None:
        pass


def make_scheduler(config: Config, optimizer):
    """The Adam phase's schedule (``training.schedule``); IVON's phase always uses the plateau."""
    training = config.training
    if training.schedule == "cosine" and not hasattr(optimizer, "sampled_params"):
        return CosineToBudget(optimizer, config)
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=training.lr_factor, patience=training.lr_patience, min_lr=training.min_lr
    )


def ivon_training_step(model: RACE, optimizer, batch: Dict, loss_fn, config: Config) -> torch.Tensor:
    """One IVON step: the gradient averaged over ``train_samples`` weight samples."""
    losses = []
    for _ in range(config.posterior.ivon.train_samples):
        with optimizer.sampled_params(train=True):
            optimizer.zero_grad(set_to_none=False)
            pred = model(batch)
            loss = loss_fn(pred, batch, config.loss.energy_weight, config.loss.force_weight)
            if torch.isfinite(loss):
                loss.backward()
            for parameter in model.parameters():  # IVON reads every parameter's gradient
                if parameter.grad is None:
                    parameter.grad = torch.zeros_like(parameter)
        losses.append(loss.detach())
    mean_loss = torch.stack(losses).mean()
    if torch.isfinite(mean_loss):  # otherwise the caller stops with an error
        optimizer.step()
    return mean_loss
