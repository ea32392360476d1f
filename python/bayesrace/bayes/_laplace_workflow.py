"""The last-layer Laplace posterior as a workflow, from fit to saved file.

``fit_laplace_members`` is the step every Laplace posterior goes through: fit around one
trained member, then draw its members in antithetic pairs (posterior kind ``laplace`` of
``train`` runs it on the member it trained). ``laplace_posterior_file`` is the post-hoc
version that ``bayesrace laplace`` runs: around member ``member`` of a saved posterior,
fitted on a labelled structure file, written as a posterior of kind ``laplace``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from .. import keys
from ..data import Graph, TypeMap, frames_to_graphs, iterate_batches, read_frames
from ..model import RACE
from ._laplace import (
    LastLayerLaplace,
    fit_last_layer_laplace,
    predictive_covariance,
    sample_members,
)
from ._feature_density import training_feature_density
from ._posterior import load_posterior, save_posterior

_SIGMA_BATCH_SIZE = 8  # structures per batch when summarising the fitted σ's


def fit_laplace_members(
    model: RACE,
    graphs: Sequence[Graph],
    n_samples: int,
    seed: int,
    batch_size: int = 8,
    prior_precision: Optional[float] = None,
    progress: bool = False,
) -> Tuple[List[RACE], LastLayerLaplace]:
    """The last-layer Laplace posterior of ``model`` fitted on ``graphs`` and ``n_samples``
    members drawn from it in antithetic pairs (seeded by ``seed``)."""
    laplace = fit_last_layer_laplace(
        model, graphs, batch_size=batch_size, prior_precision=prior_precision, progress=progress
    )
    return sample_members(model, laplace, n_samples, seed=seed), laplace


def mean_epistemic_force_std(model: RACE, laplace: LastLayerLaplace, graphs: Sequence[Graph]) -> float:
    """The Laplace epistemic force σ (eV/Å) averaged over the atoms of ``graphs``."""
    sigma_sum, n_atoms = 0.0, 0
    for batch in iterate_batches(list(graphs), _SIGMA_BATCH_SIZE, shuffle=False, dtype=next(model.parameters()).dtype):
        sigma = predictive_covariance(model, laplace, batch)[keys.ATOMIC_FORCE_STD_EPISTEMIC]
        sigma_sum += float(sigma.sum())
        n_atoms += sigma.numel()
    return sigma_sum / max(n_atoms, 1)


@dataclasses.dataclass
class LaplacePosteriorFile:
    """What ``laplace_posterior_file`` fitted and wrote."""

    laplace: LastLayerLaplace
    n_members: int
    mean_epistemic_force_std: float  # eV/Å, over the atoms of the fitting structures
    path: Path


def laplace_posterior_file(
    posterior_path: os.PathLike | str,
    train_file: os.PathLike | str,
    out: os.PathLike | str,
    member: int = 0,
    n_samples: int = 8,
    prior_precision: Optional[float] = None,
    max_structures: Optional[int] = None,
    seed: int = 0,
    progress: bool = False,
) -> LaplacePosteriorFile:
    """Fit the last-layer Laplace posterior of member ``member`` of the posterior at
    ``posterior_path`` on the labelled structures of ``train_file`` (those with more than
    one atom, the first ``max_structures`` of them), draw ``n_samples`` members and write
    them to ``out`` as a posterior of kind ``laplace`` that keeps the source's config and
    data hash and records where it came from.

    Raises IndexError (its message names the valid members) for a member the posterior
    does not have, ValueError for an unreadable posterior, data without a structure to fit
    on, or a fit that fails."""
    source = load_posterior(posterior_path)
    if not 0 <= member < len(source.members):
        raise IndexError(f"{posterior_path} has members 0..{len(source.members) - 1}")
    model = source.members[member]
    info = getattr(source, "record_info", {})
    source_config = info.get("config") if isinstance(info.get("config"), dict) else {}
    data_keys = source_config.get("data") or {}  # label keys the member was trained with
    frames = read_frames(
        train_file,
        energy_key=data_keys.get("energy_key", "energy"),
        forces_key=data_keys.get("forces_key", "forces"),
    )
    frames = [f for f in frames if len(f.numbers) > 1]  # isolated atoms carry no forces
    if max_structures is not None:
        frames = frames[:max_structures]
    if not frames:
        raise ValueError(f"{train_file}: no structures with more than one atom to fit on")
    graphs = frames_to_graphs(frames, TypeMap(model.type_names), model.cutoff)
    members, laplace = fit_laplace_members(
        model, graphs, n_samples, seed, prior_precision=prior_precision, progress=progress
    )
    sigma = mean_epistemic_force_std(model, laplace, graphs)
    save_posterior(
        out,
        members,
        kind="laplace",
        laplace=laplace.summary(),
        data_sha256=info.get("data_sha256"),
        config=info.get("config"),
        shortest_contacts=info.get("shortest_contacts"),
        feature_density=training_feature_density(members, graphs),
        laplace_source={"posterior": str(Path(posterior_path).resolve()), "member": member,
                        "train_file": str(Path(train_file).resolve()), "structures": len(graphs)},
    )
    return LaplacePosteriorFile(laplace=laplace, n_members=len(members), mean_epistemic_force_std=sigma,
                                path=Path(out))
