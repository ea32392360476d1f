"""Training of RACE members and the posterior kinds built from them.

One member: Adam/AdamW, an exponential moving average (EMA) of the weights that is what
gets validated and kept, ReduceLROnPlateau and early stopping on the validation loss,
gradient clipping. A checkpoint is written atomically after every epoch (model,
EMA, optimiser, scheduler, history, torch RNG state and any SWAG moments), so a killed
run loses at most the epoch under way; batch order is a function of (seed, epoch) only,
so a resumed run continues exactly.

Posterior kinds (config ``posterior.kind``); each ends as M weight sets, the members of
one ``posterior.pt``, so evaluation, the ASE calculator and the LAMMPS deployable treat
them alike:

- ``ensemble``: ``ensemble.members`` independently initialised members.
- ``mve``: one member (mean–variance estimator: the NLL_JEF heads only).
- ``swag``: one member trained on; from ``swag.start_epoch`` at a constant learning rate
  the raw weights are collected into SWAG moments (:class:`SwagCollector`) and
  ``posterior.samples`` weight sets are drawn from them.
- ``ivon``: one member trained like an MVE member (Adam/AdamW, EMA) until
  ``ivon.start_epoch``; then its best validated (EMA) weights become the mean of the IVON
  optimizer (a diagonal Gaussian over the weights), which trains on without EMA, validated
  on its mean; ``posterior.samples`` weight sets are drawn from the Gaussian of the best
  IVON epoch.
- ``laplace``: one MVE member, then a last-layer Laplace approximation
  (``_laplace.fit_last_layer_laplace``) and ``posterior.samples`` antithetic samples.

An ensemble trains its members one after another, or in parallel under
``mpirun -np K bayesrace train`` (member m on rank m mod K, one torch thread per rank).
The other kinds train one model: under mpirun only rank 0 trains and the other ranks
wait. Rank 0 then writes ``posterior.pt``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters
from torch.optim.swa_utils import AveragedModel

from .. import keys
from ._config import Config, config_to_dict
from ..data import (
    DataError,
    Graph,
    TypeMap,
    fit_reference_energies,
    frames_to_graphs,
    isolated_atom_energies,
    iterate_batches,
    read_frames,
    split,
)
from ._losses import TRAINED_HEADS, loss_function
from ..model import RACE, build_model
from .._mpi import mpi_world
from ..bayes import load_posterior, save_posterior

CHECKPOINT = "checkpoint.pt"
METRICS_LOG = "metrics.jsonl"
POSTERIOR_FILE = "posterior.pt"
# config entries that may change between a run and its resumption
_RESUMABLE_CHANGES = ("max_epochs", "max_minutes", "early_stopping_patience", "threads")
# posterior kinds whose training is that of an ensemble member (their checkpoints are interchangeable)
_TRAINED_LIKE_ENSEMBLE = ("ensemble", "mve", "laplace")


@dataclasses.dataclass
class TrainingData:
    train: List[Graph]
    valid: List[Graph]
    type_names: List[str]
    reference_energies: List[float]
    energy_shift: float
    energy_scale: float
    avg_num_neighbors: float
    data_sha256: str


def _sha256_files(paths: List[Optional[str]]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        if path:
            digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def prepare_data(config: Config, progress: bool = False) -> TrainingData:
    """Read, validate and featurise the training and validation sets (deterministic)."""
    data = config.data
    read = dict(energy_key=data.energy_key, forces_key=data.forces_key, stress_key=data.stress_key)
    frames = read_frames(data.train, **read)
    # single-atom frames (e.g. isolated atoms shipped with a data set) carry no forces to learn
    frames = [f for f in frames if len(f.numbers) > 1]
    if data.max_train is not None:
        frames = frames[: data.max_train]
    if data.valid:
        train_frames, valid_frames = frames, read_frames(data.valid, **read)
    else:
        if data.n_valid >= len(frames):
            raise DataError(
                f"{data.train}: {len(frames)} frames, cannot split off n_valid={data.n_valid} for validation"
            )
        train_frames, valid_frames = split(frames, data.n_valid, config.seed)
    type_map = TypeMap.from_frames(train_frames)
    if isinstance(data.reference_energies, dict):
        references = data.reference_energies
    elif data.reference_energies == "isolated":
        references = isolated_atom_energies(read_frames(data.isolated_atoms, require_forces=False, **{
            k: v for k, v in read.items() if k != "forces_key"}))
    else:
        references = fit_reference_energies(train_frames, type_map.type_names)
    missing = [t for t in type_map.type_names if t not in references]
    if missing:
        raise DataError(f"no reference energy for element(s) {missing}; given for {sorted(references)}")
    reference_list = [float(references[t]) for t in type_map.type_names]

    model_config = config.model.model_config()
    train = frames_to_graphs(train_frames, type_map, model_config.cutoff, progress=progress)
    valid = frames_to_graphs(valid_frames, type_map, model_config.cutoff, progress=progress)

    residual_per_atom = np.array(
        [(g.energy - sum(reference_list[s] for s in g.species)) / len(g.species) for g in train]
    )
    all_forces = np.concatenate([g.forces.reshape(-1) for g in train])
    energy_scale = float(np.sqrt(np.mean(all_forces**2))) if all_forces.size else float(residual_per_atom.std())
    avg_neighbors = float(np.mean([g.edge_index.shape[1] / len(g.species) for g in train]))
    return TrainingData(
        train=train,
        valid=valid,
        type_names=type_map.type_names,
        reference_energies=reference_list,
        energy_shift=float(residual_per_atom.mean()),
        energy_scale=energy_scale if energy_scale > 0 else 1.0,
        avg_num_neighbors=avg_neighbors,
        data_sha256=_sha256_files([data.train, data.valid]),
    )


def _member_seed(config: Config, member: int) -> int:
    return config.seed * 1000 + member


_WARM_START_CACHE: Dict[tuple, Dict] = {}


def _warm_start_record(config: Config, data: TrainingData) -> Dict:
    """The posterior record named by ``training.init_from``, checked against this run: same
    elements (in order) and the same architecture (``avg_num_neighbors`` aside: the record's
    is kept, so a warm-started member computes exactly the function it starts from)."""
    from ..model import ModelConfig
    from ..bayes._posterior import _read_record

    path = config.training.init_from
    try:
        stat = os.stat(path)
        key = (os.path.abspath(path), stat.st_mtime_ns, stat.st_size)
        record = _WARM_START_CACHE.get(key)
        if record is None:
            record = _read_record(path)
            _WARM_START_CACHE.clear()  # one warm start at a time; members share it
            _WARM_START_CACHE[key] = record
    except (FileNotFoundError, ValueError) as error:
        raise RuntimeError(f"training.init_from: {error}") from error
    if list(record["type_names"]) != list(data.type_names):
        raise RuntimeError(
            f"training.init_from {path}: its elements {record['type_names']} differ from the training data's "
            f"{data.type_names}; a warm start needs the same elements"
        )
    wanted = dataclasses.asdict(config.model.model_config())
    saved = dataclasses.asdict(ModelConfig(**record["model_config"]))
    differing = [name for name in wanted if name != "avg_num_neighbors" and wanted[name] != saved[name]]
    if wanted["avg_num_neighbors"] > 0 and wanted["avg_num_neighbors"] != saved["avg_num_neighbors"]:
        differing.append("avg_num_neighbors")
    if differing:
        raise RuntimeError(
            f"training.init_from {path}: its model differs in {', '.join(f'model.{n}' for n in differing)} "
            f"({', '.join(f'{saved[n]!r} there, {wanted[n]!r} here' for n in differing)})"
        )
    return record


def _new_member_model(config: Config, data: TrainingData, member: int) -> RACE:
    model_config = config.model.model_config()
    if config.training.init_from:
        # the warm start's normalisation and neighbour count, so its weights mean what they meant
        record = _warm_start_record(config, data)
        model_config.avg_num_neighbors = float(record["model_config"]["avg_num_neighbors"])
        return build_model(
            model_config,
            data.type_names,
            list(record["reference_energies"]),
            float(record["energy_shift"]),
            float(record["energy_scale"]),
            dtype=config.torch_dtype,
            seed=_member_seed(config, member),
        )
    if model_config.avg_num_neighbors <= 0:
        model_config.avg_num_neighbors = data.avg_num_neighbors
    return build_model(
        model_config,
        data.type_names,
        data.reference_energies,
        data.energy_shift,
        data.energy_scale,
        dtype=config.torch_dtype,
        seed=_member_seed(config, member),
    )


def initial_member_model(config: Config, data: TrainingData, member: int) -> RACE:
    """The model member ``member`` starts training from: a seeded random initialisation, or
    with ``training.init_from`` member ``member mod M`` of that posterior (all its weights and
    buffers, so the same function)."""
    model = _new_member_model(config, data, member)
    if config.training.init_from:
        states = _warm_start_record(config, data)["members"]
        model.load_state_dict(states[member % len(states)])
    return model


def _comparable_config(config: Config) -> Dict:
    """The config entries a checkpoint must agree with (those that shape the training)."""
    values = config_to_dict(config)
    for name in _RESUMABLE_CHANGES:
        values["training"].pop(name, None)
    if values["training"].get("init_from") is None:  # checkpoints from before warm starts existed
        values["training"].pop("init_from", None)
    values.pop("out", None)
    values["ensemble"].pop("members", None)
    posterior = values["posterior"]
    # drawing samples and the Laplace fit come after training
    posterior.pop("samples", None)
    posterior.pop("laplace", None)
    if posterior["kind"] in _TRAINED_LIKE_ENSEMBLE:
        posterior["kind"] = "ensemble"
    return values


def _same_training(saved: Dict, current: Dict) -> bool:
    if "posterior" not in saved and current["posterior"] == {"kind": "ensemble", "swag": None, "ivon": None}:
        # written before posterior kinds existed: an ensemble member
        current = {k: v for k, v in current.items() if k != "posterior"}
    return saved == current


def _ema_update(decay: float):
    """EMA whose decay warms up as min(decay, (1+n)/(10+n)) over the first updates, so the
    average is not dominated by the random initial weights in short runs."""

    def update(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        n = float(num_averaged)
        rate = min(decay, (1.0 + n) / (10.0 + n))
        return rate * averaged + (1.0 - rate) * current

    return update


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_history(history: List[Dict], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(entry) + "\n" for entry in history))
    os.replace(tmp, path)


class SwagCollector:
    """SWAG moments (Maddox et al. 2019) of weight snapshots θ_1..θ_n, flat vectors over
    ``model.parameters()`` (``parameters_to_vector``):

        θ̄_n = (1/n) Σ_t θ_t,   s_n = (1/n) Σ_t θ_t²,   diag = max(s_n − θ̄_n², 0),
        D = [θ_t − θ̄_t] for the last K snapshots (θ̄_t: the mean including θ_t), K = ``rank``.

    The approximate posterior is N(θ̄, diag/2 + D Dᵀ/(2(K−1))); a sample is
    θ = θ̄ + sqrt(diag/2) ⊙ z₁ + D z₂ / sqrt(2(K−1)), z₁ ~ N(0, I_P), z₂ ~ N(0, I_K).
    With fewer than two deviation columns only the diagonal part is used.
    """

    def __init__(self, n_parameters: int, rank: int, dtype: torch.dtype = torch.float64):
        if rank < 1:
            raise ValueError(f"SWAG rank must be >= 1, got {rank}")
        self.rank = int(rank)
        self.count = 0
        self.mean = torch.zeros(n_parameters, dtype=dtype)
        self.sq_mean = torch.zeros(n_parameters, dtype=dtype)
        self.deviations = torch.zeros((0, n_parameters), dtype=dtype)  # [K, P], oldest first

    @torch.no_grad()
    def collect(self, weights: torch.Tensor) -> None:
        weights = weights.detach().to(self.mean.dtype).reshape(-1)
        if weights.shape != self.mean.shape:
            raise ValueError(f"SWAG snapshot has {weights.numel()} entries, expected {self.mean.numel()}")
        self.count += 1
        self.mean += (weights - self.mean) / self.count
        self.sq_mean += (weights * weights - self.sq_mean) / self.count
        deviation = (weights - self.mean).unsqueeze(0)
        self.deviations = torch.cat([self.deviations, deviation])[-self.rank:]

    @property
    def diagonal_variance(self) -> torch.Tensor:
        return torch.clamp(self.sq_mean - self.mean.pow(2), min=0.0)

    def covariance(self) -> torch.Tensor:
        """The dense P×P covariance diag/2 + DᵀD/(2(K−1)) (for tests on small P)."""
        covariance = torch.diag(self.diagonal_variance / 2.0)
        k = self.deviations.shape[0]
        if k >= 2:
            covariance = covariance + self.deviations.T @ self.deviations / (2.0 * (k - 1))
        return covariance

    @torch.no_grad()
    def sample(self, generator: torch.Generator) -> torch.Tensor:
        if self.count == 0:
            raise RuntimeError("SWAG has collected no snapshots to sample around")
        z_diagonal = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype)
        sample = self.mean + torch.sqrt(self.diagonal_variance / 2.0) * z_diagonal
        k = self.deviations.shape[0]
        if k >= 2:
            z_low_rank = torch.randn(k, generator=generator, dtype=self.mean.dtype)
            sample = sample + (self.deviations.T @ z_low_rank) / math.sqrt(2.0 * (k - 1))
        return sample

    def state_dict(self) -> Dict:
        return dict(rank=self.rank, count=self.count, mean=self.mean.clone(), sq_mean=self.sq_mean.clone(),
                    deviations=self.deviations.clone())

    @classmethod
    def from_state_dict(cls, state: Dict) -> "SwagCollector":
        collector = cls(state["mean"].numel(), state["rank"], state["mean"].dtype)
        collector.count = int(state["count"])
        collector.mean = state["mean"].clone()
        collector.sq_mean = state["sq_mean"].clone()
        collector.deviations = state["deviations"].clone()
        return collector


def _make_optimizer(config: Config, model: RACE) -> torch.optim.Optimizer:
    """The member's Adam/AdamW (also the warm start of posterior kind ivon)."""
    training = config.training
    optimizer_cls = torch.optim.AdamW if training.optimizer == "adamw" else torch.optim.Adam
    return optimizer_cls(model.parameters(), lr=training.lr, weight_decay=training.weight_decay)


