"""The YAML configuration of a training run, validated strictly.

Each section is a dataclass; an unknown or misspelt key is an error that names the
section and lists the valid keys, a value of the wrong type names the key and the type
expected. Paths are resolved relative to the config file.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, Dict, Optional, Union

import yaml

from ._losses import LOSSES
from ..model import PRESETS, ModelConfig


class ConfigError(ValueError):
    pass


@dataclasses.dataclass
class DataSection:
    train: str = ""  # extxyz (or any ASE format) with energies and forces
    valid: Optional[str] = None  # if absent, n_valid frames are split off train
    n_valid: int = 50
    test: Dict[str, str] = dataclasses.field(default_factory=dict)  # name -> file, for evaluate
    energy_key: str = "energy"
    forces_key: str = "forces"
    stress_key: Optional[str] = None
    # "fit": least squares on the training set; "isolated": single-atom frames in
    # isolated_atoms; or a mapping element -> eV
    reference_energies: Union[str, Dict[str, float]] = "fit"
    isolated_atoms: Optional[str] = None
    max_train: Optional[int] = None  # use only the first max_train frames of train


@dataclasses.dataclass
class ModelSection:
    preset: str = "small"
    cutoff: Optional[float] = None
    n_layers: Optional[int] = None
    channels: Optional[int] = None
    l_max: Optional[int] = None
    n_radial: Optional[int] = None
    envelope_p: Optional[int] = None
    radial_hidden: Optional[int] = None
    radial_layers: Optional[int] = None
    readout_hidden: Optional[int] = None
    avg_num_neighbors: Optional[float] = None
    covariance: Optional[str] = None
    covariance_floor: Optional[float] = None

    def model_config(self) -> ModelConfig:
        if self.preset not in PRESETS:
            raise ConfigError(f"model.preset is {self.preset!r}; expected one of {sorted(PRESETS)}")
        overrides = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "preset" and getattr(self, f.name) is not None
        }
        config = ModelConfig(**{**PRESETS[self.preset], **overrides})
        try:
            config.validate()
        except ValueError as error:
            raise ConfigError(str(error)) from error
        return config


@dataclasses.dataclass
class LossSection:
    kind: str = "nll_jef"  # mse | nll | nll_jef | nll_jef_equivariant
    energy_weight: float = 1.0  # λ_E
    force_weight: float = 1.0  # λ_F
    mse_warmup_epochs: int = 0  # train with MSE first: the variance heads start from sane means (none with init_from)


@dataclasses.dataclass
class TrainingSection:
    optimizer: str = "adamw"  # adam | adamw
    lr: float = 5e-3
    weight_decay: float = 0.0
    batch_size: int = 8
    max_epochs: int = 200
    max_minutes: Optional[float] = None  # wall-clock budget per member
    early_stopping_patience: int = 30  # epochs without validation improvement
    lr_factor: float = 0.5  # ReduceLROnPlateau on the validation loss
    lr_patience: int = 8
    min_lr: float = 1e-5
    # exponential moving average of the weights; 0 turns it off. Default 0.99 (for posterior
    # kind ivon it applies to the warm start only: IVON validates its own mean weights)
    ema_decay: Optional[float] = None
    grad_clip: float = 10.0  # max gradient norm; 0 turns clipping off
    threads: int = 1  # torch threads per process (one per MPI rank is fastest)
    # warm start: a posterior.pt whose member m mod M gives member m its initial weights
    # (and normalisation) instead of a random initialisation; only read when the member has
    # no checkpoint yet. Its elements and architecture must match this run's.
    init_from: Optional[str] = None


@dataclasses.dataclass
class EnsembleSection:
    members: Optional[int] = None  # kind ensemble only; default 4


DEFAULT_ENSEMBLE_MEMBERS = 4
DEFAULT_EMA_DECAY = 0.99
POSTERIOR_KINDS = ("ensemble", "mve", "swag", "ivon", "laplace")


@dataclasses.dataclass
class SwagSection:
    """SWAG (Maddox et al. 2019): collect weight snapshots at a constant learning rate."""

    # collection begins at this epoch (or earlier, when early stopping would end training
    # before it); early stopping and the learning-rate schedule are off from then on
    start_epoch: int = 100
    collect_every: Optional[int] = None  # optimizer steps between snapshots; default: once per epoch
    rank: int = 20  # K: the most recent deviation columns kept (low-rank part of the covariance)
    lr: Optional[float] = None  # constant learning rate of the SWAG phase; default: the lr reached


@dataclasses.dataclass
class IvonSection:
    """IVON (Shen et al. 2024), the variational Adam-like optimizer of the ivon-opt package,
    warm-started from an MVE member: epochs before ``start_epoch`` train exactly like kind
    mve (training.optimizer, lr, EMA, ReduceLROnPlateau...); then the best validated (EMA)
    weights become IVON's mean and IVON trains it to training.max_epochs."""

    # IVON takes over at this epoch (or earlier, when early stopping would end the warm
    # start before it). None: at round(2/3·max_epochs), so Adam does the fitting and IVON
    # gets a third of the budget to spread its Gaussian; 0: IVON from the random
    # initialisation, which trains forces far more slowly than Adam (0.94 vs 0.51 eV/Å at
    # 60 epochs on tiny-preset PSB3)
    start_epoch: Optional[int] = None
    # Defaults from warm starts on tiny-preset PSB3 (120 structures, Adam for 40 epochs to a
    # validation force RMSE of 0.191 eV/Å, then 20 IVON epochs). IVON's step is SGD-like,
    # lr·(hess_init+δ)·m/(h+δ), and the NLL gradients at the warm start reach ~5, so lr ≥ 3e-4
    # wrecks the fitted forces (0.65–35 eV/Å, or a broken force covariance); 1e-4 kept 0.190
    lr: float = 1e-4
    # effective sample size; default: half the number of training atoms (the Bayesian value
    # for these losses, see _train.default_ivon_ess), 840 on that set
    ess: Optional[float] = None
    # initial diagonal Hessian; the initial weight noise std is 1/sqrt(ess·(hess_init+δ)).
    # 300 (std ≈ 2e-3): force RMSE 0.190 and epistemic σ 0.008 eV/Å (1000: 0.190 and 0.005);
    # noise of ~1e-2 (hess_init ≤ 10) throws the warm-started NLL far off its minimum in the
    # first IVON epoch (force RMSE 1.3–2.6 eV/Å)
    hess_init: float = 300.0
    # Hessian momentum: 0.999 lets h adapt within a few hundred steps (the package default
    # 0.99999 keeps h ≈ hess_init for a whole short IVON phase)
    beta2: float = 0.999
    beta1: float = 0.9  # gradient momentum
    weight_decay: float = 1e-4  # Gaussian prior precision per unit ess (δ in the paper)
    train_samples: int = 1  # Monte-Carlo weight samples per optimizer step
    clip_radius: Optional[float] = None  # element-wise clip of the update (IVON's own); None: no clipping

    def resolved_start_epoch(self, max_epochs: int) -> int:
        """The epoch at which IVON takes over (start_epoch, or 2/3 of max_epochs)."""
        if self.start_epoch is not None:
            return self.start_epoch
        return max(0, min(int(round(2.0 * max_epochs / 3.0)), max_epochs - 1))


