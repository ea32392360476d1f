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
    # with data.n_valid: positions in data.train's file of the frames split off for validation
    # and of those trained on (None when data.valid names a file)
    valid_indices: Optional[List[int]] = None
    train_indices: Optional[List[int]] = None


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
    # single-atom frames (e.g. isolated atoms shipped with a data set) carry no forces to learn
    indexed = [(k, f) for k, f in enumerate(read_frames(data.train, **read)) if len(f.numbers) > 1]
    if data.max_train is not None:
        indexed = indexed[: data.max_train]
    train_indices = valid_indices = None
    if data.valid:
        train_frames, valid_frames = [f for _, f in indexed], read_frames(data.valid, **read)
    else:
        if data.n_valid >= len(indexed):
            raise DataError(
                f"{data.train}: {len(indexed)} frames, cannot split off n_valid={data.n_valid} for validation"
            )
        train_pairs, valid_pairs = split(indexed, data.n_valid, config.seed)
        train_frames, valid_frames = [f for _, f in train_pairs], [f for _, f in valid_pairs]
        train_indices, valid_indices = [k for k, _ in train_pairs], [k for k, _ in valid_pairs]
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
        valid_indices=valid_indices,
        train_indices=train_indices,
    )


HELD_OUT_FILE = "valid_held_out.xyz"
SPLIT_FILE = "split.json"


def write_held_out(config: Config, data: TrainingData, out: Path) -> Optional[Path]:
    """With ``data.n_valid``: the validation frames split off ``data.train``, copied as they
    are in that file to ``out/valid_held_out.xyz`` (what ``bayesrace calibrate`` and
    ``evaluate`` need), and both index lists to ``out/split.json``. Returns the file's path."""
    if data.valid_indices is None:
        return None
    import ase.io

    from .._files import atomic_path, write_json_atomic

    source = config.data.train
    frames = ase.io.read(source, index=":", parallel=False)  # rank 0 alone: no broadcast
    path = out / HELD_OUT_FILE
    with atomic_path(path) as tmp:
        ase.io.write(tmp, [frames[k] for k in data.valid_indices], format="extxyz", parallel=False)
    write_json_atomic(out / SPLIT_FILE, {"source": str(source), "seed": config.seed,
                                         "valid": data.valid_indices, "train": data.train_indices})
    return path