def default_ivon_ess(graphs: List[Graph]) -> float:
    """Half the number of training atoms: the force term of the NLL losses is twice the mean
    per-atom force NLL, so the data's total force NLL is (N_atoms/2)·loss, and IVON's
    posterior exp(−ess·loss) is the Bayesian one with ess = N_atoms/2."""
    return 0.5 * sum(len(graph.species) for graph in graphs)


def _make_ivon_optimizer(config: Config, model: RACE, data: TrainingData):
    import ivon as ivon_package

    settings = config.posterior.ivon
    return ivon_package.IVON(
        model.parameters(),
        lr=settings.lr,
        ess=float(settings.ess if settings.ess is not None else default_ivon_ess(data.train)),
        hess_init=settings.hess_init,
        beta1=settings.beta1,
        beta2=settings.beta2,
        weight_decay=settings.weight_decay,
        mc_samples=settings.train_samples,
        clip_radius=settings.clip_radius if settings.clip_radius is not None else math.inf,
    )


def _make_scheduler(config: Config, optimizer) -> torch.optim.lr_scheduler.ReduceLROnPlateau:
    training = config.training
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=training.lr_factor, patience=training.lr_patience, min_lr=training.min_lr
    )


def _ivon_training_step(model: RACE, optimizer, batch: Dict, loss_fn, config: Config) -> torch.Tensor:
    """One IVON step: the gradient averaged over ``train_samples`` weight samples."""
    losses = []
    for _ in range(config.posterior.ivon.train_samples):
        with optimizer.sampled_params(train=True):
            optimizer.zero_grad(set_to_none=False)
            pred = model(batch)
            loss = loss_fn(pred, batch, config.loss.energy_weight, config.loss.force_weight)
            if torch.isfinite(loss):
                loss.backward()
            for parameter in model.parameters():  # IVON reads every parameter's gradient
                if parameter.grad is None:
                    parameter.grad = torch.zeros_like(parameter)
        losses.append(loss.detach())
    mean_loss = torch.stack(losses).mean()
    if torch.isfinite(mean_loss):  # otherwise the caller stops with an error
        optimizer.step()
    return mean_loss