@dataclasses.dataclass
class LaplaceSection:
    """Last-layer Laplace approximation around one trained MVE member."""

    prior_precision: Optional[float] = None  # None: fitted by maximising the marginal likelihood
    max_structures: Optional[int] = None  # use a (seeded) random subset of the training set for the Hessian
    batch_size: int = 8  # structures per batch when accumulating the Hessian


@dataclasses.dataclass
class PosteriorSection:
    """Which approximate posterior training produces; every kind ends as M weight sets."""

    kind: str = "ensemble"  # ensemble | mve | swag | ivon | laplace
    samples: int = 8  # weight sets drawn for swag, ivon and laplace
    swag: Optional[SwagSection] = None  # settings for kind swag only
    ivon: Optional[IvonSection] = None  # settings for kind ivon only
    laplace: Optional[LaplaceSection] = None  # settings for kind laplace only


@dataclasses.dataclass
class Config:
    out: str = "runs/default"  # run directory: checkpoints, logs, posterior.pt
    seed: int = 0
    dtype: str = "float64"  # float64 | float32
    data: DataSection = dataclasses.field(default_factory=DataSection)
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    loss: LossSection = dataclasses.field(default_factory=LossSection)
    training: TrainingSection = dataclasses.field(default_factory=TrainingSection)
    ensemble: EnsembleSection = dataclasses.field(default_factory=EnsembleSection)
    posterior: PosteriorSection = dataclasses.field(default_factory=PosteriorSection)

    @property
    def n_members(self) -> int:
        """Models trained: the ensemble's members, or one for every other posterior kind."""
        return self.ensemble.members if self.posterior.kind == "ensemble" else 1

    def validate(self) -> None:
        """Check every field, then fill in the kind-dependent defaults (idempotent)."""
        self._validate_posterior()
        if self.dtype not in ("float64", "float32"):
            raise ConfigError(f"dtype is {self.dtype!r}; expected 'float64' or 'float32'")
        if self.loss.kind not in LOSSES:
            raise ConfigError(f"loss.kind is {self.loss.kind!r}; expected one of {sorted(LOSSES)}")
        if self.training.optimizer not in ("adam", "adamw"):
            raise ConfigError(f"training.optimizer is {self.training.optimizer!r}; expected 'adam' or 'adamw'")
        if self.training.batch_size < 1:
            raise ConfigError(f"training.batch_size must be >= 1, got {self.training.batch_size}")
        if not self.data.train:
            raise ConfigError("data.train is required: the training file (extxyz or any ASE format)")
        reference = self.data.reference_energies
        if isinstance(reference, str) and reference not in ("fit", "isolated"):
            raise ConfigError(
                f"data.reference_energies is {reference!r}; expected 'fit', 'isolated' or a mapping element -> eV"
            )
        if reference == "isolated" and not self.data.isolated_atoms:
            raise ConfigError("data.reference_energies is 'isolated' but data.isolated_atoms names no file")
        model = self.model.model_config()
        if self.loss.kind == "nll_jef_equivariant" and model.covariance != "equivariant":
            raise ConfigError(
                "loss.kind 'nll_jef_equivariant' needs model.covariance: equivariant "
                f"(it is {model.covariance!r})"
            )

    def _validate_posterior(self) -> None:
        posterior = self.posterior
        kind = posterior.kind
        if kind not in POSTERIOR_KINDS:
            raise ConfigError(f"posterior.kind is {kind!r}; expected one of {list(POSTERIOR_KINDS)}")
        for name in ("swag", "ivon", "laplace"):
            if getattr(posterior, name) is not None and name != kind:
                raise ConfigError(
                    f"posterior.{name} applies only to posterior.kind {name!r}, but kind is {kind!r}; "
                    f"remove the section or set kind: {name}"
                )
        if kind == "ensemble":
            if self.ensemble.members is None:
                self.ensemble.members = DEFAULT_ENSEMBLE_MEMBERS
            if self.ensemble.members < 1:
                raise ConfigError(f"ensemble.members must be >= 1, got {self.ensemble.members}")
        elif self.ensemble.members is not None:
            raise ConfigError(
                f"ensemble.members applies only to posterior.kind 'ensemble', but kind is {kind!r} "
                "(which trains one model); remove it"
            )
        if kind in ("swag", "ivon", "laplace"):
            if posterior.samples < 1:
                raise ConfigError(f"posterior.samples must be >= 1, got {posterior.samples}")
            if kind == "laplace" and posterior.samples % 2:
                raise ConfigError(
                    f"posterior.samples must be even for kind laplace (antithetic pairs), got {posterior.samples}"
                )
        if kind == "swag":
            swag = posterior.swag = posterior.swag or SwagSection()
            if not 0 <= swag.start_epoch < self.training.max_epochs:
                raise ConfigError(
                    f"posterior.swag.start_epoch must lie in [0, training.max_epochs = {self.training.max_epochs}) "
                    f"so that SWAG collects snapshots, got {swag.start_epoch}"
                )
            if swag.rank < 1:
                raise ConfigError(f"posterior.swag.rank must be >= 1, got {swag.rank}")
            if swag.collect_every is not None and swag.collect_every < 1:
                raise ConfigError(f"posterior.swag.collect_every must be >= 1 (steps), got {swag.collect_every}")
            if swag.lr is not None and not swag.lr > 0:
                raise ConfigError(f"posterior.swag.lr must be > 0, got {swag.lr}")
        if kind == "ivon":
            ivon = posterior.ivon = posterior.ivon or IvonSection()
            for name in ("lr", "hess_init", "ess", "clip_radius"):
                value = getattr(ivon, name)
                if value is not None and not value > 0:
                    raise ConfigError(f"posterior.ivon.{name} must be > 0, got {value}")
            for name in ("beta1", "beta2"):
                if not 0.0 <= getattr(ivon, name) <= 1.0:
                    raise ConfigError(f"posterior.ivon.{name} must lie in [0, 1], got {getattr(ivon, name)}")
            if ivon.weight_decay < 0:
                raise ConfigError(f"posterior.ivon.weight_decay must be >= 0, got {ivon.weight_decay}")
            if ivon.train_samples < 1:
                raise ConfigError(f"posterior.ivon.train_samples must be >= 1, got {ivon.train_samples}")
            # start_epoch stays None when unset: resolved against max_epochs at training time,
            # so a resumed run may be given more epochs (max_epochs is a resumable change)
            if ivon.start_epoch is not None and not 0 <= ivon.start_epoch < self.training.max_epochs:
                raise ConfigError(
                    f"posterior.ivon.start_epoch must lie in [0, training.max_epochs = {self.training.max_epochs}) "
                    f"so that IVON trains at least one epoch, got {ivon.start_epoch}"
                )
        if kind == "laplace":
            laplace = posterior.laplace = posterior.laplace or LaplaceSection()
            if laplace.prior_precision is not None and not laplace.prior_precision > 0:
                raise ConfigError(f"posterior.laplace.prior_precision must be > 0, got {laplace.prior_precision}")
            if laplace.max_structures is not None and laplace.max_structures < 1:
                raise ConfigError(f"posterior.laplace.max_structures must be >= 1, got {laplace.max_structures}")
            if laplace.batch_size < 1:
                raise ConfigError(f"posterior.laplace.batch_size must be >= 1, got {laplace.batch_size}")
        if self.training.ema_decay is None:
            self.training.ema_decay = DEFAULT_EMA_DECAY
        if not 0.0 <= self.training.ema_decay < 1.0:
            raise ConfigError(f"training.ema_decay must lie in [0, 1), got {self.training.ema_decay}")

    @property
    def torch_dtype(self):
        import torch

        return torch.float64 if self.dtype == "float64" else torch.float32


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def _check_value(where: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin is Union:
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        present = [o for o in options if o is not type(None)]
        if len(present) == 1:  # Optional[X]: X's own message says what is wrong
            return _check_value(where, value, present[0])
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(where, value, option)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(f"{where}: {value!r} is not any of {[_type_name(o) for o in options]}")
    if origin is dict:
        key_type, value_type = typing.get_args(annotation)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return {
            _check_value(f"{where}.{k}", k, key_type): _check_value(f"{where}.{k}", v, value_type)
            for k, v in value.items()
        }
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, where)
    return value


