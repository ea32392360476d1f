"""The training data of a run: read, validated, split and featurised from the config's
``data`` section, with the normalisation the members start from and the data's hash."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import List, Optional

import numpy as np

from ..data import (
    DataError,
    Graph,
    TypeMap,
    fit_reference_energies,
    frames_to_graphs,
    isolated_atom_energies,
    read_frames,
    split,
)
from ._config import Config


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