def evaluate_loss(model: torch.nn.Module, graphs: List[Graph], config: Config, loss_kind: str) -> Dict[str, float]:
    """Mean loss and energy/force RMSE of a model on graphs (in eval mode)."""
    was_training = model.training
    model.eval()
    loss_fn = loss_function(loss_kind)
    total_loss, n_structures = 0.0, 0
    energy_sq, n_energy, force_sq, n_force = 0.0, 0, 0.0, 0
    for batch in iterate_batches(graphs, config.training.batch_size, shuffle=False, dtype=config.torch_dtype):
        pred = model(batch)
        b = batch[keys.NUM_ATOMS].shape[0]
        total_loss += float(loss_fn(pred, batch, config.loss.energy_weight, config.loss.force_weight).detach()) * b
        n_structures += b
        energy_sq += float(((pred[keys.ENERGY] - batch[keys.ENERGY]).detach() / batch[keys.NUM_ATOMS]).pow(2).sum())
        n_energy += b
        force_sq += float((pred[keys.FORCES] - batch[keys.FORCES]).detach().pow(2).sum())
        n_force += batch[keys.FORCES].numel()
    model.train(was_training)
    return {
        "loss": total_loss / max(n_structures, 1),
        "energy_rmse_per_atom": math.sqrt(energy_sq / max(n_energy, 1)),
        "force_rmse": math.sqrt(force_sq / max(n_force, 1)),
    }


