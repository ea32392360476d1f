"""Training: the YAML config, the losses, the loop and checkpoints, every posterior kind."""

from ._config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    load_config,
    load_yaml_config,
)
from ._loop import (
    CHECKPOINT,
    SwagCollector,
    initial_member_model,
    mse_warmup_epochs,
    prepare_data,
    train,
    train_config_file,
    train_under_mpirun,
)
from ._losses import (
    LOSSES,
    loss_function,
)

__all__ = [
    "CHECKPOINT",
    "Config",
    "ConfigError",
    "LOSSES",
    "SwagCollector",
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
