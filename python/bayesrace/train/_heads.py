"""The variance heads' own training: their starting level, and the heads phase of
``loss.means: frozen``.

The readouts have no bias, so a head can only reach the level of the residuals by building
it out of the features, which takes many epochs (on PSB3 the energy log-variance came down
from 0 to about −2.8 in 17 NLL epochs while the errors asked for about −8). Before the NLL
starts, ``fit_head_offsets`` therefore sets the heads' log-variance offsets to the
maximum-likelihood constant factor on the training residuals of the current means.

Under ``loss.means: frozen`` a member first trains by MSE alone. For the last
``loss.heads_fraction`` of its budget (or when its validation loss stagnates) its best (EMA)
weights are frozen except the last linear map of every readout and the offsets, and those
learn the NLL of the frozen means' residuals. The energy column of those maps gets no
gradient (the means are detached in the loss), and a fresh Adam without weight decay moves
no weight whose gradient is always zero, so the means stay exactly the MSE model's.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
from torch.optim.swa_utils import AveragedModel

from .. import keys
from ..data import Graph, iterate_batches
from ..model import RACE
from ._config import Config
from ._losses import force_mahalanobis_and_logdet
from ._optim import budget_fraction, ema_update

OFFSET = "head_log_variance_offset"


def heads_phase_pending(state: Dict, config: Config) -> bool:
    """Whether this member still has a heads phase ahead of it (``loss.means: frozen``)."""
    return config.loss.means == "frozen" and config.loss.kind != "mse" and state.get("heads_start_epoch") is None


def heads_should_start(state: Dict, config: Config) -> bool:
    """At the last ``heads_fraction`` of the budget, when the MSE phase stagnates, and at the
    latest for the last epoch or once the time is used (``_finished`` waits for the phase), so
    a member never ends with untrained heads."""
    if not heads_phase_pending(state, config):
        return False
    training = config.training
    stale = state["stale_epochs"] >= training.early_stopping_patience
    used = budget_fraction(training, state["epoch"], state["elapsed"])
    return stale or used >= 1.0 - config.loss.heads_fraction or state["epoch"] >= training.max_epochs - 1


def head_parameters(model: RACE) -> List[torch.nn.Parameter]:
    """The parameters the heads phase trains: each readout's last linear map and the offsets."""
    return [parameter for name, parameter in model.named_parameters()
            if name == OFFSET or (name.startswith("readouts.") and ".linear_out." in name)]


def freeze_all_but_heads(model: RACE) -> List[torch.nn.Parameter]:
    heads = head_parameters(model)
    trainable = {id(parameter) for parameter in heads}
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in trainable)
    return heads


def make_heads_optimizer(config: Config, model: RACE):
    """A fresh Adam (no weight decay: it would move the frozen energy column) and plateau
    schedule over the head parameters; the rest of the model is frozen."""
    training = config.training
    optimizer = torch.optim.Adam(freeze_all_but_heads(model), lr=training.lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=training.lr_factor, patience=training.lr_patience, min_lr=training.min_lr)
    return optimizer, scheduler


def fit_head_offsets(model: RACE, graphs: List[Graph], config: Config, rounds: int = 2,
                     ema: Optional[AveragedModel] = None) -> Dict[str, float]:
    """Shift the energy and force log-variance offsets by the maximum-likelihood constant
    factors on ``graphs``: c_E = mean_b[ΔE_b²/σ²_E,b] and c_F = mean_i[ΔF_iᵀΣ_i⁻¹ΔF_i]/3.
    The covariance floor and the σ caps make the force factor only nearly exact in one go, so
    it is refitted ``rounds`` times; ``ema``'s copy of the model gets the same offsets. Returns
    the final offsets."""
    was_training = model.training
    model.eval()
    try:
        for _ in range(rounds):
            energy_ratio, n_structures, force_ratio, n_atoms = 0.0, 0, 0.0, 0
            for batch in iterate_batches(graphs, config.training.batch_size, shuffle=False, dtype=config.torch_dtype):
                pred = model(batch)
                with torch.no_grad():
                    energy_error = pred[keys.ENERGY] - batch[keys.ENERGY]
                    energy_ratio += float((energy_error.pow(2) / pred[keys.ENERGY_VARIANCE]).sum())
                    n_structures += int(energy_error.numel())
                    mahalanobis, _ = force_mahalanobis_and_logdet(
                        pred[keys.FORCES] - batch[keys.FORCES], pred[keys.FORCE_COVARIANCE])
                    force_ratio += float(mahalanobis.sum()) / 3.0
                    n_atoms += int(mahalanobis.numel())
            factors = (energy_ratio / max(n_structures, 1), force_ratio / max(n_atoms, 1))
            if not all(math.isfinite(f) and f > 0 for f in factors):
                raise FloatingPointError(f"the heads' residual scale factors are {factors}: the means are not finite")
            with torch.no_grad():
                offset = getattr(model, OFFSET)
                offset += torch.tensor([math.log(f) for f in factors], dtype=offset.dtype)
    finally:
        model.train(was_training)
    offset = getattr(model, OFFSET).detach()
    if ema is not None:
        with torch.no_grad():
            getattr(ema.module, OFFSET).copy_(offset)
    return dict(energy=float(offset[0]), forces=float(offset[1]))