class _Progress:
    """A tqdm bar when one process trains; a line per epoch (at most every 10 s) under MPI."""

    def __init__(self, member: int, total: int, start: int, enabled: bool, use_bar: bool):
        self.enabled = enabled
        self.member = member
        self.bar = None
        self.last_line = 0.0
        if enabled and use_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc=f"member {member}", unit="epoch", dynamic_ncols=True)

    def update(self, entry: Dict) -> None:
        if not self.enabled:
            return
        summary = dict(
            train=f"{entry['train_loss']:.3g}",
            valid=f"{entry['valid_loss']:.3g}",
            E=f"{1000 * entry['valid_energy_rmse_per_atom']:.2f}meV/at",
            F=f"{1000 * entry['valid_force_rmse']:.1f}meV/Å",
        )
        if self.bar is not None:
            self.bar.set_postfix(summary, refresh=False)
            self.bar.update(1)
        elif time.time() - self.last_line > 10.0:
            self.last_line = time.time()
            print(f"member {self.member} epoch {entry['epoch']}: " + " ".join(f"{k}={v}" for k, v in summary.items()),
                  flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _finished(state: Dict, config: Config) -> bool:
    """Recomputed from the saved state, so a resumed run may be given more epochs or time.
    SWAG has no early stopping, and IVON none before its phase: stagnation starts that
    phase instead (whose clocks start afresh, so IVON trains at least one epoch)."""
    training = config.training
    out_of_time = training.max_minutes is not None and state["elapsed"] > 60.0 * training.max_minutes
    stale = state["stale_epochs"] >= training.early_stopping_patience and state["epoch"] > mse_warmup_epochs(config)
    ivon_waiting = config.posterior.kind == "ivon" and state.get("ivon_start_epoch") is None
    early_stop = stale and config.posterior.kind != "swag" and not ivon_waiting
    return out_of_time or early_stop or state["epoch"] >= training.max_epochs


def _swag_should_start(state: Dict, config: Config) -> bool:
    if config.posterior.kind != "swag" or state.get("swag") is not None:
        return False
    stale = (state["stale_epochs"] >= config.training.early_stopping_patience
             and state["epoch"] > mse_warmup_epochs(config))
    return state["epoch"] >= config.posterior.swag.start_epoch or stale


def _ivon_should_start(state: Dict, config: Config) -> bool:
    """Like :func:`_swag_should_start`: at ivon.start_epoch, or when the warm start stagnates."""
    if config.posterior.kind != "ivon" or state.get("ivon_start_epoch") is not None:
        return False
    stale = (state["stale_epochs"] >= config.training.early_stopping_patience
             and state["epoch"] > mse_warmup_epochs(config))
    return state["epoch"] >= config.posterior.ivon.resolved_start_epoch(config.training.max_epochs) or stale


def _start_ivon(model: RACE, state: Dict, config: Config, data: TrainingData):
    """Enter the IVON phase: the best validated (EMA) weights of the warm start become IVON's
    mean (the weights an MVE member stopped here would keep); a fresh IVON optimizer and
    plateau schedule; best-loss and early-stopping clocks restart, so what is kept is an
    IVON epoch with its Hessian."""
    if state["best_state"] is not None:
        model.load_state_dict(state["best_state"])
    optimizer = _make_ivon_optimizer(config, model, data)
    state.update(ivon_start_epoch=state["epoch"], best_loss=math.inf, stale_epochs=0)
    return optimizer, _make_scheduler(config, optimizer)


def _say(message: str, bar: "_Progress") -> None:
    if not bar.enabled:
        return
    if bar.bar is not None:
        bar.bar.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr, flush=True)


