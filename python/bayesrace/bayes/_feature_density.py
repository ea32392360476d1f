"""Feature density: how far an atom lies from the training atoms in a member's own features.

For each member, an atom's feature vector is the scalar (0e) channels of its node features
after every layer (the invariant features each layer's readout reads), layer after layer.
One Gaussian per species is fitted to the training atoms' vectors (standardised, covariance
plus ``REGULARISATION`` on the diagonal); an atom's **feature distance** is its Mahalanobis
distance under its species' Gaussian, averaged over the members. It needs no second network:
one model's features already separate hot MD and twisted bonds from its training atoms
(bench/feature_distance.py), where its own force σ does not.

A density is stored with the posterior (``Posterior.feature_density``, written at training)
as ``mean`` [M, S, D] and ``whiten`` [M, S, D, D] with d² = ‖(x − mean) · whiten‖²; the
deployable carries the same tensors and the C++ core reports the distance per atom
(``compute bayesrace/atom`` column 7) and its maximum and mean (``compute bayesrace``).
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

import torch

from .. import keys

REGULARISATION = 1e-3  # added to the diagonal of the standardised covariance
MIN_ATOMS = 2  # a species needs at least this many training atoms for a Gaussian
FEATURE_DENSITY_FIELDS = ("mean", "whiten", "training_atoms", "regularisation")


def scalar_channels(member) -> List[List[int]]:
    """Per layer, the indices of the scalar (0e) channels of h_{k+1} (what readout k reads)."""
    channels = []
    for readout in member.readouts:
        irreps = readout.linear_in.irreps_in
        index: List[int] = []
        for part, (_, ir) in zip(irreps.slices(), irreps):
            if ir.l == 0 and ir.p == 1:
                index.extend(range(part.start, part.stop))
        channels.append(index)
    return channels


def feature_columns(member) -> torch.Tensor:
    """[K, F] int64: the scalar channels of every layer, which must be as many in each."""
    channels = scalar_channels(member)
    if len({len(c) for c in channels}) != 1 or not channels[0]:
        raise ValueError(f"the layers have {[len(c) for c in channels]} scalar channels: a feature density "
                         "needs the same non-zero number in every layer")
    return torch.tensor(channels, dtype=torch.int64)


class FeatureCapture:
    """``with FeatureCapture(member) as capture: member(batch)`` keeps the scalar channels each
    readout reads from the member's own forward pass (forward hooks on its readouts), so a
    prediction gets the feature distance without a second pass through the network."""

    def __init__(self, member):
        self.member = member
        self.columns = feature_columns(member)
        self.parts: List[torch.Tensor] = []
        self.handles = []

    def __enter__(self) -> "FeatureCapture":
        for k, readout in enumerate(self.member.readouts):
            self.handles.append(readout.register_forward_hook(self._keeper(k)))
        return self

    def _keeper(self, k: int):
        def keep(module, inputs, output):
            self.parts.append(inputs[0].detach()[:, self.columns[k]])
        return keep

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def features(self) -> torch.Tensor:
        """[N, K·F], layer after layer, of the one forward pass captured."""
        if len(self.parts) != len(self.member.readouts):
            raise RuntimeError(f"captured {len(self.parts)} readout inputs, expected one per layer "
                               f"({len(self.member.readouts)}): capture exactly one forward pass")
        return torch.cat(self.parts, dim=1)


@torch.no_grad()
def atom_features(member, data: Dict[str, torch.Tensor]) -> torch.Tensor:
    """[N, K·F]: the scalar channels of every atom's features after each layer, layer after layer
    (the member's own forward pass, without forces)."""
    with FeatureCapture(member) as capture:
        member(data, compute_forces=False)
    return capture.features()


def fit_feature_density(members: Sequence, graphs: Sequence, batch_size: int = 16,
                        regularisation: float = REGULARISATION) -> Dict[str, object]:
    """The density of ``members``' features over the atoms of ``graphs`` (training structures).

    Returns {mean [M, S, D], whiten [M, S, D, D] (float64), training_atoms [S] (atoms per
    species), regularisation, pooled_species}: a species with fewer than MIN_ATOMS training
    atoms gets the Gaussian of all training atoms pooled (its own would be undefined), and is
    named in ``pooled_species``. Raises ValueError with fewer than MIN_ATOMS atoms in all."""
    from ..data import iterate_batches

    if not graphs:
        raise ValueError("a feature density needs at least one training structure")
    n_species = len(members[0].type_names)
    dtype = members[0].energy_scale.dtype
    per_member: List[torch.Tensor] = []
    batches = list(iterate_batches(list(graphs), batch_size, shuffle=False, dtype=dtype))  # collated once
    for member in members:
        per_member.append(torch.cat([atom_features(member, batch).to(torch.float64) for batch in batches]))
    species_all = torch.cat([batch[keys.SPECIES] for batch in batches])
    counts = torch.bincount(species_all, minlength=n_species)
    if species_all.numel() < MIN_ATOMS:
        raise ValueError(f"a feature density needs at least {MIN_ATOMS} training atoms, got {species_all.numel()}")
    # a species (almost) absent from training is measured against all training atoms pooled
    pooled = [s for s in range(n_species) if int(counts[s]) < MIN_ATOMS]
    width = per_member[0].shape[1]
    mean = torch.zeros(len(members), n_species, width, dtype=torch.float64)
    whiten = torch.zeros(len(members), n_species, width, width, dtype=torch.float64)
    eye = torch.eye(width, dtype=torch.float64)
    for m, features in enumerate(per_member):
        for s in range(n_species):
            x = features if s in pooled else features[species_all == s]
            mu = x.mean(dim=0)
            scale = x.std(dim=0, unbiased=True) + 1e-8
            z = (x - mu) / scale
            covariance = z.T @ z / max(z.shape[0] - 1, 1) + regularisation * eye
            # precision = L Lᵀ: d² = ‖z L‖² = ‖(x − mu) diag(1/scale) L‖²
            factor = torch.linalg.cholesky(torch.linalg.inv(covariance))
            mean[m, s] = mu
            whiten[m, s] = factor / scale[:, None]
    return {"mean": mean, "whiten": whiten, "training_atoms": [int(c) for c in counts],
            "regularisation": float(regularisation), "pooled_species": [members[0].type_names[s] for s in pooled]}


def fit_feature_density_on_file(posterior, path) -> Dict[str, object]:
    """``fit_feature_density`` of ``posterior``'s members on the structures of ``path`` (its
    training file; labels are not read)."""
    from ..data import TypeMap, frames_to_graphs, read_frames

    frames = read_frames(path, require_energy=False, require_forces=False)
    graphs = frames_to_graphs(frames, TypeMap(posterior.type_names), posterior.cutoff)
    return fit_feature_density(list(posterior.members), graphs)


def training_feature_density(members: Sequence, graphs: Sequence) -> Optional[Dict[str, object]]:
    """``fit_feature_density`` on the training structures, or None (with a warning on stderr)
    when it cannot be fitted: the posterior is then written without one."""
    import sys

    try:
        return fit_feature_density(members, graphs)
    except ValueError as error:
        print(f"bayesrace: no feature density for this posterior: {error}", file=sys.stderr, flush=True)
        return None


def validate_feature_density(value: Optional[Mapping], n_members: int, n_species: int,
                             width: Optional[int] = None) -> Optional[Dict[str, object]]:
    """``value`` checked against the posterior (None passes through); ValueError names the field."""
    if value is None:
        return None
    missing = [f for f in FEATURE_DENSITY_FIELDS if f not in value]
    if missing:
        raise ValueError(f"feature_density lacks {missing}")
    mean = torch.as_tensor(value["mean"], dtype=torch.float64)
    whiten = torch.as_tensor(value["whiten"], dtype=torch.float64)
    if mean.dim() != 3 or mean.shape[:2] != (n_members, n_species):
        raise ValueError(f"feature_density.mean must have shape [{n_members}, {n_species}, D], got {list(mean.shape)}")
    d = mean.shape[2] if width is None else width
    if mean.shape[2] != d or whiten.shape != (n_members, n_species, d, d):
        raise ValueError(f"feature_density.whiten must have shape [{n_members}, {n_species}, {d}, {d}], "
                         f"got {list(whiten.shape)}")
    if not (torch.isfinite(mean).all() and torch.isfinite(whiten).all()):
        raise ValueError("feature_density holds non-finite values")
    return {"mean": mean, "whiten": whiten, "training_atoms": [int(c) for c in value["training_atoms"]],
            "regularisation": float(value["regularisation"]),
            "pooled_species": [str(name) for name in value.get("pooled_species", [])]}


def member_distances(features: torch.Tensor, species: torch.Tensor, mean: torch.Tensor,
                     whiten: torch.Tensor) -> torch.Tensor:
    """Mahalanobis distance [n] of features [n, D] under the Gaussians mean [S, D], whiten [S, D, D].

    Every atom is whitened by every species' Gaussian and its own is picked: S times the
    arithmetic of a per-species split, but no shape depends on the data (AOTInductor traces it)."""
    dtype = features.dtype
    whiten = whiten.to(dtype)
    shifted = torch.einsum("nd,sde->sne", features, whiten) - torch.einsum("sd,sde->se", mean.to(dtype), whiten)[:, None]
    squared = torch.sum(shifted * shifted, dim=2)  # [S, n]
    return torch.sqrt(torch.gather(squared, 0, species.reshape(1, -1)).reshape(-1))


def feature_distance(members: Sequence, density: Mapping, data: Dict[str, torch.Tensor]) -> torch.Tensor:
    """[M, N]: every member's feature distance of every atom of the batch ``data``."""
    rows = []
    for m, member in enumerate(members):
        features = atom_features(member, data).to(torch.float64)
        rows.append(member_distances(features, data[keys.SPECIES], density["mean"][m], density["whiten"][m]))
    return torch.stack(rows)
