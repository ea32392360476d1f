"""The posterior kinds' members, drawn from the trained checkpoints.

Posterior kinds (config ``posterior.kind``); each ends as M weight sets, the members of
one ``posterior.pt``, so evaluation, the ASE calculator and the LAMMPS deployable treat
them alike:

- ``ensemble``: ``ensemble.members`` independently initialised members.
- ``mve``: one member (mean–variance estimator: the NLL_JEF heads only).
- ``swag``: one member trained on; from ``swag.start_epoch`` at a constant learning rate
  the raw weights are collected into SWAG moments (``bayes.SwagCollector``) and
  ``posterior.samples`` weight sets are drawn from them.
- ``ivon``: one member trained like an MVE member (Adam/AdamW, EMA) until
  ``ivon.start_epoch``; then its best validated (EMA) weights become the mean of the IVON
  optimizer (a diagonal Gaussian over the weights), which trains on without EMA, validated
  on its mean; ``posterior.samples`` weight sets are drawn from the Gaussian of the best
  IVON epoch.
- ``laplace``: one MVE member, then a last-layer Laplace approximation
  (``bayes.fit_laplace_members``) and ``posterior.samples`` antithetic samples.
- ``shallow``: member 0 trained whole, then ``posterior.shallow.heads`` − 1 readout sets
  trained on its frozen trunk (``_shallow``); the members are the trunk with each head.

How the members train is ``_loop``'s; the Gaussians drawn from are ``bayes``'s.
"""

from __future__ import annotations

import copy
import sys
from typing import Dict, List, Tuple

import numpy as np
import torch

from ..bayes import SwagCollector, fit_laplace_members
from ..model import RACE
from ._checkpoints import load_member_checkpoint
from ._config import Config
from ._data import TrainingData
from ._losses import TRAINED_HEADS
from ._members import member_seed, model_with_weights, new_member_model
from ._optim import make_ivon_optimizer
from ._shallow import head_config, shallow_summary, share_trunk


def best_member_model(config: Config, data: TrainingData, member: int) -> RACE:
    """The member's best validated weights (EMA, or IVON's mean), in eval mode."""
    checkpoint = load_member_checkpoint(config, member)
    model = new_member_model(config, data, member)
    best = checkpoint["state"]["best_state"]
    if best is None:
        raise RuntimeError(f"member {member} has no validated weights yet (no epoch finished)")
    model.load_state_dict(best)
    model.set_trained_heads(TRAINED_HEADS[config.loss.kind])
    return model.eval()


def swag_members(config: Config, data: TrainingData, member: int = 0) -> Tuple[List[RACE], Dict]:
    """posterior.samples weight sets drawn from the SWAG moments in the member's checkpoint
    (seeded by the member's seed)."""
    state = load_member_checkpoint(config, member)["state"]
    if state.get("swag") is None or state["swag"]["count"] == 0:
        raise RuntimeError(
            f"member {member}: SWAG collected no snapshots (training ended at epoch {state['epoch']} before "
            f"posterior.swag.start_epoch {config.posterior.swag.start_epoch}); give it more epochs or time"
        )
    swag = SwagCollector.from_state_dict(state["swag"])
    model = new_member_model(config, data, member)
    model.set_trained_heads(TRAINED_HEADS[config.loss.kind])
    generator = torch.Generator().manual_seed(member_seed(config, member))
    members = [model_with_weights(model, swag.sample(generator)).eval() for _ in range(config.posterior.samples)]
    summary = dict(snapshots=swag.count, rank=int(swag.deviations.shape[0]), start_epoch=state["swag_start_epoch"],
                   lr=state["swag_lr"], steps=state["swag_steps"])
    return members, summary


def ivon_members(config: Config, data: TrainingData, member: int = 0) -> Tuple[List[RACE], Dict]:
    """posterior.samples weight sets from IVON's Gaussian N(m, 1/(ess·(h + δ))) at the best
    validated epoch (mean m, Hessian h of that epoch; δ = weight_decay), seeded by the member's seed."""
    state = load_member_checkpoint(config, member)["state"]
    if state.get("best_ivon_hess") is None:
        raise RuntimeError(
            f"member {member}: IVON never trained (training ended at epoch {state['epoch']} before "
            f"posterior.ivon.start_epoch {config.posterior.ivon.resolved_start_epoch(config.training.max_epochs)}); "
            "give it more epochs or time"
        )
    model = best_member_model(config, data, member)
    optimizer = make_ivon_optimizer(config, model, data)
    for group, hess in zip(optimizer.param_groups, state["best_ivon_hess"]):
        group["hess"] = hess.clone()
    members = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(member_seed(config, member))
        for _ in range(config.posterior.samples):
            with optimizer.sampled_params():
                members.append(copy.deepcopy(model).eval())
    group = optimizer.param_groups[0]
    hess = torch.cat([h.reshape(-1) for h in state["best_ivon_hess"]])
    weight_std = 1.0 / torch.sqrt(group["ess"] * (hess + group["weight_decay"]))
    summary = dict(ess=float(group["ess"]), start_epoch=state.get("ivon_start_epoch", 0),
                   best_epoch_loss=float(state["best_loss"]),
                   mean_weight_std=float(weight_std.mean()), max_weight_std=float(weight_std.max()))
    return members, summary


def laplace_members(config: Config, data: TrainingData, member: int = 0, progress: bool = False
                    ) -> Tuple[List[RACE], Dict]:
    """A last-layer Laplace approximation around the trained member and its antithetic samples."""
    settings = config.posterior.laplace
    model = best_member_model(config, data, member)
    graphs = data.train
    if settings.max_structures is not None and settings.max_structures < len(graphs):
        chosen = np.random.default_rng(config.seed).permutation(len(graphs))[: settings.max_structures]
        graphs = [graphs[k] for k in sorted(chosen)]
    members, laplace = fit_laplace_members(
        model, graphs, config.posterior.samples, member_seed(config, member), batch_size=settings.batch_size,
        prior_precision=settings.prior_precision, progress=progress,
    )
    return members, laplace.summary()


def posterior_members(config: Config, data: TrainingData, progress: bool = False) -> Tuple[List[RACE], Dict]:
    """The members of the configured posterior kind from the trained checkpoints, and the
    extra fields of its record (a summary under the kind's name for swag, ivon, laplace, shallow)."""
    kind = config.posterior.kind
    if kind == "ensemble":
        return [best_member_model(config, data, m) for m in range(config.n_members)], {}
    if kind == "mve":
        return [best_member_model(config, data, 0)], {}
    if kind == "shallow":
        heads = head_config(config)
        members = [best_member_model(config if m == 0 else heads, data, m) for m in range(config.n_members)]
        return share_trunk(members), {kind: shallow_summary(config)}
    draw = dict(swag=swag_members, ivon=ivon_members)
    if kind in draw:
        members, summary = draw[kind](config, data)
    else:
        members, summary = laplace_members(config, data, progress=progress)
    if progress:
        print(f"bayesrace train: drew {len(members)} weight sets from the {kind} posterior", file=sys.stderr,
              flush=True)
    return members, {kind: summary}

