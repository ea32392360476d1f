"""Posterior predictions over frames as numpy arrays, and the names and σ's read from them.

``predict_frames`` runs a posterior over frames and returns numpy arrays named by
``bayesrace.keys`` (references from the frames under ``reference_key(...)``);
``energy_std`` is the per-structure energy σ of such a prediction, sqrt(epistemic +
aleatoric variance) or one part of it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Dict, List, Mapping, Sequence

import numpy as np
import torch

from .. import keys
from ..bayes import Posterior
from ..data import Frame, TypeMap, frames_to_graphs, iterate_batches

REFERENCE_PREFIX = "reference_"

# fields of the posterior's prediction gathered by predict_frames, by how batches join
_PER_STRUCTURE_FIELDS = (keys.ENERGY, keys.ENERGY_VAR_EPISTEMIC, keys.ENERGY_VAR_ALEATORIC)
_PER_ATOM_FIELDS = (
    keys.FORCES,
    keys.FORCE_COV_EPISTEMIC,
    keys.FORCE_COV_ALEATORIC,
    keys.ATOMIC_FORCE_STD,
    keys.ATOMIC_FORCE_STD_EPISTEMIC,
    keys.ATOMIC_FORCE_STD_ALEATORIC,
    keys.ATOMIC_ENERGY,
    keys.ATOMIC_ENERGY_STD,
)
_PER_MEMBER_FIELDS = (keys.MEMBER_ENERGY, keys.MEMBER_FORCES)  # [M, ...]: joined along axis 1


def reference_key(field: str) -> str:
    """Name under which ``predict_frames`` stores the reference value of ``field``."""
    return REFERENCE_PREFIX + field


def energy_std(prediction: Mapping[str, np.ndarray], part: str = "total") -> np.ndarray:
    """Per-structure energy σ (eV): ``part`` is "total", "epistemic" or "aleatoric"."""
    epistemic = prediction[keys.ENERGY_VAR_EPISTEMIC]
    aleatoric = prediction[keys.ENERGY_VAR_ALEATORIC]
    variances = {"total": epistemic + aleatoric, "epistemic": epistemic, "aleatoric": aleatoric}
    if part not in variances:
        raise ValueError(f"energy_std: part must be one of {sorted(variances)}, got {part!r}")
    return np.sqrt(variances[part])


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()


def predict_frames(
    posterior: Posterior,
    frames: Sequence[Frame],
    batch_size: int = 16,
    dtype: torch.dtype = torch.float64,
    progress: bool = False,
    progress_label: str = "predict",
) -> Dict[str, np.ndarray]:
    """Posterior predictions for ``frames``, concatenated over batches, as numpy arrays.

    Per structure [B]: ENERGY, ENERGY_VAR_EPISTEMIC, ENERGY_VAR_ALEATORIC, NUM_ATOMS.
    Per atom [N, ...]: FORCES, FORCE_COV_EPISTEMIC, FORCE_COV_ALEATORIC, ATOMIC_FORCE_STD
    (and _EPISTEMIC, _ALEATORIC), ATOMIC_ENERGY, ATOMIC_ENERGY_STD, ATOMIC_NUMBERS and
    BATCH (index of the atom's frame). Per member: MEMBER_ENERGY [M, B], MEMBER_FORCES
    [M, N, 3]. ``reference_key(keys.ENERGY)`` [B] and ``reference_key(keys.FORCES)``
    [N, 3] are present when every frame carries that label.
    """
    if not frames:
        raise ValueError("predict_frames: no frames")
    parameter = next(posterior.parameters())
    if parameter.dtype != dtype:
        raise ValueError(
            f"predict_frames: the posterior is {parameter.dtype} but dtype is {dtype}; "
            "pass the posterior's dtype or convert it with posterior.to(dtype)"
        )
    device = parameter.device
    from tqdm.auto import tqdm

    graphs = frames_to_graphs(frames, TypeMap(posterior.type_names), posterior.cutoff)
    chunks: Dict[str, List[np.ndarray]] = defaultdict(list)
    was_training = posterior.training
    posterior.eval()
    try:
        batches = iterate_batches(graphs, batch_size, shuffle=False, dtype=dtype)
        n_batches = math.ceil(len(graphs) / batch_size)
        structures_before = 0
        for batch in tqdm(batches, total=n_batches, desc=progress_label, unit="batch", disable=not progress):
            batch = {name: value.to(device) for name, value in batch.items()}
            # forces come from autograd, so no torch.no_grad; every output is detached
            out = posterior(batch)
            for field in _PER_STRUCTURE_FIELDS + _PER_ATOM_FIELDS + _PER_MEMBER_FIELDS:
                chunks[field].append(_to_numpy(out[field]))
            if keys.ATOMIC_FEATURE_DISTANCE in out:  # a posterior with a feature density
                chunks[keys.ATOMIC_FEATURE_DISTANCE].append(_to_numpy(out[keys.ATOMIC_FEATURE_DISTANCE]))
            chunks[keys.NUM_ATOMS].append(_to_numpy(batch[keys.NUM_ATOMS]))
            chunks[keys.ATOMIC_NUMBERS].append(_to_numpy(batch[keys.ATOMIC_NUMBERS]))
            chunks[keys.BATCH].append(_to_numpy(batch[keys.BATCH]) + structures_before)
            structures_before += int(batch[keys.NUM_ATOMS].shape[0])
    finally:
        posterior.train(was_training)

    prediction = {
        field: np.concatenate(parts, axis=1 if field in _PER_MEMBER_FIELDS else 0) for field, parts in chunks.items()
    }
    if all(frame.energy is not None for frame in frames):
        prediction[reference_key(keys.ENERGY)] = np.array([frame.energy for frame in frames], dtype=np.float64)
    if all(frame.forces is not None for frame in frames):
        prediction[reference_key(keys.FORCES)] = np.concatenate([frame.forces for frame in frames]).astype(np.float64)
    return prediction
