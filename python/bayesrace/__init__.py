"""bayesrace: Bayesian E(3)-equivariant RACE interatomic potentials with calibrated uncertainty.

The public API is re-exported here; modules with a leading underscore are private.
"""

__version__ = "0.1.0"

from . import keys
from ._config import Config, ConfigError, load_config
from ._data import DataError, Frame, TypeMap, collate, frames_to_graphs, neighbour_list, read_frames
from ._losses import LOSSES, loss_function
from ._model import PRESETS, RACE, ModelConfig, build_model, model_config_from
from ._posterior import Posterior, aggregate_members, load_posterior, save_posterior

__all__ = [
    "keys",
    "Config",
    "ConfigError",
    "load_config",
    "DataError",
    "Frame",
    "TypeMap",
    "collate",
    "frames_to_graphs",
    "neighbour_list",
    "read_frames",
    "LOSSES",
    "loss_function",
    "PRESETS",
    "RACE",
    "ModelConfig",
    "build_model",
    "model_config_from",
    "Posterior",
    "aggregate_members",
    "load_posterior",
    "save_posterior",
]
