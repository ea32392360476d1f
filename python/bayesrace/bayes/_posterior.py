"""The predictive distribution of a posterior given as M weight sets.

Any posterior (deep ensemble, SWAG, IVON, Laplace, shallow ensemble) is turned into M members that are
evaluated together; the aggregation below is the one predictive API used by evaluation,
the ASE calculator, active learning and the exported deployable. With member energies
E_m, forces F_m and aleatoric heads σ²_E,m, Σ_i,m:

- energy mean Ē = mean_m E_m; epistemic variance mean_m (E_m − Ē)²; aleatoric mean_m σ²_E,m
- forces F̄ = mean_m F_m; per atom, epistemic covariance mean_m (F_m − F̄)(F_m − F̄)ᵀ and
  aleatoric covariance mean_m Σ_i,m
- per-atom force σ = sqrt(tr Σ / 3): the standard deviation of one Cartesian component,
  on the scale of a per-component force RMSE (total, epistemic and aleatoric)
- per-atom energy σ: standard deviation of member atomic energies (epistemic only)

Variances use 1/M (the mixture's own moments), not 1/(M−1).

A posterior carries a ``calibration`` (``_calibration``; ``{}`` = uncalibrated) that
``forward`` applies to these σ's, variances and covariances, and default extrapolation
``thresholds`` ({atomic_force_std: X}, calibrated eV/Å); both travel in the saved record.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict, List, Mapping, Optional

import numpy as np
import torch

from .. import keys
from .._files import atomic_path
from ..model import RACE, model_config_from_record
from ._feature_density import FeatureCapture, member_distances, validate_feature_density
from ._calibration_maps import (
    calibrate_prediction,
    validate_calibration,
    validate_thresholds,
)


def aggregate_members(
    member_energy: torch.Tensor,
    member_energy_variance: torch.Tensor,
    member_forces: torch.Tensor,
    member_force_covariance: torch.Tensor,
    member_atomic_energy: torch.Tensor,
) -> Dict[str, torch.Tensor]:
    """Moments of the mixture of M members; shapes [M, B], [M, B], [M, N, 3], [M, N, 3, 3], [M, N]."""
    energy = member_energy.mean(dim=0)
    forces = member_forces.mean(dim=0)
    deviation = member_forces - forces.unsqueeze(0)
    cov_epistemic = torch.einsum("mni,mnj->nij", deviation, deviation) / member_forces.shape[0]
    cov_aleatoric = member_force_covariance.mean(dim=0)
    trace_epistemic = torch.diagonal(cov_epistemic, dim1=-2, dim2=-1).sum(dim=-1)
    trace_aleatoric = torch.diagonal(cov_aleatoric, dim1=-2, dim2=-1).sum(dim=-1)
    atomic_energy = member_atomic_energy.mean(dim=0)
    return {
        keys.ENERGY: energy,
        keys.ENERGY_VAR_EPISTEMIC: (member_energy - energy.unsqueeze(0)).pow(2).mean(dim=0),
        keys.ENERGY_VAR_ALEATORIC: member_energy_variance.mean(dim=0),
        keys.FORCES: forces,
        keys.FORCE_COV_EPISTEMIC: cov_epistemic,
        keys.FORCE_COV_ALEATORIC: cov_aleatoric,
        keys.ATOMIC_FORCE_STD: torch.sqrt((trace_epistemic + trace_aleatoric) / 3.0),
        keys.ATOMIC_FORCE_STD_EPISTEMIC: torch.sqrt(trace_epistemic / 3.0),
        keys.ATOMIC_FORCE_STD_ALEATORIC: torch.sqrt(trace_aleatoric / 3.0),
        keys.ATOMIC_ENERGY: atomic_energy,
        keys.ATOMIC_ENERGY_STD: torch.sqrt((member_atomic_energy - atomic_energy.unsqueeze(0)).pow(2).mean(dim=0)),
        keys.MEMBER_ENERGY: member_energy,
        keys.MEMBER_FORCES: member_forces,
    }


def relative_force_std(prediction: Mapping[str, np.ndarray]) -> np.ndarray:
    """Per-atom epistemic force σ relative to the mean force, σ_F,epi,i / (|F_i| + L) with L =
    ``keys.RELATIVE_FORCE_LEVEL`` (unit-free; ``compute bayesrace/atom`` column 6)."""
    magnitude = np.linalg.norm(np.asarray(prediction[keys.FORCES], dtype=np.float64), axis=-1)
    return np.asarray(prediction[keys.ATOMIC_FORCE_STD_EPISTEMIC], dtype=np.float64) / (
        magnitude + keys.RELATIVE_FORCE_LEVEL)


class Posterior(torch.nn.Module):
    """M RACE members with identical architecture, evaluated together."""

    def __init__(self, members: List[RACE], kind: str = "ensemble"):
        super().__init__()
        if not members:
            raise ValueError("a posterior needs at least one member")
        self.members = torch.nn.ModuleList(members)
        self.kind = kind
        self.type_names: List[str] = list(members[0].type_names)
        self.cutoff = float(members[0].cutoff)
        self.n_layers = int(members[0].n_layers)
        self.calibration = {}
        self.thresholds = {}
        # the training set's shortest distance per pair of types (data.shortest_contacts), or
        # None (posteriors built in memory, or saved before it was recorded)
        self.shortest_contacts = None
        # the members' feature density (``_feature_density``) or None: then forward() also
        # reports every atom's feature distance
        self.feature_density = None

    @property
    def calibration(self) -> Dict[str, object]:
        """The calibration ``forward`` applies ({} = identity); assigning validates it."""
        return self._calibration

    @calibration.setter
    def calibration(self, value: Optional[Mapping]) -> None:
        self._calibration = validate_calibration(value)

    @property
    def thresholds(self) -> Dict[str, float]:
        """Default extrapolation thresholds, {atomic_force_std: X} (calibrated σ, eV/Å)."""
        return self._thresholds

    @thresholds.setter
    def thresholds(self, value: Optional[Mapping]) -> None:
        self._thresholds = validate_thresholds(value)

    def forward(self, data: Dict[str, torch.Tensor], compute_virial: bool = False) -> Dict[str, torch.Tensor]:
        energies: List[torch.Tensor] = []
        energy_variances: List[torch.Tensor] = []
        forces: List[torch.Tensor] = []
        covariances: List[torch.Tensor] = []
        atomic_energies: List[torch.Tensor] = []
        virials: List[torch.Tensor] = []
        distances: List[torch.Tensor] = []
        density = self.feature_density
        for m, member in enumerate(self.members):
            if density is None:
                out = member(data, True, compute_virial)
            else:  # the features come from this same pass (FeatureCapture), not a second one
                with FeatureCapture(member) as capture:
                    out = member(data, True, compute_virial)
                distances.append(member_distances(capture.features().to(torch.float64), data[keys.SPECIES],
                                                  density["mean"][m], density["whiten"][m]))
            energies.append(out[keys.ENERGY])
            energy_variances.append(out[keys.ENERGY_VARIANCE])
            forces.append(out[keys.FORCES])
            covariances.append(out[keys.FORCE_COVARIANCE])
            atomic_energies.append(out[keys.ATOMIC_ENERGY])
            if compute_virial:
                virials.append(out[keys.VIRIAL])
        result = aggregate_members(
            torch.stack(energies),
            torch.stack(energy_variances),
            torch.stack(forces),
            torch.stack(covariances),
            torch.stack(atomic_energies),
        )
        if compute_virial:
            virial = torch.stack(virials).mean(dim=0)
            result[keys.VIRIAL] = virial
            volume = torch.abs(torch.linalg.det(data[keys.CELL]))
            result[keys.STRESS] = -virial / volume.clamp(min=1e-12)[:, None, None]
        if distances:
            result[keys.ATOMIC_FEATURE_DISTANCE] = torch.stack(distances).mean(dim=0)
        if self._calibration:
            result = calibrate_prediction(result, self._calibration, data[keys.NUM_ATOMS], data[keys.BATCH])
        return result


POSTERIOR_FORMAT = "bayesrace-posterior"
POSTERIOR_FORMAT_VERSION = 1
RECORD_CALIBRATION = "calibration"  # optional: the calibration dict (_calibration)
RECORD_THRESHOLDS = "thresholds"  # optional: {atomic_force_std: X}
RECORD_SHORTEST_CONTACTS = "shortest_contacts"  # optional: [T][T] Å or None (data.shortest_contacts)
RECORD_FEATURE_DENSITY = "feature_density"  # optional: the members' feature density (_feature_density)


def posterior_record(members: List[RACE], kind: str, extra: Dict[str, object]) -> Dict[str, object]:
    """Everything needed to rebuild a posterior, as plain Python data and tensors."""
    first = members[0]
    return {
        "format": POSTERIOR_FORMAT,
        "format_version": POSTERIOR_FORMAT_VERSION,
        "kind": kind,
        "model_config": dataclasses.asdict(first.config),
        "type_names": list(first.type_names),
        "reference_energies": first.reference_energies.tolist(),
        "energy_shift": float(first.energy_shift),
        "energy_scale": float(first.energy_scale),
        "trained_heads": list(first.trained_heads),
        "members": [{k: v.detach().cpu() for k, v in m.state_dict().items()} for m in members],
        **extra,
    }


def _write_record(record: Dict[str, object], path) -> None:
    """Write atomically so a kill, or a LAMMPS job reading it, never sees half a file."""
    with atomic_path(path) as tmp:
        torch.save(record, tmp)


def save_posterior(path, members: List[RACE], kind: str = "ensemble", **extra) -> None:
    """Write the record of ``members`` (plus ``extra`` fields, e.g. calibration=...) atomically."""
    for field, check in ((RECORD_CALIBRATION, validate_calibration), (RECORD_THRESHOLDS, validate_thresholds)):
        if field in extra:
            extra[field] = check(extra[field])
    _write_record(posterior_record(members, kind, extra), path)


def read_posterior_record(path) -> Dict[str, object]:
    """The saved record of a posterior (members' weights as state dicts, kind, architecture,
    normalisation, calibration...), checked to be a bayesrace posterior of this format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such posterior file")
    try:
        record = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises many kinds for a corrupt file
        raise ValueError(f"{path}: not a readable bayesrace posterior ({error})") from error
    if not isinstance(record, dict) or record.get("format") != POSTERIOR_FORMAT:
        raise ValueError(f"{path}: not a bayesrace posterior (field 'format' should be {POSTERIOR_FORMAT!r})")
    if record.get("format_version") != POSTERIOR_FORMAT_VERSION:
        raise ValueError(
            f"{path}: posterior format_version {record.get('format_version')!r}, "
            f"this bayesrace reads {POSTERIOR_FORMAT_VERSION}"
        )
    return record


