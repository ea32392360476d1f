"""The model a member trains: its seed, a fresh seeded initialisation or the warm start
named by ``training.init_from`` (checked against this run), and copies with given weights."""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Dict

import torch
from torch.nn.utils import vector_to_parameters

from ..bayes import read_posterior_record
from ..model import RACE, build_model, model_config_from_record
from ._config import Config
from ._data import TrainingData
from ._shallow import is_shallow_head, start_head


def member_seed(config: Config, member: int) -> int:
    """The seed of member ``member``'s initialisation, batch order and posterior samples."""
    return config.seed * 1000 + member


_WARM_START_CACHE: Dict[tuple, Dict] = {}


def _warm_start_record(config: Config, data: TrainingData) -> Dict:
    """The posterior record named by ``training.init_from``, checked against this run: same
    elements (in order) and the same architecture (``avg_num_neighbors`` aside: the record's
    is kept, so a warm-started member computes exactly the function it starts from)."""
    path = config.training.init_from
    try:
        stat = os.stat(path)
        key = (os.path.abspath(path), stat.st_mtime_ns, stat.st_size)
        record = _WARM_START_CACHE.get(key)
        if record is None:
            record = read_posterior_record(path)
            _WARM_START_CACHE.clear()  # one warm start at a time; members share it
            _WARM_START_CACHE[key] = record
    except (FileNotFoundError, ValueError) as error:
        raise RuntimeError(f"training.init_from: {error}") from error
    if list(record["type_names"]) != list(data.type_names):
        raise RuntimeError(
            f"training.init_from {path}: its elements {record['type_names']} differ from the training data's "
            f"{data.type_names}; a warm start needs the same elements"
        )
    wanted = dataclasses.asdict(config.model.model_config())
    saved = dataclasses.asdict(model_config_from_record(record["model_config"]))
    differing = [name for name in wanted if name != "avg_num_neighbors" and wanted[name] != saved[name]]
    if wanted["avg_num_neighbors"] > 0 and wanted["avg_num_neighbors"] != saved["avg_num_neighbors"]:
        differing.append("avg_num_neighbors")
    if differing:
        raise RuntimeError(
            f"training.init_from {path}: its model differs in {', '.join(f'model.{n}' for n in differing)} "
            f"({', '.join(f'{saved[n]!r} there, {wanted[n]!r} here' for n in differing)})"
        )
    return record


def new_member_model(config: Config, data: TrainingData, member: int) -> RACE:
    model_config = config.model.model_config()
    if config.training.init_from:
        # the warm start's normalisation and neighbour count, so its weights mean what they meant
        record = _warm_start_record(config, data)
        model_config.avg_num_neighbors = float(record["model_config"]["avg_num_neighbors"])
        return build_model(
            model_config,
            data.type_names,
            list(record["reference_energies"]),
            float(record["energy_shift"]),
            float(record["energy_scale"]),
            dtype=config.torch_dtype,
            seed=member_seed(config, member),
        )
    if model_config.avg_num_neighbors <= 0:
        model_config.avg_num_neighbors = data.avg_num_neighbors
    return build_model(
        model_config,
        data.type_names,
        data.reference_energies,
        data.energy_shift,
        data.energy_scale,
        dtype=config.torch_dtype,
        seed=member_seed(config, member),
    )


def initial_member_model(config: Config, data: TrainingData, member: int) -> RACE:
    """The model member ``member`` starts training from: a seeded random initialisation, or
    with ``training.init_from`` member ``member mod M`` of that posterior (all its weights and
    buffers, so the same function; with ``training.init_shrink`` λ its parameters become λ ×
    those + (1 − λ) × the seeded initialisation's, buffers kept); a shallow ensemble's head:
    member 0's trunk with its own seeded readouts."""
    model = new_member_model(config, data, member)
    if is_shallow_head(config, member):
        return start_head(model, config)
    if config.training.init_from:
        shrink = config.training.init_shrink
        fresh = [p.detach().clone() for p in model.parameters()] if shrink is not None else []
        states = _warm_start_record(config, data)["members"]
        model.load_state_dict(states[member % len(states)])
        with torch.no_grad():
            for parameter, initial in zip(model.parameters(), fresh):
                parameter.mul_(shrink).add_(initial, alpha=1.0 - shrink)
    return model


def model_with_weights(model: RACE, weights: torch.Tensor) -> RACE:
    """A copy of model whose parameters are the flat vector weights."""
    copied = copy.deepcopy(model)
    with torch.no_grad():
        vector_to_parameters(weights.to(next(copied.parameters()).dtype), copied.parameters())
    return copied
