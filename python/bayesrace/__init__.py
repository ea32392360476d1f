"""bayesrace: Bayesian E(3)-equivariant RACE interatomic potentials with calibrated uncertainty.

The public API is re-exported here from private modules, lazily: LAMMPS imports
``bayesrace.lammps_plugin`` on every start (its plugin entry point), which must not pay
for importing torch and e3nn.
"""

from __future__ import annotations

import importlib

from ._version import __version__

_EXPORTS = {
    "keys": ".keys",
    "Config": ".train",
    "ConfigError": ".train",
    "load_config": ".train",
    "train": ".train",
    "LOSSES": ".train",
    "loss_function": ".train",
    "DataError": ".data",
    "Frame": ".data",
    "TypeMap": ".data",
    "collate": ".data",
    "frames_to_graphs": ".data",
    "neighbour_list": ".data",
    "read_frames": ".data",
    "PRESETS": ".model",
    "RACE": ".model",
    "ModelConfig": ".model",
    "build_model": ".model",
    "model_config_from": ".model",
    "Posterior": ".bayes",
    "aggregate_members": ".bayes",
    "load_posterior": ".bayes",
    "save_posterior": ".bayes",
    "BayesRaceCalculator": ".calculator",
    "UNCERTAINTY_RESULTS": ".calculator",
    "evaluate_sets": ".uq",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bayesrace' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name], __name__)
    value = module if name == "keys" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return __all__ + ["__version__"]
