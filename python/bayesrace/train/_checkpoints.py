"""Member checkpoints and training histories: what a checkpoint holds, when one may be
resumed under a config, and writing both atomically (``bayesrace._files``) after every
epoch, so a killed run loses at most the epoch under way."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import torch

from .._files import atomic_path, write_text_atomic
from ._config import Config, config_to_dict

CHECKPOINT = "checkpoint.pt"
METRICS_LOG = "metrics.jsonl"
# config entries that may change between a run and its resumption
_RESUMABLE_CHANGES = ("max_epochs", "max_minutes", "early_stopping_patience", "threads")
# posterior kinds whose training is that of an ensemble member (their checkpoints are interchangeable)
_TRAINED_LIKE_ENSEMBLE = ("ensemble", "mve", "laplace")


def comparable_config(config: Config) -> Dict:
    """The config entries a checkpoint must agree with (those that shape the training)."""
    values = config_to_dict(config)
    for name in _RESUMABLE_CHANGES:
        values["training"].pop(name, None)
    for name in ("init_from", "init_shrink"):  # checkpoints from before these existed lack them
        if values["training"].get(name) is None:
            values["training"].pop(name, None)
    values.pop("out", None)
    values["ensemble"].pop("members", None)
    posterior = values["posterior"]
    # drawing samples and the Laplace fit come after training
    posterior.pop("samples", None)
    posterior.pop("laplace", None)
    if posterior.get("shallow") is not None:  # a head's epochs change like max_epochs
        posterior["shallow"].pop("head_epochs", None)
    if posterior["kind"] in _TRAINED_LIKE_ENSEMBLE:
        posterior["kind"] = "ensemble"
    return values


def same_training(saved: Dict, current: Dict) -> bool:
    if "posterior" not in saved and current["posterior"] == {"kind": "ensemble", "swag": None, "ivon": None}:
        # written before posterior kinds existed: an ensemble member
        current = {k: v for k, v in current.items() if k != "posterior"}
    return saved == current


def save_checkpoint(path: Path, config: Config, model, ema, optimizer, optimizer_kind: str, scheduler,
                    state: Dict) -> None:
    """Everything a resumed run needs (model, EMA, optimiser, scheduler, the training state
    with its history and SWAG moments, torch's RNG state), written atomically."""
    checkpoint = dict(
        config=comparable_config(config),
        model=model.state_dict(),
        ema=ema.state_dict() if ema is not None else None,
        optimizer=optimizer.state_dict(),
        optimizer_kind=optimizer_kind,
        ivon_step=getattr(optimizer, "current_step", None),
        scheduler=scheduler.state_dict(),
        state=state,
        rng_state=torch.get_rng_state(),
    )
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def read_checkpoint(path: Path) -> Dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def load_member_checkpoint(config: Config, member: int) -> Dict:
    """The checkpoint of a member that must have been trained."""
    path = Path(config.out) / f"member_{member}" / CHECKPOINT
    if not path.is_file():
        raise RuntimeError(f"{path}: no checkpoint (member {member} was not trained)")
    return read_checkpoint(path)


def checkpoint_optimizer_kind(checkpoint: Dict) -> str:
    """Which optimizer's state a checkpoint holds; those written before ``optimizer_kind``
    existed hold IVON's exactly when they have an IVON step count."""
    if "optimizer_kind" in checkpoint:
        return checkpoint["optimizer_kind"]
    return "ivon" if checkpoint.get("ivon_step") is not None else "adam"


def write_history(history: List[Dict], path: Path) -> None:
    """The training history as JSON lines, one per epoch, rewritten atomically."""
    write_text_atomic(path, "".join(json.dumps(entry) + "\n" for entry in history))