def update_posterior_file(path, out_path=None, calibration: Optional[Mapping] = None,
                          thresholds: Optional[Mapping] = None, feature_density: Optional[Mapping] = None) -> None:
    """Copy the record at ``path`` to ``out_path`` (default: ``path`` itself, rewritten
    atomically) with a new calibration and/or thresholds; ``None`` keeps the field as it
    is, ``{}`` removes it; likewise a new feature density (``None`` keeps it). The members'
    weights are copied unchanged."""
    record = read_posterior_record(path)
    if feature_density is not None:
        record[RECORD_FEATURE_DENSITY] = validate_feature_density(feature_density, len(record["members"]),
                                                                  len(record["type_names"]))
    for field, value, check in (
        (RECORD_CALIBRATION, calibration, validate_calibration),
        (RECORD_THRESHOLDS, thresholds, validate_thresholds),
    ):
        if value is None:
            continue
        checked = check(value, field)
        if checked:
            record[field] = checked
        else:
            record.pop(field, None)
    _write_record(record, path if out_path is None else out_path)


def load_posterior(path, dtype: torch.dtype = torch.float64) -> Posterior:
    record = read_posterior_record(path)
    config = model_config_from_record(record["model_config"])
    members = []
    for state in record["members"]:
        member = RACE(
            config,
            record["type_names"],
            record["reference_energies"],
            record["energy_shift"],
            record["energy_scale"],
            record["trained_heads"],
        ).to(dtype)
        member.load_state_dict(state)
        member.eval()
        members.append(member)
    posterior = Posterior(members, record["kind"])
    try:
        posterior.calibration = record.get(RECORD_CALIBRATION)
        posterior.thresholds = record.get(RECORD_THRESHOLDS)
        posterior.shortest_contacts = record.get(RECORD_SHORTEST_CONTACTS)
        posterior.feature_density = validate_feature_density(record.get(RECORD_FEATURE_DENSITY), len(members),
                                                             len(record["type_names"]))
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error
    posterior.record_info = {k: v for k, v in record.items() if k not in ("members", RECORD_FEATURE_DENSITY)}
    return posterior.eval()
