"""The YAML configuration of a training run, validated strictly.

Each section is a pydantic dataclass (see bayesrace._schema): an unknown or misspelt key is
an error that names the section, suggests the closest key and lists the valid ones; a value
of the wrong type or out of range names the key and what is expected. Checks that involve
several fields live in Config.validate. Paths are resolved relative to the config file.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any, Dict, Literal, Optional, Union

from pydantic import Field, model_validator

from .._schema import (
    AtLeastOne, Bool, ConfigError, Float, Int, NonNegative, NonNegativeInt, Positive, Section, Str, UnitInterval,
    load_yaml_config, parse_section, resolve_path, section,
)
from ._losses import LOSSES
from ..model import PRESETS, ModelConfig

DEFAULT_ENSEMBLE_MEMBERS = 4
DEFAULT_EMA_DECAY = 0.99
POSTERIOR_KINDS = ("ensemble", "mve", "swag", "ivon", "laplace", "shallow")
PosteriorKind = Literal[POSTERIOR_KINDS]
LossKind = Literal[tuple(sorted(LOSSES))]
Preset = Literal[tuple(sorted(PRESETS))]


@section
class DataSection:
    train: Str = ""  # extxyz (or any ASE format) with energies and forces
    valid: Optional[Str] = None  # if absent, n_valid frames are split off train
    n_valid: NonNegativeInt = 50
    test: Dict[Str, Str] = dataclasses.field(default_factory=dict)  # name -> file, for evaluate
    energy_key: Str = "energy"
    forces_key: Str = "forces"
    stress_key: Optional[Str] = None
    # "fit": least squares on the training set; "isolated": single-atom frames in
    # isolated_atoms; or a mapping element -> eV
    reference_energies: Union[Str, Dict[Str, Float]] = "fit"
    isolated_atoms: Optional[Str] = None
    max_train: Optional[AtLeastOne] = None  # use only the first max_train frames of train


@section
class ModelSection:
    """Overrides of the preset; ModelConfig.validate checks the architecture as a whole."""

    # base: ahead of small on acac at 12 and 40 minutes of one core (bench/results/
    # accuracy_vs_mace); small is ahead below ~5 minutes (the main job uses it)
    preset: Preset = "base"
    cutoff: Optional[Float] = None
    n_layers: Optional[Int] = None
    channels: Optional[Int] = None
    l_max: Optional[Int] = None
    n_radial: Optional[Int] = None
    envelope_p: Optional[Int] = None
    radial_hidden: Optional[Int] = None
    radial_layers: Optional[Int] = None
    readout_hidden: Optional[Int] = None
    avg_num_neighbors: Optional[Float] = None  # <= 0: computed from the training set
    covariance: Optional[Str] = None
    covariance_floor: Optional[Float] = None
    isolated_atom_limit: Optional[Bool] = None  # default true: an isolated atom has its reference energy
    force_sigma_cap: Optional[Float] = None  # eV/Å, default 10: aleatoric force σ bent toward e × this; 0: off
    energy_sigma_cap: Optional[Float] = None  # eV, default 100: the same for the structure energy σ
    message_square: Optional[Bool] = None  # add each atom's squared message: angles at the centre

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


@section
class LossSection:
    kind: LossKind = "nll_jef"  # mse | nll | nll_jef | nll_jef_equivariant
    energy_weight: NonNegative = 1.0  # λ_E
    force_weight: NonNegative = 1.0  # λ_F
    # eV/Å; > 0: each force component's MSE term is Huber beyond this error (squared below it), so
    # atoms far off (fresh on-the-fly frames with near-collisions) do not dominate the gradient
    force_huber: NonNegative = 0.0
    mse_warmup_epochs: NonNegativeInt = 0  # train with MSE first: the variance heads start from sane means (none with init_from)
    # what trains the predicted energies and forces under an NLL kind: "nll" (the joint NLL, as
    # in the paper), "mse" (the MSE term; the NLL trains the variance heads on the detached
    # residuals, through the shared layers too) or "frozen" (MSE alone; then, for the last
    # heads_fraction of the budget, the network is frozen and only the heads' last linear maps
    # and their log-variance offsets learn the NLL: the means are exactly an MSE model's)
    means: Literal["nll", "mse", "frozen"] = "nll"
    # with means "frozen", at the start of the heads phase: move the energy shift by the median
    # energy residual per atom of the distinct training structures (``refit_energy_zero``), so
    # frames the model cannot fit yet (warm-started on-the-fly rounds) do not shift every energy
    refit_energy_zero: Bool = False
    heads_fraction: Annotated[Float, Field(gt=0, lt=1)] = 0.2


@section
class TrainingSection:
    optimizer: Literal["adam", "adamw"] = "adamw"
    lr: Positive = 5e-3
    weight_decay: NonNegative = 0.0
    batch_size: AtLeastOne = 8
    max_epochs: AtLeastOne = 200
    max_minutes: Optional[Positive] = None  # wall-clock budget per member
    early_stopping_patience: NonNegativeInt = 30  # epochs without validation improvement
    # "plateau": ReduceLROnPlateau on the validation loss (lr_factor, lr_patience, min_lr);
    # "cosine": lr constant, then half a cosine down to min_lr over the last decay_fraction of
    # the budget (max_epochs or max_minutes, whichever runs out first), set at every step
    schedule: Literal["plateau", "cosine"] = "plateau"
    decay_fraction: Annotated[Float, Field(gt=0, le=1)] = 0.25
    lr_factor: Annotated[Float, Field(gt=0, lt=1)] = 0.5  # ReduceLROnPlateau on the validation loss
    lr_patience: NonNegativeInt = 8
    min_lr: NonNegative = 1e-5
    # exponential moving average of the weights; 0 turns it off. Default 0.99 (for posterior
    # kind ivon it applies to the warm start only: IVON validates its own mean weights)
    ema_decay: Optional[Annotated[Float, Field(ge=0, lt=1)]] = None
    grad_clip: NonNegative = 10.0  # max gradient norm; 0 turns clipping off
    threads: AtLeastOne = 1  # torch threads per process (one per MPI rank is fastest)
    # warm start: a posterior.pt whose member m mod M gives member m its initial weights
    # (and normalisation) instead of a random initialisation; only read when the member has
    # no checkpoint yet. Its elements and architecture must match this run's.
    init_from: Optional[Str] = None
    # with init_from: each parameter starts at init_shrink × the warm start's + (1 − init_shrink) ×
    # the member's fresh seeded initialisation ("shrink and perturb"): a chain of warm-started
    # rounds keeps the first round's basin, which fits later data worse than a fresh start
    init_shrink: Optional[Annotated[Float, Field(gt=0, lt=1)]] = None


@section
class EnsembleSection:
    members: Optional[AtLeastOne] = None  # kind ensemble only; default 4


@section
class SwagSection:
    """SWAG (Maddox et al. 2019): collect weight snapshots at a constant learning rate."""

    # collection begins at this epoch (or earlier, when early stopping would end training
    # before it); early stopping and the learning-rate schedule are off from then on
    start_epoch: Int = 100
    collect_every: Optional[AtLeastOne] = None  # optimizer steps between snapshots; default: once per epoch
    rank: AtLeastOne = 20  # K: the most recent deviation columns kept (low-rank part of the covariance)
    lr: Optional[Positive] = None  # constant learning rate of the SWAG phase; default: the lr reached


@section
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
    start_epoch: Optional[Int] = None
    # Defaults from warm starts on tiny-preset PSB3 (120 structures, Adam for 40 epochs to a
    # validation force RMSE of 0.191 eV/Å, then 20 IVON epochs). IVON's step is SGD-like,
    # lr·(hess_init+δ)·m/(h+δ), and the NLL gradients at the warm start reach ~5, so lr ≥ 3e-4
    # wrecks the fitted forces (0.65–35 eV/Å, or a broken force covariance); 1e-4 kept 0.190
    lr: Positive = 1e-4
    # effective sample size; default: half the number of training atoms (the Bayesian value
    # for these losses, see train/_optim.default_ivon_ess), 840 on that set
    ess: Optional[Positive] = None
    # initial diagonal Hessian; the initial weight noise std is 1/sqrt(ess·(hess_init+δ)).
    # 300 (std ≈ 2e-3): force RMSE 0.190 and epistemic σ 0.008 eV/Å (1000: 0.190 and 0.005);
    # noise of ~1e-2 (hess_init ≤ 10) throws the warm-started NLL far off its minimum in the
    # first IVON epoch (force RMSE 1.3–2.6 eV/Å)
    hess_init: Positive = 300.0
    # Hessian momentum: 0.999 lets h adapt within a few hundred steps (the package default
    # 0.99999 keeps h ≈ hess_init for a whole short IVON phase)
    beta2: UnitInterval = 0.999
    beta1: UnitInterval = 0.9  # gradient momentum
    weight_decay: NonNegative = 1e-4  # Gaussian prior precision per unit ess (δ in the paper)
    train_samples: AtLeastOne = 1  # Monte-Carlo weight samples per optimizer step
    clip_radius: Optional[Positive] = None  # element-wise clip of the update (IVON's own); None: no clipping

    def resolved_start_epoch(self, max_epochs: int) -> int:
        """The epoch at which IVON takes over (start_epoch, or 2/3 of max_epochs)."""
        if self.start_epoch is not None:
            return self.start_epoch
        return max(0, min(int(round(2.0 * max_epochs / 3.0)), max_epochs - 1))


@section
class LaplaceSection:
    """Last-layer Laplace approximation around one trained MVE member."""

    prior_precision: Optional[Positive] = None  # None: fitted by maximising the marginal likelihood
    max_structures: Optional[AtLeastOne] = None  # use a (seeded) random subset of the training set for the Hessian
    batch_size: AtLeastOne = 8  # structures per batch when accumulating the Hessian


@section
class ShallowSection:
    """A shallow ensemble: one trained network (member 0) whose trunk is shared by ``heads``
    readout sets; heads 1.. start from fresh seeded readouts and train on the frozen trunk."""

    heads: Int = 4  # readout sets, member 0's own included; at least 2
    # epochs each further head trains; default a quarter of training.max_epochs (at least 2).
    # With training.max_minutes each head also gets a quarter of that budget.
    head_epochs: Optional[AtLeastOne] = None

    def resolved_head_epochs(self, max_epochs: int) -> int:
        return self.head_epochs if self.head_epochs is not None else max(2, max_epochs // 4)


@section
class PosteriorSection:
    """Which approximate posterior training produces; every kind ends as M weight sets."""

    kind: PosteriorKind = "ensemble"  # ensemble | mve | swag | ivon | laplace | shallow
    samples: AtLeastOne = 8  # weight sets drawn for swag, ivon and laplace
    swag: Optional[SwagSection] = None  # settings for kind swag only
    ivon: Optional[IvonSection] = None  # settings for kind ivon only
    laplace: Optional[LaplaceSection] = None  # settings for kind laplace only
    shallow: Optional[ShallowSection] = None  # settings for kind shallow only


@section
class Config:
    out: Str = "runs/default"  # run directory: checkpoints, logs, posterior.pt
    seed: Int = 0
    dtype: Literal["float64", "float32"] = "float64"
    data: Section[DataSection] = dataclasses.field(default_factory=DataSection)
    model: Section[ModelSection] = dataclasses.field(default_factory=ModelSection)
    loss: Section[LossSection] = dataclasses.field(default_factory=LossSection)
    training: Section[TrainingSection] = dataclasses.field(default_factory=TrainingSection)
    ensemble: Section[EnsembleSection] = dataclasses.field(default_factory=EnsembleSection)
    posterior: Section[PosteriorSection] = dataclasses.field(default_factory=PosteriorSection)

    @property
    def n_members(self) -> int:
        """Models trained: the ensemble's members, the shallow ensemble's heads (member 0 the
        whole network, the others its readouts), or one for every other posterior kind."""
        if self.posterior.kind == "shallow":
            return self.posterior.shallow.heads
        return self.ensemble.members if self.posterior.kind == "ensemble" else 1

    @model_validator(mode="after")
    def validate(self) -> "Config":
        """The checks across fields, then the kind-dependent defaults (idempotent); pydantic runs
        it after the fields' own checks, and it may be run again after a change."""
        self._validate_posterior()
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
        if self.loss.means == "frozen" and (self.loss.kind == "mse" or self.posterior.kind not in ("ensemble", "mve")):
            raise ConfigError(
                "loss.means 'frozen' trains variance heads after an MSE phase: it needs an NLL loss.kind "
                f"(it is {self.loss.kind!r}) and posterior.kind ensemble or mve (it is {self.posterior.kind!r})"
            )
        loss = self.loss
        if loss.force_huber > 0 and loss.kind != "mse" and loss.means == "nll" and loss.mse_warmup_epochs == 0:
            raise ConfigError(
                f"loss.force_huber ({loss.force_huber:g} eV/Å) bends the MSE force term, but loss.kind "
                f"{loss.kind!r} with loss.means 'nll' and no loss.mse_warmup_epochs has none; "
                "use loss.means mse or frozen, or remove loss.force_huber"
            )
        if loss.refit_energy_zero and loss.means != "frozen":
            raise ConfigError(
                "loss.refit_energy_zero acts at the start of the heads phase of loss.means 'frozen', "
                f"but loss.means is {loss.means!r}; set means: frozen or remove loss.refit_energy_zero"
            )
        if self.training.init_shrink is not None and not self.training.init_from:
            raise ConfigError(
                f"training.init_shrink ({self.training.init_shrink:g}) shrinks a warm start toward a fresh "
                "initialisation, but training.init_from names no posterior; set init_from or remove init_shrink"
            )
        if self.loss.kind == "nll_jef_equivariant" and model.covariance != "equivariant":
            raise ConfigError(
                "loss.kind 'nll_jef_equivariant' needs model.covariance: equivariant "
                f"(it is {model.covariance!r})"
            )
        return self

    def _validate_posterior(self) -> None:
        posterior, max_epochs = self.posterior, self.training.max_epochs
        kind = posterior.kind
        for name in ("swag", "ivon", "laplace", "shallow"):
            if getattr(posterior, name) is not None and name != kind:
                raise ConfigError(
                    f"posterior.{name} applies only to posterior.kind {name!r}, but kind is {kind!r}; "
                    f"remove the section or set kind: {name}"
                )
        if kind == "ensemble" and self.ensemble.members is None:
            self.ensemble.members = DEFAULT_ENSEMBLE_MEMBERS
        elif kind != "ensemble" and self.ensemble.members is not None:
            raise ConfigError(
                f"ensemble.members applies only to posterior.kind 'ensemble', but kind is {kind!r} "
                + ("(its heads are posterior.shallow.heads); remove it" if kind == "shallow"
                   else "(which trains one model); remove it")
            )
        if kind == "laplace" and posterior.samples % 2:
            raise ConfigError(
                f"posterior.samples must be even for kind laplace (antithetic pairs), got {posterior.samples}"
            )
        if kind == "swag":
            swag = posterior.swag = posterior.swag or SwagSection()
            if not 0 <= swag.start_epoch < max_epochs:
                raise ConfigError(
                    f"posterior.swag.start_epoch must lie in [0, training.max_epochs = {max_epochs}) "
                    f"so that SWAG collects snapshots, got {swag.start_epoch}"
                )
        if kind == "ivon":
            ivon = posterior.ivon = posterior.ivon or IvonSection()
            # start_epoch stays None when unset: resolved against max_epochs at training time,
            # so a resumed run may be given more epochs (max_epochs is a resumable change)
            if ivon.start_epoch is not None and not 0 <= ivon.start_epoch < max_epochs:
                raise ConfigError(
                    f"posterior.ivon.start_epoch must lie in [0, training.max_epochs = {max_epochs}) "
                    f"so that IVON trains at least one epoch, got {ivon.start_epoch}"
                )
        if kind == "laplace":
            posterior.laplace = posterior.laplace or LaplaceSection()
        if kind == "shallow":
            shallow = posterior.shallow = posterior.shallow or ShallowSection()
            if shallow.heads < 2:
                raise ConfigError(f"posterior.shallow.heads must be at least 2 (an ensemble of heads), got {shallow.heads}")
        if self.training.ema_decay is None:
            self.training.ema_decay = DEFAULT_EMA_DECAY

    @property
    def torch_dtype(self):
        import torch

        return torch.float64 if self.dtype == "float64" else torch.float32


def config_from_dict(values: Dict[str, Any], base_dir: Optional[Path] = None) -> Config:
    config = parse_section(Config, values)
    if base_dir is not None:
        resolve = lambda path: resolve_path(Path(base_dir), path)  # noqa: E731
        data = config.data
        data.train, data.valid, data.isolated_atoms = map(resolve, (data.train, data.valid, data.isolated_atoms))
        data.test = {name: resolve(path) for name, path in data.test.items()}
        config.training.init_from = resolve(config.training.init_from)
        config.out = resolve(config.out)
    return config


def load_config(path) -> Config:
    return load_yaml_config(path, config_from_dict)


def config_to_dict(config: Config) -> Dict[str, Any]:
    return dataclasses.asdict(config)