def train_member(
    config: Config, data: TrainingData, member: int, progress: bool = True, use_bar: bool = True
) -> Path:
    """Train (or resume) one member; returns its checkpoint path.

    For posterior kind swag the collection phase is part of this training; for ivon the
    warm start and the IVON phase (its Gaussian's mean is what gets validated and kept).
    The checkpoint names the optimizer whose state it holds (``optimizer_kind``)."""
    member_dir = Path(config.out) / f"member_{member}"
    member_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = member_dir / CHECKPOINT
    training = config.training
    kind = config.posterior.kind

    # a warm start (training.init_from) only where there is no checkpoint to resume
    model = (_new_member_model if checkpoint_path.exists() else initial_member_model)(config, data, member)
    model.train()
    optimizer = _make_optimizer(config, model)
    scheduler = _make_scheduler(config, optimizer)
    ema = AveragedModel(model, avg_fn=_ema_update(training.ema_decay), use_buffers=True) \
        if training.ema_decay > 0 else None
    state = dict(epoch=0, best_loss=math.inf, best_state=None, stale_epochs=0, history=[], elapsed=0.0)
    seed = _member_seed(config, member)
    rng_state = None

    if checkpoint_path.exists():
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        if not _same_training(checkpoint["config"], _comparable_config(config)):
            raise RuntimeError(
                f"{checkpoint_path}: this checkpoint was written with a different config; "
                f"use another 'out' directory or delete {member_dir} to start over"
            )
        model.load_state_dict(checkpoint["model"])
        if _checkpoint_optimizer_kind(checkpoint) == "ivon":
            optimizer = _make_ivon_optimizer(config, model, data)
            scheduler = _make_scheduler(config, optimizer)
            optimizer.load_state_dict(checkpoint["optimizer"])
            optimizer.current_step = checkpoint["ivon_step"]  # IVON's bias correction; not in its state_dict
            ema = None  # the IVON phase has none
        else:
            optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if ema is not None:
            ema.load_state_dict(checkpoint["ema"])
        state = checkpoint["state"]
        rng_state = checkpoint.get("rng_state")
    if _finished(state, config):
        return checkpoint_path

    bar = _Progress(member, training.max_epochs, state["epoch"], progress, use_bar)
    started = time.time() - state["elapsed"]
    swag = SwagCollector.from_state_dict(state["swag"]) if state.get("swag") is not None else None
    # IVON samples weights from torch's global generator: seeded per member, saved with every
    # checkpoint and restored on resumption, and the caller's generator is left untouched
    with torch.random.fork_rng(devices=[]):
        if rng_state is None:
            torch.manual_seed(seed)
        else:
            torch.set_rng_state(rng_state)
        try:
            while state["epoch"] < training.max_epochs:
                epoch = state["epoch"]
                loss_kind = "mse" if epoch < mse_warmup_epochs(config) else config.loss.kind
                loss_fn = loss_function(loss_kind)
                if epoch == mse_warmup_epochs(config) and mse_warmup_epochs(config) > 0:
                    # the loss changes meaning: restart the plateau and early-stopping clocks
                    state["best_loss"], state["stale_epochs"] = math.inf, 0
                    scheduler.best = scheduler.mode_worse
                if _ivon_should_start(state, config):
                    optimizer, scheduler = _start_ivon(model, state, config, data)
                    ema = None
                    _say(f"member {member}: IVON takes over at epoch {epoch} (lr {optimizer.param_groups[0]['lr']:.3g}, "
                         f"ess {optimizer.param_groups[0]['ess']:.3g}, hess_init {config.posterior.ivon.hess_init:.3g})",
                         bar)
                ivon_phase = state.get("ivon_start_epoch") is not None
                if _swag_should_start(state, config):
                    swag = _start_swag(model, optimizer, state, config)
                    _say(f"member {member}: SWAG collection starts at epoch {epoch} "
                         f"(lr {state['swag_lr']:.3g}, rank {swag.rank})", bar)
                train_loss, n_batches = 0.0, 0
                for batch in iterate_batches(
                    data.train, training.batch_size, shuffle=True, seed=seed, epoch=epoch, dtype=config.torch_dtype
                ):
                    hint = "posterior.ivon.lr or raise posterior.ivon.hess_init" if ivon_phase else "training.lr"
                    try:
                        if ivon_phase:
                            loss = _ivon_training_step(model, optimizer, batch, loss_fn, config)
                        else:
                            optimizer.zero_grad(set_to_none=True)
                            pred = model(batch)
                            loss = loss_fn(pred, batch, config.loss.energy_weight, config.loss.force_weight)
                    except torch.linalg.LinAlgError as error:  # the force covariance lost positive definiteness
                        raise FloatingPointError(
                            f"member {member}, epoch {epoch}: {error}; lower {hint} or use loss.mse_warmup_epochs"
                        ) from error
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"member {member}, epoch {epoch}: training loss became {float(loss)}; "
                            f"lower {hint} or use loss.mse_warmup_epochs"
                        )
                    if not ivon_phase:
                        loss.backward()
                        if training.grad_clip > 0:
                            torch.nn.utils.clip_grad_norm_(model.parameters(), training.grad_clip)
                        optimizer.step()
                    if ema is not None:
                        ema.update_parameters(model)
                    if swag is not None:
                        state["swag_steps"] += 1
                        every = config.posterior.swag.collect_every
                        if every is not None and state["swag_steps"] % every == 0:
                            swag.collect(parameters_to_vector(model.parameters()))
                    train_loss += float(loss.detach())
                    n_batches += 1
                if swag is not None:
                    if config.posterior.swag.collect_every is None:
                        swag.collect(parameters_to_vector(model.parameters()))
                    state["swag"] = swag.state_dict()
                    # monitor the SWA mean; the learning rate stays constant and nothing stops early
                    valid = evaluate_loss(_with_weights(model, swag.mean), data.valid, config, loss_kind)
                else:
                    evaluated = ema.module if ema is not None else model
                    valid = evaluate_loss(evaluated, data.valid, config, loss_kind)
                    scheduler.step(valid["loss"])
                    improved = valid["loss"] < state["best_loss"]
                    if improved:
                        state["best_loss"] = valid["loss"]
                        state["best_state"] = {k: v.detach().clone() for k, v in evaluated.state_dict().items()}
                        if ivon_phase:
                            state["best_ivon_hess"] = [group["hess"].clone() for group in optimizer.param_groups]
                        state["stale_epochs"] = 0
                    else:
                        state["stale_epochs"] += 1
                state["epoch"] = epoch + 1
                state["elapsed"] = time.time() - started
                entry = dict(
                    epoch=epoch + 1,
                    loss_kind=loss_kind,
                    train_loss=train_loss / max(n_batches, 1),
                    valid_loss=valid["loss"],
                    valid_energy_rmse_per_atom=valid["energy_rmse_per_atom"],
                    valid_force_rmse=valid["force_rmse"],
                    lr=optimizer.param_groups[0]["lr"],
                    elapsed_s=state["elapsed"],
                )
                if kind == "ivon":
                    entry["optimizer"] = "ivon" if ivon_phase else training.optimizer
                if swag is not None:
                    entry["swag_snapshots"] = swag.count
                state["history"].append(entry)
                _atomic_save(
                    dict(
                        config=_comparable_config(config),
                        model=model.state_dict(),
                        ema=ema.state_dict() if ema is not None else None,
                        optimizer=optimizer.state_dict(),
                        optimizer_kind="ivon" if ivon_phase else training.optimizer,
                        ivon_step=getattr(optimizer, "current_step", None),
                        scheduler=scheduler.state_dict(),
                        state=state,
                        rng_state=torch.get_rng_state(),
                    ),
                    checkpoint_path,
                )
                _write_history(state["history"], member_dir / METRICS_LOG)
                bar.update(entry)
                if _finished(state, config):
                    break
        finally:
            bar.close()
    return checkpoint_path


