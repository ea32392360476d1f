"""The RACE model: layers, per-layer readouts and the uncertainty heads."""

from ._race import (
    COVARIANCE_KINDS,
    PRESETS,
    RACE,
    ModelConfig,
    build_model,
    model_config_from,
)
from ._stacked import StackedRace

__all__ = [
    "COVARIANCE_KINDS",
    "ModelConfig",
    "PRESETS",
    "RACE",
    "StackedRace",
    "build_model",
    "model_config_from",
]
