"""Property and multi-state RACE models: molecular properties (QM9) and several electronic
states with forces (multi-state PSB3), trained as ensembles of mean–variance members.

Public API: ``Target`` / ``state_targets`` (what to predict), ``read_property_set`` (labelled
files), ``PropertyTraining`` / ``train_property_ensemble`` (training), ``PropertyEnsemble``
(prediction, save/load), ``evaluate`` (per-target errors and uncertainty metrics),
``StateCalculator`` (ASE, one state at a time).
"""

from ._calculator import StateCalculator
from ._model import PropertyRACE, build_property_model
from ._predict import PropertyEnsemble, evaluate, target_metrics
from ._targets import (
    POOLINGS,
    PropertySet,
    Target,
    TargetStatistics,
    read_property_set,
    state_targets,
    type_map_of,
)
from ._train import LOSS_NAMES, POSTERIOR_KINDS, PropertyTraining, train_member, train_property_ensemble

__all__ = [
    "LOSS_NAMES",
    "POOLINGS",
    "POSTERIOR_KINDS",
    "PropertyEnsemble",
    "PropertyRACE",
    "PropertySet",
    "PropertyTraining",
    "StateCalculator",
    "Target",
    "TargetStatistics",
    "build_property_model",
    "evaluate",
    "read_property_set",
    "state_targets",
    "target_metrics",
    "train_member",
    "train_property_ensemble",
    "type_map_of",
]