def _checkpoint_optimizer_kind(checkpoint: Dict) -> str:
    """Which optimizer's state a checkpoint holds; those written before ``optimizer_kind``
    existed hold IVON's exactly when they have an IVON step count."""
    if "optimizer_kind" in checkpoint:
        return checkpoint["optimizer_kind"]
    return "ivon" if checkpoint.get("ivon_step") is not None else "adam"


def _start_swag(model: RACE, optimizer: torch.optim.Optimizer, state: Dict, config: Config) -> SwagCollector:
    """Enter the SWAG phase: a constant learning rate and empty moments (recorded in state)."""
    settings = config.posterior.swag
    lr = settings.lr if settings.lr is not None else optimizer.param_groups[0]["lr"]
    for group in optimizer.param_groups:
        group["lr"] = lr
    n_parameters = sum(p.numel() for p in model.parameters())
    swag = SwagCollector(n_parameters, settings.rank, dtype=next(model.parameters()).dtype)
    state.update(swag=swag.state_dict(), swag_steps=0, swag_start_epoch=state["epoch"], swag_lr=lr)
    return swag


def _with_weights(model: RACE, weights: torch.Tensor) -> RACE:
    """A copy of model whose parameters are the flat vector weights."""
    copied = copy.deepcopy(model)
    with torch.no_grad():
        vector_to_parameters(weights.to(next(copied.parameters()).dtype), copied.parameters())
    return copied


