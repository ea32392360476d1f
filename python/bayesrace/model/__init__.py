"""The RACE model: layers, per-layer readouts and the uncertainty heads."""

from ._race import (
    COVARIANCE_KINDS,
    PRESETS,
    RACE,
    BesselBasis,
    ModelConfig,
    RaceLayer,
    Readout,
    build_model,
    model_config_from,
    model_config_from_record,
)
from ._radial import _default_dtype as default_dtype
from ._radial import isolation_gate
from ._stacked import StackedRace

__all__ = [
    "BesselBasis",
    "COVARIANCE_KINDS",
    "ModelConfig",
    "PRESETS",
    "RACE",
    "RaceLayer",
    "Readout",
    "StackedRace",
    "build_model",
    "default_dtype",
    "isolation_gate",
    "model_config_from",
    "model_config_from_record",
]