def _distinct(graphs: List[Graph]) -> List[Graph]:
    """``graphs`` without repeated copies (a frame acquired ×k appears k times in training)."""
    seen, distinct = set(), []
    for graph in graphs:
        key = (graph.positions.tobytes(), graph.species.tobytes(), graph.energy)
        if key not in seen:
            seen.add(key)
            distinct.append(graph)
    return distinct


def refit_energy_zero(model: RACE, graphs: List[Graph], config: Config) -> float:
    """Move the model's energy shift (per atom with neighbours: it rides on the isolation gate)
    by the median over the distinct training structures of their energy residual per unit of
    shift, and return the move in eV. Forces see it only through the gate's slope (the gate is
    1 − exp(−κΣb₁), nearly 1 inside a molecule: on PSB3 they move by < 0.4 × the move per Å,
    far below their errors). The readouts have no bias, so the energies' common constant is a
    collective mode of many weights that force gradients drag along; a few frames the model
    cannot fit yet (fresh on-the-fly labels, repeated) then shift every energy. The median puts
    the constant where most distinct structures are."""
    was_training = model.training
    model.eval()
    residuals = []
    try:
        # forces come from autograd inside the forward pass, so no torch.no_grad around it
        for batch in iterate_batches(_distinct(graphs), config.training.batch_size, shuffle=False,
                                     dtype=config.torch_dtype):
            energy = model(batch)[keys.ENERGY].detach()
            with torch.no_grad():
                model.energy_shift += 1.0
            try:
                per_unit_shift = model(batch)[keys.ENERGY].detach() - energy  # Σ_i gate_i
            finally:
                with torch.no_grad():
                    model.energy_shift -= 1.0
            usable = per_unit_shift > 0.5
            residuals.append(((batch[keys.ENERGY] - energy)[usable] / per_unit_shift[usable]).double())
    finally:
        model.train(was_training)
    residual = torch.cat(residuals) if residuals else torch.zeros(0, dtype=torch.float64)
    if residual.numel() == 0:
        return 0.0
    move = float(residual.median())
    if not math.isfinite(move):
        raise FloatingPointError("the energy residuals are not finite: the means are not finite")
    with torch.no_grad():
        model.energy_shift += move
    return move


def start_heads_phase(model: RACE, state: Dict, config: Config, train: List[Graph]):
    """Enter the heads phase: the best validated (EMA) weights of the MSE phase, offsets fitted
    to their training residuals, the rest frozen, a fresh optimizer, schedule and EMA; the
    best-loss and early-stopping clocks restart, so what is kept is an epoch of this phase."""
    if state["best_state"] is not None:
        model.load_state_dict(state["best_state"])
    energy_zero = refit_energy_zero(model, train, config) if config.loss.refit_energy_zero else None
    offsets = fit_head_offsets(model, train, config)
    optimizer, scheduler = make_heads_optimizer(config, model)
    ema: Optional[AveragedModel] = None
    if config.training.ema_decay > 0:
        ema = AveragedModel(model, avg_fn=ema_update(config.training.ema_decay), use_buffers=True)
    state.update(heads_start_epoch=state["epoch"], best_loss=math.inf, stale_epochs=0, head_offsets=offsets,
                 energy_zero_move=energy_zero)
    return optimizer, scheduler, ema