def _load_checkpoint(config: Config, member: int) -> Dict:
    path = Path(config.out) / f"member_{member}" / CHECKPOINT
    if not path.is_file():
        raise RuntimeError(f"{path}: no checkpoint (member {member} was not trained)")
    return torch.load(path, map_location="cpu", weights_only=False)


def best_member_model(config: Config, data: TrainingData, member: int) -> RACE:
    checkpoint = _load_checkpoint(config, member)
    model = _new_member_model(config, data, member)
    best = checkpoint["state"]["best_state"]
    if best is None:
        raise RuntimeError(f"member {member} has no validated weights yet (no epoch finished)")
    model.load_state_dict(best)
    model.set_trained_heads(TRAINED_HEADS[config.loss.kind])
    return model.eval()


def swag_members(config: Config, data: TrainingData, member: int = 0) -> Tuple[List[RACE], Dict]:
    """posterior.samples weight sets drawn from the SWAG moments in the member's checkpoint
    (seeded by the member's seed)."""
    state = _load_checkpoint(config, member)["state"]
    if state.get("swag") is None or state["swag"]["count"] == 0:
        raise RuntimeError(
            f"member {member}: SWAG collected no snapshots (training ended at epoch {state['epoch']} before "
            f"posterior.swag.start_epoch {config.posterior.swag.start_epoch}); give it more epochs or time"
        )
    swag = SwagCollector.from_state_dict(state["swag"])
    model = _new_member_model(config, data, member)
    model.set_trained_heads(TRAINED_HEADS[config.loss.kind])
    generator = torch.Generator().manual_seed(_member_seed(config, member))
    members = [_with_weights(model, swag.sample(generator)).eval() for _ in range(config.posterior.samples)]
    summary = dict(snapshots=swag.count, rank=int(swag.deviations.shape[0]), start_epoch=state["swag_start_epoch"],
                   lr=state["swag_lr"], steps=state["swag_steps"])
    return members, summary


def ivon_members(config: Config, data: TrainingData, member: int = 0) -> Tuple[List[RACE], Dict]:
    """posterior.samples weight sets from IVON's Gaussian N(m, 1/(ess·(h + δ))) at the best
    validated epoch (mean m, Hessian h of that epoch; δ = weight_decay), seeded by the member's seed."""
    state = _load_checkpoint(config, member)["state"]
    if state.get("best_ivon_hess") is None:
        raise RuntimeError(
            f"member {member}: IVON never trained (training ended at epoch {state['epoch']} before "
            f"posterior.ivon.start_epoch {config.posterior.ivon.resolved_start_epoch(config.training.max_epochs)}); "
            "give it more epochs or time"
        )
    model = best_member_model(config, data, member)
    optimizer = _make_ivon_optimizer(config, model, data)
    for group, hess in zip(optimizer.param_groups, state["best_ivon_hess"]):
        group["hess"] = hess.clone()
    members = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_member_seed(config, member))
        for _ in range(config.posterior.samples):
            with optimizer.sampled_params():
                members.append(copy.deepcopy(model).eval())
    group = optimizer.param_groups[0]
    hess = torch.cat([h.reshape(-1) for h in state["best_ivon_hess"]])
    weight_std = 1.0 / torch.sqrt(group["ess"] * (hess + group["weight_decay"]))
    summary = dict(ess=float(group["ess"]), start_epoch=state.get("ivon_start_epoch", 0),
                   best_epoch_loss=float(state["best_loss"]),
                   mean_weight_std=float(weight_std.mean()), max_weight_std=float(weight_std.max()))
    return members, summary


