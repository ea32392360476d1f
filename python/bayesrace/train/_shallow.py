"""Posterior kind ``shallow``: one network's trunk shared by M readout sets (heads).

Member 0 trains like an ensemble member (trunk and readouts together). Each further member
m = 1 .. M−1 is a head: member 0's best weights with the readouts (every layer's ``Readout``)
replaced by a fresh initialisation seeded by m, trained by the configured loss on the frozen
trunk for ``posterior.shallow.head_epochs`` epochs. The heads differ only through their
initialisation and batch order, so their spread is what a readout ensemble learns on one
representation — cheaper to train than M networks (the trunk's parameters get no updates),
but it cannot disagree about features the trunk does not separate. The posterior's members
are M full RACE models whose trunks are copied exactly from member 0.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List

import torch

from ..model import RACE
from ._checkpoints import load_member_checkpoint
from ._config import Config

READOUT_PREFIX = "readouts."
OFFSET = "head_log_variance_offset"


def is_shallow_head(config: Config, member: int) -> bool:
    return config.posterior.kind == "shallow" and member > 0


def _is_head_entry(name: str) -> bool:
    """Whether a state-dict entry or parameter belongs to a head (not to the shared trunk)."""
    return name.startswith(READOUT_PREFIX) or name == OFFSET


def head_config(config: Config) -> Config:
    """The config a head trains under: ``head_epochs`` epochs (a quarter of ``max_minutes`` when
    set), and an MSE warm-up of a quarter of them (at least one) so that the fresh readouts reach
    the residuals' level before the NLL starts (``fit_head_offsets`` runs at that switch)."""
    epochs = config.posterior.shallow.resolved_head_epochs(config.training.max_epochs)
    minutes = config.training.max_minutes
    training = dataclasses.replace(config.training, max_epochs=epochs,
                                   max_minutes=None if minutes is None else minutes / 4.0)
    warmup = max(1, epochs // 4) if config.loss.kind != "mse" and epochs > 1 else 0
    loss = dataclasses.replace(config.loss, mse_warmup_epochs=warmup)
    return dataclasses.replace(config, training=training, loss=loss)


def trunk_state(config: Config) -> Dict[str, torch.Tensor]:
    """Member 0's best validated weights and buffers outside its readouts (its variance offsets
    included: a head starts from them)."""
    best = load_member_checkpoint(config, 0)["state"]["best_state"]
    if best is None:
        raise RuntimeError("posterior kind shallow: member 0 (the trunk) has no validated weights yet")
    return {name: value for name, value in best.items() if not name.startswith(READOUT_PREFIX)}


def start_head(model: RACE, config: Config) -> RACE:
    """``model`` (a fresh seeded initialisation) with member 0's trunk and variance offsets."""
    state = trunk_state(config)
    missing = [name for name in model.state_dict() if not _is_head_entry(name) and name not in state]
    if missing:
        raise RuntimeError(f"posterior kind shallow: member 0's checkpoint lacks {missing[:3]}")
    full = model.state_dict()
    full.update(state)
    model.load_state_dict(full)
    return model


def freeze_trunk(model: RACE) -> None:
    """Only the readouts and the variance offsets train (``make_optimizer`` takes those)."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(_is_head_entry(name))


def share_trunk(members: List[RACE]) -> List[RACE]:
    """Copy member 0's trunk into every head exactly (an EMA of frozen weights may differ from
    them by round-off), so the members differ in their readouts only."""
    trunk = {name: value for name, value in members[0].state_dict().items() if not _is_head_entry(name)}
    for member in members[1:]:
        # a whole state dict: RACE loads a state without variance offsets as offsets 0 (old files)
        state = member.state_dict()
        state.update(trunk)
        member.load_state_dict(state)
    return members


def shallow_summary(config: Config) -> Dict[str, object]:
    """The posterior record's ``shallow`` entry: what was trained and how long."""
    histories = [load_member_checkpoint(config, m)["state"]["history"] for m in range(config.n_members)]
    return dict(heads=config.n_members,
                head_epochs=config.posterior.shallow.resolved_head_epochs(config.training.max_epochs),
                trunk_epochs=len(histories[0]),
                train_seconds=[float(h[-1]["elapsed_s"]) if h else 0.0 for h in histories])
