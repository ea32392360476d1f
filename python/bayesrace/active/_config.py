"""The YAML of ``bayesrace al``: modes, oracle and MD sections, and each round's training config.

The sections are pydantic dataclasses (see bayesrace._schema): types, ranges and unknown keys
are checked field by field, the checks across fields in ActiveConfig.validate.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any, Dict, Literal, Optional, Union

from pydantic import Field, model_validator

from .._schema import (
    AtLeastOne, Bool, ConfigError, Float, Int, NonNegativeInt, Positive, Section, Str, load_yaml_config,
    parse_section, read_yaml, resolve_path, section,
)
from ._acquisition import STRATEGIES

# ..train imports torch: imported where needed, so spawned labelling workers start fast

MODES = ("pool", "on_the_fly")
ORACLE_KINDS = ("tblite", "ase", "from_pool")
THERMOSTATS = ("langevin", "nve")
# bayes.METHODS, spelt out: this module must not import torch (a test keeps the two equal)
CALIBRATION_METHODS = ("isotonic", "scalar", "split")
RESTART_FROM = ("last_trusted", "halt")
HALT_ON = ("total", "epistemic", "relative", "feature")  # bayesrace.lammps.HALT_COLUMNS, spelt out (no torch import here)
THRESHOLD_FROM = ("calibration", "control", "control_first")
CONTROL_RULES = ("largest", "run_length")
MIN_CONTROL_FRAMES = 20  # run_length fits the top 10 % of a control run's frames: at least 2 of them
# top-level keys that only mode on_the_fly reads, and the ones only mode pool reads
ON_THE_FLY_KEYS = ("md", "posterior", "valid", "calibration_method", "threshold", "threshold_from",
                   "candidate_fraction", "acquired_repeats", "label_halting_frame")
POOL_KEYS = ("pool", "n_initial", "test")


@section
class OracleSection:
    """Who labels acquired structures."""

    kind: Literal[ORACLE_KINDS] = "tblite"  # tblite | ase | from_pool
    method: Str = "GFN2-xTB"  # tblite: GFN2-xTB | GFN1-xTB | IPEA1-xTB
    charge: Float = 0.0  # tblite: total charge (e)
    uhf: NonNegativeInt = 0  # tblite: unpaired electrons (multiplicity − 1)
    accuracy: Positive = 1.0  # tblite: SCC accuracy (smaller is tighter)
    calculator: Optional[Str] = None  # ase: import path of the class, e.g. ase.calculators.emt.EMT
    kwargs: Dict[Str, Any] = dataclasses.field(default_factory=dict)  # ase: keyword arguments of the class
    workers: AtLeastOne = 1  # processes labelling in parallel


@section
class MDSection:
    """The LAMMPS MD of mode on_the_fly (units metal: K, ps, Å)."""

    structure: Str = ""  # start structure (first frame of any ASE-readable file); no pbc = a molecule
    box: Positive = 40.0  # Å: cubic periodic box a molecule is centred in (must exceed its size + cutoff)
    temperature: Float = 300.0  # K: initial velocities and the Langevin target
    thermostat: Literal[THERMOSTATS] = "langevin"  # langevin | nve
    damping: Positive = 0.1  # ps: Langevin damping time
    timestep: Positive = 0.0005  # ps
    n_steps: AtLeastOne = 2000  # total MD steps over all segments
    dump_every: Int = 10  # steps between dumped frames (and between halt checks)
    seed: NonNegativeInt = 1  # velocities and Langevin noise (segment r uses seed + 1000 r)
    ranks: AtLeastOne = 1  # > 1: mpirun -np ranks lmp; 1: in this process through the lammps module
    # after a halt the next segment starts from: last_trusted = the last dumped frame with max σ <= the
    # threshold (positions, velocities, step); halt = the halting frame itself
    restart_from: Literal[RESTART_FROM] = "last_trusted"
    # the force σ that halts a segment: total = epistemic and aleatoric together; epistemic = the
    # members' disagreement alone (what retraining on new labels can lower; the aleatoric part is
    # the model's own error level, which new labels of a hotter region raise); relative = the
    # epistemic σ over (|F_i| + 1 eV/Å), unit-free: hot MD's larger forces carry proportionally
    # larger σ's, so this halts on novel geometries rather than on heat
    halt_on: Literal[HALT_ON] = "total"
    # after a halt, MD goes on this many steps past the halting frame without halting (it stops at
    # look_ahead_limit × the threshold): its dumped frames join the candidates, so a round can label
    # where the trajectory was heading, not only where it stopped; 0: off. The next segment still
    # restarts from md.restart_from's frame: nothing of the look-ahead is kept but its candidates.
    look_ahead: NonNegativeInt = 0
    look_ahead_limit: Annotated[Float, Field(gt=1)] = 3.0
    # threshold_from control: each round, an unhalted run of control_steps steps at
    # control_temperature (that of the training data) from md.structure with the round's model;
    # the threshold is control_margin × the largest σ over its dumped frames
    control_temperature: Optional[Positive] = None  # K
    control_steps: AtLeastOne = 4000
    control_margin: Annotated[Float, Field(ge=1)] = 1.25
    # how the control run's σ's become τ (× control_margin): largest = their largest (a bound for a run
    # as long as the control run); run_length = the σ that an in-distribution run of n_steps exceeds
    # control_false_halts times in expectation, from an exponential fit of the control's upper tail
    control_rule: Literal[CONTROL_RULES] = "largest"
    control_false_halts: Annotated[Float, Field(gt=0, lt=1)] = 0.1


@section
class ActiveConfig:
    """The YAML of ``bayesrace al`` (paths relative to the YAML file)."""

    mode: Literal[MODES] = "pool"  # pool | on_the_fly (see _onthefly)
    out: Str = "al"  # directory of the rounds, labelled.xyz, state.json, learning_curve.*
    pool: Str = ""  # candidate structures (labels in it are ignored unless oracle.kind is from_pool)
    initial: Optional[Str] = None  # a labelled file as the initial training set ...
    n_initial: Optional[AtLeastOne] = None  # ... or this many random picks from the pool, labelled by the oracle
    seed: Int = 0  # initial picks and strategy "random"
    strategy: Literal[tuple(sorted(STRATEGIES))] = "bald_f"  # one of _acquisition.STRATEGIES
    batch_size: AtLeastOne = 8  # k: structures acquired per round
    n_rounds: NonNegativeInt = 5  # acquisition rounds (n_rounds + 1 posteriors are trained)
    batch_aware: Bool = True  # joint (BatchBALD-like) greedy selection for BALD strategies
    warm_start: Bool = True  # round r > 0 starts from round r−1's members (training.init_from)
    training: Union[Str, Dict[Str, Any]] = dataclasses.field(default_factory=dict)  # training YAML: path or inline
    training_ranks: AtLeastOne = 1  # > 1: each round trains under mpirun -np training_ranks (members spread over ranks)
    test: Dict[Str, Str] = dataclasses.field(default_factory=dict)  # name -> labelled file, evaluated every round
    energy_key: Str = "energy"  # labels in pool, initial and test files
    forces_key: Str = "forces"
    predict_batch_size: AtLeastOne = 16
    oracle: Section[OracleSection] = dataclasses.field(default_factory=OracleSection)
    # mode on_the_fly only
    posterior: Optional[Str] = None  # a trained posterior used as round 0 (else round 0 trains on initial)
    valid: Optional[Str] = None  # labelled file: every round's posterior is calibrated on it
    calibration_method: Literal[CALIBRATION_METHODS] = "isotonic"  # isotonic | scalar | split
    # halting max force σ (eV/Å; unit-free with md.halt_on relative); null: from threshold_from
    threshold: Optional[Positive] = None
    # calibration: round 0's stored threshold (1.5 × q_0.99 of the validation set's largest σ, a bound per
    # structure), kept for every round; control: each round's own, md.control_margin × the largest σ of
    # an unhalted control run at the training temperature (a bound per run of that length);
    # control_first: round 0's control τ, kept for every round (later models, more certain at the
    # training temperature, would otherwise tighten τ round by round)
    threshold_from: Literal[THRESHOLD_FROM] = "calibration"
    # dumped frames with max σ > this × threshold are candidates
    candidate_fraction: Annotated[Float, Field(gt=0, le=1)] = 0.5
    # each acquired frame appears this many times in later rounds' training files: a few new
    # frames among hundreds barely move a short warm-started fine-tune
    acquired_repeats: AtLeastOne = 1
    # the frame a segment halted at is always one of the batch_size frames labelled (the rest are
    # chosen by strategy given it): among look-ahead candidates the strategy alone may pick only
    # frames far past the halt, leaving the region the restarted MD goes back to unlabelled
    label_halting_frame: Bool = False
    md: Section[MDSection] = dataclasses.field(default_factory=MDSection)

    @model_validator(mode="after")
    def validate(self) -> "ActiveConfig":
        """The checks across fields (pydantic runs it after each field's own checks)."""
        if self.mode == "on_the_fly":
            self._validate_on_the_fly()
        else:
            if not self.pool:
                raise ConfigError("pool is required: the file of candidate structures")
            if (self.initial is None) == (self.n_initial is None):
                raise ConfigError("give exactly one of 'initial' (a labelled file) and 'n_initial' "
                                  "(random pool picks)")
        if not self.training:
            raise ConfigError("training is required: a training YAML (path) or its content (mapping)")
        oracle = self.oracle
        if oracle.kind == "ase" and not oracle.calculator:
            raise ConfigError("oracle.kind 'ase' needs oracle.calculator, e.g. ase.calculators.emt.EMT")
        if oracle.kind != "ase" and (oracle.calculator or oracle.kwargs):
            raise ConfigError(f"oracle.calculator and oracle.kwargs apply to oracle.kind 'ase' only (kind is "
                              f"{oracle.kind!r})")
        return self

    def _validate_on_the_fly(self) -> None:
        if self.initial is None:
            raise ConfigError("mode on_the_fly needs 'initial': the labelled file every round trains on "
                              "(with the structures the MD acquired)")
        if self.oracle.kind == "from_pool":
            raise ConfigError("oracle.kind 'from_pool' needs a pool; mode on_the_fly labels new MD frames: "
                              "use tblite or ase")
        md = self.md
        if not md.structure:
            raise ConfigError("md.structure is required: the start structure of the MD (e.g. an xyz file)")
        if md.temperature < 0 or (md.thermostat == "langevin" and md.temperature == 0):
            raise ConfigError(f"md.temperature must be > 0 K (>= 0 with nve), got {md.temperature}")
        if not 1 <= md.dump_every <= md.n_steps:
            raise ConfigError(f"md.dump_every must lie in [1, md.n_steps = {md.n_steps}], got {md.dump_every}")
        if self.threshold_from in ("control", "control_first"):
            if self.threshold is not None:
                raise ConfigError(f"give either 'threshold' ({self.threshold}) or threshold_from "
                                  f"'{self.threshold_from}', not both")
            if md.control_temperature is None:
                raise ConfigError(f"threshold_from '{self.threshold_from}' needs md.control_temperature: the temperature (K) of "
                                  "the training data, where the control run measures the model's own σ")
            if md.control_steps < md.dump_every:
                raise ConfigError(f"md.control_steps ({md.control_steps}) must be >= md.dump_every ({md.dump_every}): "
                                  f"the control run's σ is read from its dumped frames")
            if md.control_rule == "run_length" and md.control_steps < MIN_CONTROL_FRAMES * md.dump_every:
                raise ConfigError(f"md.control_rule 'run_length' fits the control run's upper tail: it needs "
                                  f"md.control_steps >= {MIN_CONTROL_FRAMES} × md.dump_every "
                                  f"({MIN_CONTROL_FRAMES * md.dump_every}), got {md.control_steps}")
        elif md.halt_on != "total" and self.threshold is None and self.valid is None:
            unit = "eV/Å" if md.halt_on == "epistemic" else "unit-free"
            what = "feature distance" if md.halt_on == "feature" else f"calibrated {md.halt_on} force σ"
            raise ConfigError(f"md.halt_on '{md.halt_on}' needs 'threshold' ({unit}) or 'valid' (the threshold is "
                              f"then 1.5 × q_0.99 of the validation set's largest {what})")


def active_config_from_dict(values: Dict[str, Any], base_dir: Optional[Path] = None) -> ActiveConfig:
    """Build and validate; the mode is checked first, so an on_the_fly config fails on it."""
    if isinstance(values, dict):
        mode = values.get("mode", "pool")
        if mode not in MODES:
            raise ConfigError(f"mode is {mode!r}; expected one of {list(MODES)}")
        foreign = [key for key in (ON_THE_FLY_KEYS if mode == "pool" else POOL_KEYS) if key in values]
        if foreign:
            other = "on_the_fly" if mode == "pool" else "pool"
            raise ConfigError(f"{', '.join(foreign)}: key(s) of mode {other} only (mode is {mode!r})")
    config = parse_section(ActiveConfig, values)
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    resolve = lambda path: resolve_path(base, path)  # noqa: E731
    config.out, config.pool, config.initial = map(resolve, (config.out, config.pool, config.initial))
    config.posterior, config.valid, config.md.structure = map(resolve, (config.posterior, config.valid,
                                                                         config.md.structure))
    config.test = {name: resolve(path) for name, path in config.test.items()}
    if isinstance(config.training, str):
        config.training = resolve(config.training)
    config._base_dir = str(base)  # relative paths of an inline training config
    return config


def load_active_config(path) -> ActiveConfig:
    return load_yaml_config(path, active_config_from_dict)


def round_training_config(config: ActiveConfig, round_index: int, train_file: str):
    """The training Config of one round: the training YAML with out = <out>/round_<r>,
    data.train = that round's training file and, with warm_start and r > 0,
    training.init_from = round r−1's posterior (round 0, with nothing to start from, drops
    training.init_shrink)."""
    from ..train import config_from_dict

    if isinstance(config.training, str):
        path = Path(config.training)
        if not path.is_file():
            raise ConfigError(f"training: {path}: no such training config file")
        values, base = read_yaml(path.read_text()) or {}, path.parent
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
    elif training.get("init_shrink") is not None and not training.get("init_from"):
        if not config.warm_start:
            raise ConfigError("training.init_shrink shrinks each round's warm start, but warm_start is false "
                              "(every round starts fresh); set warm_start: true or remove init_shrink")
        training.pop("init_shrink")  # round 0 has no earlier round to start from
    try:
        return config_from_dict(values, base_dir=base)
    except ConfigError as error:
        raise ConfigError(f"training: {error}") from error
