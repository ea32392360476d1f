"""bayesrace: Bayesian E(3)-equivariant RACE interatomic potentials with calibrated uncertainty.

The public API is re-exported here from private modules, lazily: LAMMPS imports
``bayesrace.lammps_plugin`` on every start (its plugin entry point), which must not pay
for importing torch and e3nn.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "keys": ".keys",
    "Config": "._config",
    "ConfigError": "._config",
    "load_config": "._config",
    "DataError": "._data",
    "Frame": "._data",
    "TypeMap": "._data",
    "collate": "._data",
    "frames_to_graphs": "._data",
    "neighbour_list": "._data",
    "read_frames": "._data",
    "LOSSES": "._losses",
    "loss_function": "._losses",
    "PRESETS": "._model",
    "RACE": "._model",
    "ModelConfig": "._model",
    "build_model": "._model",
    "model_config_from": "._model",
    "Posterior": "._posterior",
    "aggregate_members": "._posterior",
    "load_posterior": "._posterior",
    "save_posterior": "._posterior",
    "BayesRaceCalculator": "._calculator",
    "UNCERTAINTY_RESULTS": "._calculator",
    "evaluate_sets": "._evaluate",
    "train": "._train",
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