def laplace_members(config: Config, data: TrainingData, member: int = 0, progress: bool = False
                    ) -> Tuple[List[RACE], Dict]:
    """A last-layer Laplace approximation around the trained member and its antithetic samples."""
    from ..bayes import fit_last_layer_laplace, sample_members

    settings = config.posterior.laplace
    model = best_member_model(config, data, member)
    graphs = data.train
    if settings.max_structures is not None and settings.max_structures < len(graphs):
        chosen = np.random.default_rng(config.seed).permutation(len(graphs))[: settings.max_structures]
        graphs = [graphs[k] for k in sorted(chosen)]
    laplace = fit_last_layer_laplace(
        model, graphs, batch_size=settings.batch_size, prior_precision=settings.prior_precision, progress=progress
    )
    members = sample_members(model, laplace, n_samples=config.posterior.samples, seed=_member_seed(config, member))
    summary = laplace.summary() if hasattr(laplace, "summary") else {}
    return list(members), summary


def posterior_members(config: Config, data: TrainingData, progress: bool = False) -> Tuple[List[RACE], Dict]:
    """The members of the configured posterior kind from the trained checkpoints, and the
    extra fields of its record (a summary under the kind's name for swag, ivon, laplace)."""
    kind = config.posterior.kind
    if kind == "ensemble":
        return [best_member_model(config, data, m) for m in range(config.n_members)], {}
    if kind == "mve":
        return [best_member_model(config, data, 0)], {}
    draw = dict(swag=swag_members, ivon=ivon_members)
    if kind in draw:
        members, summary = draw[kind](config, data)
    else:
        members, summary = laplace_members(config, data, progress=progress)
    if progress:
        print(f"bayesrace train: drew {len(members)} weight sets from the {kind} posterior", file=sys.stderr,
              flush=True)
    return members, {kind: summary}


def train_under_mpirun(config_path, ranks: int, quiet: bool = False) -> None:
    """``bayesrace train config_path`` as ``mpirun -np ranks`` child processes (ensemble members
    spread over the ranks, one torch thread each); raises RuntimeError naming the command if
    it fails (the trainer's own message is on stderr above it)."""
    import subprocess

    from .._mpi import mpirun_executable

    command = [mpirun_executable(), "-np", str(int(ranks)), sys.executable, "-m", "bayesrace.cli", "train",
               str(config_path)] + (["--quiet"] if quiet else [])
    if subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode != 0:
        raise RuntimeError(f"training failed (see its message above); command: {' '.join(command)}")


def train_config_file(config: Config, path) -> Path:
    """Write ``config`` as the YAML that ``bayesrace train`` reads back to the same Config."""
    import yaml

    path = Path(path)
    path.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    return path


def mse_warmup_epochs(config: Config) -> int:
    """MSE epochs before the configured loss; none on a warm start (training.init_from), whose
    variance heads are already trained: a warm-up there moves the means while the variances
    stay put, and the switch back to the NLL then spikes the loss."""
    return 0 if config.training.init_from else config.loss.mse_warmup_epochs


def train(config: Config, progress: bool = True) -> Path:
    """Train the configured posterior (resuming where checkpoints exist); write posterior.pt.

    Under mpirun, ensemble members are spread over the ranks; the other kinds train one
    model on rank 0 while the other ranks wait."""
    comm, rank, size = mpi_world()
    torch.set_num_threads(config.training.threads)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (out / "config.json").write_text(json.dumps(config_to_dict(config), indent=2))
    data = prepare_data(config, progress=False)
    kind = config.posterior.kind
    if rank == 0 and progress:
        what = f"{config.n_members} member(s)" if kind == "ensemble" else "one model"
        print(
            f"bayesrace train: posterior {kind}, {len(data.train)} training / {len(data.valid)} validation "
            f"structures, types {data.type_names}, {what} on {size} process(es), "
            f"avg neighbours {data.avg_num_neighbors:.1f}",
            file=sys.stderr,
            flush=True,
        )
    for member in range(rank, config.n_members, size):
        train_member(config, data, member, progress=progress, use_bar=size == 1)
    if comm is not None:
        comm.Barrier()
    path = out / POSTERIOR_FILE
    if rank == 0:
        members, extra = posterior_members(config, data, progress=progress)
        save_posterior(
            path,
            members,
            kind=kind,
            config=config_to_dict(config),
            data_sha256=data.data_sha256,
            **extra,
        )
    if comm is not None:
        comm.Barrier()
    return path


__all__ = [
    "TrainingData",
    "SwagCollector",
    "prepare_data",
    "train_member",
    "initial_member_model",
    "train",
    "posterior_members",
    "evaluate_loss",
    "load_posterior",
]