def _build(cls, values: Any, where: str):
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            section = f"section '{where}'" if where else "the top level"
            raise ConfigError(f"unknown key {key!r} in {section}{hint}; valid keys: {', '.join(fields)}")
        kwargs[key] = _check_value(f"{where}.{key}" if where else key, value, hints[key])
    return cls(**kwargs)


def config_from_dict(values: Dict[str, Any], base_dir: Optional[Path] = None) -> Config:
    config = _build(Config, values, "")
    if base_dir is not None:
        _resolve_paths(config, Path(base_dir))
    config.validate()
    return config


def _resolve(base: Path, path: Optional[str]) -> Optional[str]:
    if path is None:
        return None
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p))


def _resolve_paths(config: Config, base: Path) -> None:
    data = config.data
    data.train = _resolve(base, data.train) if data.train else data.train
    data.valid = _resolve(base, data.valid)
    data.isolated_atoms = _resolve(base, data.isolated_atoms)
    data.test = {name: _resolve(base, path) for name, path in data.test.items()}
    config.training.init_from = _resolve(base, config.training.init_from)
    config.out = _resolve(base, config.out)


def load_yaml_config(path, from_dict):
    """``from_dict(values, base_dir=...)`` on the YAML file at ``path``; every error names the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from error
    try:
        return from_dict(values or {}, base_dir=path.parent)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from error


def load_config(path) -> Config:
    return load_yaml_config(path, config_from_dict)


def config_to_dict(config: Config) -> Dict[str, Any]:
    return dataclasses.asdict(config)
