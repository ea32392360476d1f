"""The RACE model: layers, per-layer readouts and the uncertainty heads."""

from ._race import (
    COVARIANCE_KINDS,
    PRESETS,
    RACE,
    ModelConfig,
    add_trunk,
    build_model,
    model_config_from,
    model_config_from_record,
)
from ._radial import isolation_gate
from ._stacked import StackedRace

__all__ = [
    "COVARIANCE_KINDS",
    "ModelConfig",
    "PRESETS",
    "RACE",
    "StackedRace",
    "add_trunk",
    "build_model",
    "isolation_gate",
    "model_config_from",
    "model_config_from_record",
]
