"""Training: the YAML config, the data, the losses, the member loop and its checkpoints, and
every posterior kind's members (the posterior math they are drawn with lives in ``bayes``)."""

from ._checkpoints import CHECKPOINT
from ._config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    load_config,
    load_yaml_config,
)
from ._data import TrainingData, prepare_data
from ._loop import mse_warmup_epochs
from ._losses import (
    LOSSES,
    loss_function,
)
from ._members import initial_member_model
from ._optim import ema_update
from ._run import (
    train,
    train_config_file,
    train_under_mpirun,
)

__all__ = [
    "ema_update",
    "CHECKPOINT",
    "LOSSES",
    "Config",
    "ConfigError",
    "TrainingData",
    "config_from_dict",
    "config_to_dict",
    "initial_member_model",
    "load_config",
    "load_yaml_config",
    "loss_function",
    "mse_warmup_epochs",
    "prepare_data",
    "train",
    "train_config_file",
    "train_under_mpirun",
]
