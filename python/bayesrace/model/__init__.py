"""The RACE model: layers, per-layer readouts and the uncertainty heads."""

from ._race import (
    COVARIANCE_KINDS,
    PRESETS,
    RACE,
    ModelConfig,
    build_model,
    model_config_from,
)

__all__ = [
    "COVARIANCE_KINDS",
    "ModelConfig",
    "PRESETS",
    "RACE",
    "build_model",
    "model_config_from",
]
