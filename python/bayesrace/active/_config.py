"""The YAML of ``bayesrace al``: modes, oracle and MD sections, and each round's training config."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, Optional, Union

import yaml

# ..train imports torch: imported where needed, so spawned labelling workers start fast

MODES = ("pool", "on_the_fly")
ORACLE_KINDS = ("tblite", "ase", "from_pool")


@dataclasses.dataclass
class OracleSection:
    """Who labels acquired structures."""

    kind: str = "tblite"  # tblite | ase | from_pool
    method: str = "GFN2-xTB"  # tblite: GFN2-xTB | GFN1-xTB | IPEA1-xTB
    charge: float = 0.0  # tblite: total charge (e)
    uhf: int = 0  # tblite: unpaired electrons (multiplicity − 1)
    accuracy: float = 1.0  # tblite: SCC accuracy (smaller is tighter)
    calculator: Optional[str] = None  # ase: import path of the class, e.g. ase.calculators.emt.EMT
    kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)  # ase: keyword arguments of the class
    workers: int = 1  # processes labelling in parallel


THERMOSTATS = ("langevin", "nve")
CALIBRATION_METHODS = ("isotonic", "scalar")
# top-level keys that only mode on_the_fly reads, and the ones only mode pool reads
ON_THE_FLY_KEYS = ("md", "posterior", "valid", "calibration_method", "threshold", "candidate_fraction")
POOL_KEYS = ("pool", "n_initial", "test")


@dataclasses.dataclass
class MDSection:
    """The LAMMPS MD of mode on_the_fly (units metal: K, ps, Å)."""

    structure: str = ""  # start structure (first frame of any ASE-readable file); no pbc = a molecule
    box: float = 40.0  # Å: cubic periodic box a molecule is centred in (must exceed its size + cutoff)
    temperature: float = 300.0  # K: initial velocities and the Langevin target
    thermostat: str = "langevin"  # langevin | nve
    damping: float = 0.1  # ps: Langevin damping time
    timestep: float = 0.0005  # ps
    n_steps: int = 2000  # total MD steps over all segments
    dump_every: int = 10  # steps between dumped frames (and between halt checks)
    seed: int = 1  # velocities and Langevin noise (segment r uses seed + 1000 r)
    ranks: int = 1  # > 1: mpirun -np ranks lmp; 1: in this process through the lammps module
    # after a halt the next segment starts from: last_trusted = the last dumped frame with max σ <= the
    # threshold (positions, velocities, step); halt = the halting frame itself
    restart_from: str = "last_trusted"


RESTART_FROM = ("last_trusted", "halt")


@dataclasses.dataclass
class ActiveConfig:
    """The YAML of ``bayesrace al`` (paths relative to the YAML file)."""

    mode: str = "pool"  # pool | on_the_fly (see _onthefly)
    out: str = "al"  # directory of the rounds, labelled.xyz, state.json, learning_curve.*
    pool: str = ""  # candidate structures (labels in it are ignored unless oracle.kind is from_pool)
    initial: Optional[str] = None  # a labelled file as the initial training set ...
    n_initial: Optional[int] = None  # ... or this many random picks from the pool, labelled by the oracle
    seed: int = 0  # initial picks and strategy "random"
    strategy: str = "bald_f"  # one of _acquisition.STRATEGIES
    batch_size: int = 8  # k: structures acquired per round
    n_rounds: int = 5  # acquisition rounds (n_rounds + 1 posteriors are trained)
    batch_aware: bool = True  # joint (BatchBALD-like) greedy selection for BALD strategies
    warm_start: bool = True  # round r > 0 starts from round r−1's members (training.init_from)
    training: Union[str, Dict[str, Any]] = dataclasses.field(default_factory=dict)  # training YAML: path or inline
    training_ranks: int = 1  # > 1: each round trains under mpirun -np training_ranks (members spread over ranks)
    test: Dict[str, str] = dataclasses.field(default_factory=dict)  # name -> labelled file, evaluated every round
    energy_key: str = "energy"  # labels in pool, initial and test files
    forces_key: str = "forces"
    predict_batch_size: int = 16
    oracle: OracleSection = dataclasses.field(default_factory=OracleSection)
    # mode on_the_fly only
    posterior: Optional[str] = None  # a trained posterior used as round 0 (else round 0 trains on initial)
    valid: Optional[str] = None  # labelled file: every round's posterior is calibrated on it
    calibration_method: str = "isotonic"  # isotonic | scalar
    threshold: Optional[float] = None  # eV/Å halting max force σ; null: round 0's deployable's own, kept fixed
    candidate_fraction: float = 0.5  # dumped frames with max σ > this × threshold are candidates
    md: MDSection = dataclasses.field(default_factory=MDSection)

    def validate(self) -> None:
        from ..train import ConfigError

        if self.mode not in MODES:
            raise ConfigError(f"mode is {self.mode!r}; expected one of {list(MODES)}")
        from ._acquisition import STRATEGIES

        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy is {self.strategy!r}; expected one of {sorted(STRATEGIES)}")
        if self.mode == "on_the_fly":
            self._validate_on_the_fly()
        else:
            if not self.pool:
                raise ConfigError("pool is required: the file of candidate structures")
            if (self.initial is None) == (self.n_initial is None):
                raise ConfigError("give exactly one of 'initial' (a labelled file) and 'n_initial' "
                                  "(random pool picks)")
        self._validate_common()

    def _validate_on_the_fly(self) -> None:
        from ..train import ConfigError

        if self.initial is None:
            raise ConfigError("mode on_the_fly needs 'initial': the labelled file every round trains on "
                              "(with the structures the MD acquired)")
        if self.oracle.kind == "from_pool":
            raise ConfigError("oracle.kind 'from_pool' needs a pool; mode on_the_fly labels new MD frames: "
                              "use tblite or ase")
        if self.calibration_method not in CALIBRATION_METHODS:
            raise ConfigError(f"calibration_method is {self.calibration_method!r}; expected one of "
                              f"{list(CALIBRATION_METHODS)}")
        if self.threshold is not None and not self.threshold > 0:
            raise ConfigError(f"threshold must be > 0 (eV/Å, max force σ), got {self.threshold}")
        if not 0.0 < self.candidate_fraction <= 1.0:
            raise ConfigError(f"candidate_fraction must lie in (0, 1], got {self.candidate_fraction}")
        md = self.md
        if not md.structure:
            raise ConfigError("md.structure is required: the start structure of the MD (e.g. an xyz file)")
        if md.thermostat not in THERMOSTATS:
            raise ConfigError(f"md.thermostat is {md.thermostat!r}; expected one of {list(THERMOSTATS)}")
        if md.temperature < 0 or (md.thermostat == "langevin" and md.temperature == 0):
            raise ConfigError(f"md.temperature must be > 0 K (>= 0 with nve), got {md.temperature}")
        for name in ("box", "damping", "timestep"):
            if not getattr(md, name) > 0:
                raise ConfigError(f"md.{name} must be > 0, got {getattr(md, name)}")
        if md.n_steps < 1:
            raise ConfigError(f"md.n_steps must be >= 1, got {md.n_steps}")
        if not 1 <= md.dump_every <= md.n_steps:
            raise ConfigError(f"md.dump_every must lie in [1, md.n_steps = {md.n_steps}], got {md.dump_every}")
        if md.ranks < 1:
            raise ConfigError(f"md.ranks must be >= 1, got {md.ranks}")
        if md.seed < 0:
            raise ConfigError(f"md.seed must be >= 0, got {md.seed}")
        if md.restart_from not in RESTART_FROM:
            raise ConfigError(f"md.restart_from is {md.restart_from!r}; expected one of {list(RESTART_FROM)}")

    def _validate_common(self) -> None:
        from ..train import ConfigError
        if self.n_initial is not None and self.n_initial < 1:
            raise ConfigError(f"n_initial must be >= 1, got {self.n_initial}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.n_rounds < 0:
            raise ConfigError(f"n_rounds must be >= 0, got {self.n_rounds}")
        if self.training_ranks < 1:
            raise ConfigError(f"training_ranks must be >= 1, got {self.training_ranks}")
        if self.predict_batch_size < 1:
            raise ConfigError(f"predict_batch_size must be >= 1, got {self.predict_batch_size}")
        if not self.training:
            raise ConfigError("training is required: a training YAML (path) or its content (mapping)")
        oracle = self.oracle
        if oracle.kind not in ORACLE_KINDS:
            raise ConfigError(f"oracle.kind is {oracle.kind!r}; expected one of {list(ORACLE_KINDS)}")
        if oracle.kind == "ase" and not oracle.calculator:
            raise ConfigError("oracle.kind 'ase' needs oracle.calculator, e.g. ase.calculators.emt.EMT")
        if oracle.kind != "ase" and (oracle.calculator or oracle.kwargs):
            raise ConfigError(f"oracle.calculator and oracle.kwargs apply to oracle.kind 'ase' only (kind is "
                              f"{oracle.kind!r})")
        if oracle.workers < 1:
            raise ConfigError(f"oracle.workers must be >= 1, got {oracle.workers}")
        if oracle.uhf < 0:
            raise ConfigError(f"oracle.uhf must be >= 0 (unpaired electrons), got {oracle.uhf}")
        if not oracle.accuracy > 0:
            raise ConfigError(f"oracle.accuracy must be > 0, got {oracle.accuracy}")


def active_config_from_dict(values: Dict[str, Any], base_dir: Optional[Path] = None) -> ActiveConfig:
    """Build and validate; the mode is checked first, so an on_the_fly config fails on it."""
    from ..train import ConfigError
    from ..train._config import _build

    if isinstance(values, dict) and "mode" in values and values["mode"] not in MODES:
        raise ConfigError(f"mode is {values['mode']!r}; expected one of {list(MODES)}")
    if isinstance(values, dict):
        mode = values.get("mode", "pool")
        foreign = [key for key in (ON_THE_FLY_KEYS if mode == "pool" else POOL_KEYS) if key in values]
        if foreign:
            other = "on_the_fly" if mode == "pool" else "pool"
            raise ConfigError(f"{', '.join(foreign)}: key(s) of mode {other} only (mode is {mode!r})")
    config = _build(ActiveConfig, values, "")
    config.validate()
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    resolve = lambda path: None if path is None else str(path if Path(path).is_absolute() else base / path)  # noqa
    config.out = resolve(config.out)
    config.pool = resolve(config.pool) if config.pool else config.pool
    config.initial = resolve(config.initial)
    config.test = {name: resolve(path) for name, path in config.test.items()}
    config.posterior = resolve(config.posterior)
    config.valid = resolve(config.valid)
    config.md.structure = resolve(config.md.structure) if config.md.structure else config.md.structure
    if isinstance(config.training, str):
        config.training = resolve(config.training)
    config._base_dir = str(base)  # relative paths of an inline training config
    return config


def load_active_config(path) -> ActiveConfig:
    from ..train import load_yaml_config

    return load_yaml_config(path, active_config_from_dict)


def round_training_config(config: ActiveConfig, round_index: int, train_file: str):
    """The training Config of one round: the training YAML with out = <out>/round_<r>,
    data.train = that round's training file and, with warm_start and r > 0,
    training.init_from = round r−1's posterior."""
    from ..train import ConfigError, config_from_dict

    if isinstance(config.training, str):
        path = Path(config.training)
        if not path.is_file():
            raise ConfigError(f"training: {path}: no such training config file")
        values, base = yaml.safe_load(path.read_text()) or {}, path.parent
    else:
        values, base = config.training, Path(getattr(config, "_base_dir", "."))
    values = json.loads(json.dumps(values))  # a deep copy
    if not isinstance(values, dict):
        raise ConfigError("training: expected a mapping (the training YAML)")
    values["out"] = str(Path(config.out) / f"round_{round_index}")
    values.setdefault("data", {})
    if not isinstance(values["data"], dict):
        raise ConfigError("training.data: expected a mapping")
    values["data"]["train"] = str(train_file)
    training = values.setdefault("training", {})
    if config.warm_start and round_index > 0:
        training["init_from"] = str(Path(config.out) / f"round_{round_index - 1}" / "posterior.pt")
    try:
        return config_from_dict(values, base_dir=base)
    except ConfigError as error:
        raise ConfigError(f"training: {error}") from error


