"""Freeze a posterior into the deployable: one TorchScript file plus its metadata.

The deployable follows the contract of ``pair_bayesrace/README.md`` (format_version 1):
``forward(positions, species, edge_index, edge_shifts, n_local, compute_atomic_virial)``
returns the raw outputs of every member (energies, forces, virials, aleatoric heads);
the C++ core aggregates them. The network code is the model's own: the members' weights
stacked by ``bayesrace.model.StackedRace`` (all members in one pass, equal to
``RACE.atomic_outputs`` member by member); this module adds the autograd for forces and
virials and the metadata.

The command line (``bayesrace export``, alias ``bayesrace-export``) lives in
``bayesrace.cli``; see ``export/README.md``.

Default extrapolation threshold (``thresholds.atomic_force_std``, eV/Å, calibrated σ):
``--force-threshold X`` if given; else, with ``--threshold-from FILE``, 1.5
(``--threshold-factor``) × the 0.99 quantile (``--threshold-quantile``) over FILE's
structures of each structure's largest calibrated atomic force σ (pass in-distribution
structures, e.g. the validation set); else the posterior's own value when it carries
one (``bayesrace calibrate`` stores one); else a heuristic of
``DEFAULT_THRESHOLD_FLOOR_MULTIPLE`` × the smallest force σ the heads can report, calibrated
(c_F(sqrt(covariance_floor))). That last heuristic knows nothing of the data and is
usually too low for a briefly trained model: prefer ``--threshold-from``.

Calibration (``calibration`` in metadata.json): the posterior's own (from its record,
written by ``bayesrace calibrate``): scales s_F, s_E and optional monotone maps g_F, g_E;
``--force-std-scale`` / ``--energy-std-scale`` replace the scales only. The C++ core applies
c(σ) = s·g(σ) exactly as ``Posterior.forward`` does (see ``_calibration``), so the
deployable reports the same calibrated σ's as the Python posterior.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from .. import keys
from .._files import atomic_path
from .._version import __version__
from ..bayes import Posterior

FORMAT_VERSION = 1
UNITS = "metal"  # eV, Å: the units the model is trained in
DTYPES = {"float64": torch.float64, "float32": torch.float32}
DEFAULT_THRESHOLD_FLOOR_MULTIPLE = 3.0
DEFAULT_THRESHOLD_FACTOR = 1.5  # margin over in-distribution σ for --threshold-from
RECORD_DATA_HASH = "data_sha256"  # where bayesrace.train stores the hash in the posterior record


class ExportError(ValueError):
    """A posterior that cannot (or must not) be exported; the message names the field."""


class DeployedPosterior(torch.nn.Module):
    """M RACE members behind the deployable's forward() (shell mode), its per-member
    layer-mode methods ``layer_widths``, ``n_readout``, ``embed``, ``layer``, ``head``
    (issue 11: the per-layer halo exchange; ``bayesrace.export.layered_evaluate`` is
    their reference use) and the same methods for all members at once, ``embed_all``,
    ``layer_all``, ``head_all`` (``bayesrace.model.StackedRace``), which forward() and the
    C++ core use: one pass evaluates every member."""

    def __init__(self, members: List[torch.nn.Module]):
        super().__init__()
        from ..model import StackedRace

        self.members = torch.nn.ModuleList(members)
        self.n_members = len(members)
        try:
            self.stacked = StackedRace(members)
        except ValueError as error:
            raise ExportError(f"the members cannot be evaluated together: {error}") from None
        self.feature_widths: List[int] = list(self.stacked.widths)
        self.readout_width: int = int(members[0].readout_width())

    # -- all members in one pass: features [N, M * d_k], member-major within a row --------
    @torch.jit.export
    def embed_all(self, species: torch.Tensor) -> torch.Tensor:
        """h_0 of every atom and member, [N, M * d_0] (species only: ghosts too)."""
        h = self.stacked.embed(species)[0]
        return h.transpose(0, 1).reshape(species.shape[0], self.n_members * self.feature_widths[0])

    @torch.jit.export
    def layer_all(
        self,
        index: int,
        h: torch.Tensor,
        species: torch.Tensor,
        edge_index: torch.Tensor,
        edge_vectors: torch.Tensor,
        n_local: int,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``layer`` for all members: h_index [N, M * d_index] and edge vectors [M, E, 3]
        (one copy per member, so that autograd keeps the members' forces apart) →
        (h_{index+1} [n_local, M * d_{index+1}], r_index [M, n_local, n_out])."""
        widths = self.feature_widths
        m = self.n_members
        n_atoms = species.shape[0]
        if index < 0 or index >= len(widths) - 1:
            raise IndexError(f"layer {index} out of range (the deployable has {len(widths) - 1})")
        if h.dim() != 2 or h.shape[0] != n_atoms or h.shape[1] != m * widths[index]:
            raise ValueError(f"layer_all {index} needs h of shape [{n_atoms}, {m * widths[index]}], got {list(h.shape)}")
        if edge_vectors.dim() != 3 or edge_vectors.shape[0] != m or edge_vectors.shape[1] != edge_index.shape[1]:
            raise ValueError(f"layer_all needs edge vectors of shape [{m}, {edge_index.shape[1]}, 3]")
        if edge_index.shape[1] > 0 and int(edge_index[0].max()) >= n_local:
            raise ValueError("layer mode needs every edge centre < n_local (edges of local atoms only)")
        features = h.reshape(n_atoms, m, widths[index]).transpose(0, 1)
        initial = self.stacked.embed(species)[1]
        radial, sh = self.stacked.edge_geometry(edge_vectors)
        h_next, readout = self.stacked.interaction(index, features, species, initial, radial, sh, edge_index, n_local)
        return h_next.transpose(0, 1).reshape(n_local, m * widths[index + 1]), readout

    @torch.jit.export
    def head_all(
        self, readouts: torch.Tensor, species: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``head`` for all members: readouts [K, M, n_local, n_out] → (atomic energy [M, n_local],
        log-variance [M, n_local], force covariance [M, n_local, 3, 3])."""
        energies: List[torch.Tensor] = []
        log_vars: List[torch.Tensor] = []
        covariances: List[torch.Tensor] = []
        for m, module in enumerate(self.members):
            energy, log_var, covariance = module.combine_readouts(readouts[:, m], species)
            energies.append(energy)
            log_vars.append(log_var)
            covariances.append(covariance)
        return torch.stack(energies), torch.stack(log_vars), torch.stack(covariances)

    # -- layer mode (HALO_SPEC.md): one layer at a time, the caller exchanges ghost rows --
    @torch.jit.export
    def layer_widths(self) -> List[int]:
        """[d_0, ..., d_K]: the width of the flattened node features h_k of one member."""
        return self.feature_widths

    @torch.jit.export
    def n_readout(self) -> int:
        """n_out: the width of one layer's readout r_k."""
        return self.readout_width

    @torch.jit.export
    def embed(self, member: int, species: torch.Tensor) -> torch.Tensor:
        """h_0 [N, d_0] of every atom of member ``member`` (species only: ghosts too)."""
        result: Optional[torch.Tensor] = None
        for m, module in enumerate(self.members):
            if m == member:
                # every floating buffer was converted to the deployable's dtype on export
                result = module.embed_species(species, module.energy_scale.dtype)[1]
        if result is None:
            raise IndexError(f"member {member} out of range (the deployable has {self.n_members})")
        return result

    @torch.jit.export
    def layer(
        self,
        member: int,
        index: int,
        h: torch.Tensor,
        species: torch.Tensor,
        edge_index: torch.Tensor,
        edge_vectors: torch.Tensor,
        n_local: int,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(h_{index+1} [n_local, d_{index+1}], r_index [n_local, n_out]) of the local atoms
        from h_index of every atom [N, d_index]; every edge centre must be < n_local.
        The edge geometry is computed here from ``edge_vectors``, so autograd reaches them
        from every layer."""
        widths = self.layer_widths()
        if index < 0 or index >= len(widths) - 1:
            raise IndexError(f"layer {index} out of range (the deployable has {len(widths) - 1})")
        if h.dim() != 2 or h.shape[1] != widths[index] or h.shape[0] != species.shape[0]:
            raise ValueError(f"layer {index} needs h of shape [{species.shape[0]}, {widths[index]}], got {list(h.shape)}")
        if edge_index.shape[1] > 0 and int(edge_index[0].max()) >= n_local:
            raise ValueError("layer mode needs every edge centre < n_local (edges of local atoms only)")
        result: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        for m, module in enumerate(self.members):
            if m == member:
                result = module.layer_step(index, h, species, edge_index, edge_vectors, n_local)
        if result is None:
            raise IndexError(f"member {member} out of range (the deployable has {self.n_members})")
        return result

    @torch.jit.export
    def head(
        self, member: int, readouts: torch.Tensor, species: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(atomic energy, atomic_energy_log_var, force_covariance) of the local atoms from
        the stacked readouts [K, n_local, n_out], exactly as ``RACE.atomic_outputs``."""
        result: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
        for m, module in enumerate(self.members):
            if m == member:
                result = module.combine_readouts(readouts, species)
        if result is None:
            raise IndexError(f"member {member} out of range (the deployable has {self.n_members})")
        return result

    def forward(
        self,
        positions: torch.Tensor,
        species: torch.Tensor,
        edge_index: torch.Tensor,
        edge_shifts: torch.Tensor,
        n_local: int,
        compute_atomic_virial: bool,
    ) -> Dict[str, torch.Tensor]:
        n_atoms = positions.shape[0]
        centre = edge_index[0]
        neighbour = edge_index[1]
        # gradients are taken with respect to the edge vectors, not positions: the same
        # code then serves isolated molecules, periodic images and LAMMPS ghost atoms
        base = (positions[neighbour] - positions[centre] + edge_shifts).detach()
        if not torch.is_grad_enabled():
            # forces come from autograd: under no_grad they would silently be zero
            raise RuntimeError("the bayesrace deployable needs autograd enabled (do not call it under torch.no_grad)")
        m = self.n_members
        # one copy of the edge vectors per member: the gradient of the summed energies then
        # holds each member's own dE/dr
        vectors = base.unsqueeze(0).expand(m, base.shape[0], 3).clone().requires_grad_(True)
        readouts = self.stacked(species, edge_index, vectors)  # [K, M, N, n_out]
        atomic_energy, log_var, covariance = self.head_all(readouts, species)
        # only local atoms count: ghosts are copies owned by another domain
        member_energy = atomic_energy[:, :n_local].sum(dim=1)
        g: Optional[torch.Tensor] = None
        if member_energy.requires_grad:
            g = torch.autograd.grad([member_energy.sum()], [vectors], allow_unused=True)[0]
        if g is None:
            g = torch.zeros_like(vectors)
        forces: List[torch.Tensor] = []
        virials: List[torch.Tensor] = []
        atomic_virials: List[torch.Tensor] = []
        for member in range(m):
            gm = g[member]
            # r_ij = x_j - x_i + shift: dE/dx_i = -g and dE/dx_j = +g, F = -dE/dx
            forces.append(torch.zeros_like(positions).index_add(0, centre, gm).index_add(0, neighbour, -gm))
            edge_virial = -base.unsqueeze(2) * gm.unsqueeze(1)  # [E, 3, 3], LAMMPS sign
            virials.append(edge_virial.sum(dim=0))
            if compute_atomic_virial:
                half = 0.5 * edge_virial
                w = torch.zeros(n_atoms, 3, 3, dtype=base.dtype, device=base.device)
                atomic_virials.append(w.index_add(0, centre, half).index_add(0, neighbour, half))
        if compute_atomic_virial:
            member_atomic_virial = torch.stack(atomic_virials)
        else:
            member_atomic_virial = torch.empty(0, dtype=positions.dtype, device=positions.device)
        return {
            keys.MEMBER_ENERGY: member_energy.detach(),
            keys.MEMBER_ATOMIC_ENERGY: atomic_energy.detach(),
            keys.MEMBER_FORCES: torch.stack(forces),
            keys.MEMBER_VIRIAL: torch.stack(virials),
            keys.MEMBER_ATOMIC_VIRIAL: member_atomic_virial,
            keys.ATOMIC_ENERGY_LOG_VAR: log_var.detach(),
            keys.FORCE_COVARIANCE: covariance.detach(),
        }


def _posterior_dtype(posterior: Posterior) -> torch.dtype:
    for tensor in posterior.parameters():
        return tensor.dtype
    return torch.float64


def _dtype_name(dtype) -> str:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ExportError(f"dtype {dtype!r} is not supported; expected one of {sorted(DTYPES)}")
        return dtype
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ExportError(f"dtype {dtype} is not supported; expected one of {sorted(DTYPES)}")


def resolve_calibration(posterior: Posterior, calibration: Optional[Dict[str, object]] = None) -> Dict[str, object]:
    """The calibration the deployable will carry, checked and complete:
    ``{force_std_scale, energy_std_scale[, force_std_map][, energy_std_map]}``.

    Base: the posterior's own ``calibration`` (what ``Posterior.forward`` applies; loaded from
    the record, written by ``bayesrace calibrate``); then each field given in ``calibration``
    replaces the base's (a map given as ``None`` removes it). Scales default to 1; maps
    follow the contract of ``_calibration`` (knots σ strictly increasing > 0, values
    non-decreasing > 0).
    """
    from ..bayes import CalibrationError, validate_calibration

    base = dict(posterior.calibration)
    base.update(calibration or {})
    base = {name: value for name, value in base.items() if value is not None}
    try:
        checked = validate_calibration(base)
    except CalibrationError as error:
        raise ExportError(f"metadata field {error}") from None
    resolved: Dict[str, object] = {keys.META_FORCE_STD_SCALE: 1.0, keys.META_ENERGY_STD_SCALE: 1.0}
    resolved.update(checked)
    return resolved


def calibrated_force_std(calibration: Dict[str, object], sigma: float) -> float:
    """The calibrated force σ of an atom whose uncalibrated σ (eV/Å) is all aleatoric (the
    members agree), under ``calibration`` (a total map or maps by parts)."""
    from ..bayes import calibrate_prediction

    one = {keys.ATOMIC_FORCE_STD: np.array([float(sigma)]), keys.ATOMIC_FORCE_STD_EPISTEMIC: np.array([0.0]),
           keys.ATOMIC_FORCE_STD_ALEATORIC: np.array([float(sigma)])}
    return float(calibrate_prediction(one, calibration)[keys.ATOMIC_FORCE_STD][0])


def build_metadata(
    posterior: Posterior,
    dtype_name: str,
    calibration: Optional[Dict[str, float]] = None,
    thresholds: Optional[Dict[str, float]] = None,
    training_data_sha256: Optional[str] = None,
) -> Dict[str, object]:
    """The metadata.json of the deployable (every field the C++ loader checks)."""
    from ..bayes import CalibrationError, validate_thresholds

    record = dict(getattr(posterior, "record_info", None) or {})
    resolved_calibration = resolve_calibration(posterior, calibration)

    # the posterior's own thresholds (loaded from its record), overridden by the arguments
    try:
        thr = validate_thresholds({**posterior.thresholds, **(thresholds or {})})
    except CalibrationError as error:
        raise ExportError(f"metadata field {error}") from None
    if keys.ATOMIC_FORCE_STD not in thr:
        floor = min(float(m.covariance_floor) for m in posterior.members)
        thr[keys.ATOMIC_FORCE_STD] = DEFAULT_THRESHOLD_FLOOR_MULTIPLE * calibrated_force_std(
            resolved_calibration, math.sqrt(floor))
    force_threshold = thr[keys.ATOMIC_FORCE_STD]

    data_hash = training_data_sha256 if training_data_sha256 is not None else record.get(RECORD_DATA_HASH)
    if not data_hash or not isinstance(data_hash, str):
        raise ExportError(
            f"metadata field '{keys.META_TRAINING_DATA_SHA256}' is missing: the posterior record has no "
            f"'{RECORD_DATA_HASH}' (posteriors written by 'bayesrace train' carry it; pass "
            f"training_data_sha256=... for a posterior built another way)"
        )
    kind = getattr(posterior, "kind", None)
    if not kind:
        raise ExportError(f"metadata field '{keys.META_POSTERIOR}' is missing: the posterior has no kind")
    caps = {(float(getattr(m, "force_sigma_cap", 0.0)), float(getattr(m, "energy_sigma_cap", 0.0)))
            for m in posterior.members}
    if len(caps) != 1:
        raise ExportError(f"metadata field '{keys.META_SIGMA_CAPS}': the members have different σ caps {sorted(caps)}")
    force_cap, energy_cap = caps.pop()
    contacts = {}
    if getattr(posterior, "shortest_contacts", None) is not None:
        from ..data import contact_table

        try:
            contact_table(posterior.shortest_contacts)
            if len(posterior.shortest_contacts) != len(posterior.type_names):
                raise ValueError(f"{len(posterior.shortest_contacts)} rows for {len(posterior.type_names)} types")
        except ValueError as error:
            raise ExportError(f"metadata field '{keys.META_SHORTEST_CONTACTS}': {error}") from None
        contacts = {keys.META_SHORTEST_CONTACTS: [list(row) for row in posterior.shortest_contacts]}
    return {
        keys.META_FORMAT_VERSION: FORMAT_VERSION,
        keys.META_TYPE_NAMES: list(posterior.type_names),
        keys.META_CUTOFF: float(posterior.cutoff),
        keys.META_N_LAYERS: int(posterior.n_layers),
        keys.META_UNITS: UNITS,
        keys.META_DTYPE: dtype_name,
        keys.META_N_MEMBERS: len(posterior.members),
        keys.META_CALIBRATION: resolved_calibration,
        keys.META_THRESHOLDS: {**thr, keys.ATOMIC_FORCE_STD: force_threshold},
        keys.META_BAYESRACE_VERSION: __version__,
        keys.META_TORCH_VERSION: torch.__version__,
        keys.META_TRAINING_DATA_SHA256: data_hash,
        keys.META_POSTERIOR: str(kind),
        keys.META_SIGMA_CAPS: {keys.META_FORCE_SIGMA_CAP: force_cap, keys.META_ENERGY_SIGMA_CAP: energy_cap},
        **contacts,
    }


def threshold_from_structures(posterior: Posterior, structures, quantile: float = 0.99,
                              factor: float = DEFAULT_THRESHOLD_FACTOR,
                              calibration: Optional[Dict[str, object]] = None) -> float:
    """``factor`` × the ``quantile`` over ``structures`` (ASE Atoms, in-distribution) of each
    one's largest calibrated atomic force σ (eV/Å). The σ's are those of the posterior
    calibrated by ``calibration`` (a complete calibration dict, e.g. ``resolve_calibration``'s;
    default: the posterior's own), so the threshold matches what the deployable reports.
    The margin ``factor`` is there because MD visits far more configurations than a
    validation set holds, so a threshold at the set's own maximum trips on ordinary
    fluctuations."""
    from ..bayes import CalibrationError
    from ..uq import check_threshold_settings, extrapolation_threshold, predict_frames

    try:
        check_threshold_settings(quantile, factor)  # before the (slow) prediction
    except CalibrationError as error:
        raise ExportError(str(error)) from None
    frames = [_frame_of(atoms, index) for index, atoms in enumerate(structures)]
    if not frames:
        raise ExportError("no structures to measure the force σ threshold on")
    # measured on a float64 copy on the CPU: the posterior given is not touched
    measured = copy.deepcopy(posterior).to(dtype=torch.float64, device="cpu")
    if calibration is not None:
        # Posterior.forward applies its calibration: replace it, never multiply again
        measured.calibration = calibration
    prediction = predict_frames(measured, frames, dtype=torch.float64)
    try:
        return extrapolation_threshold(prediction, quantile, factor)
    except CalibrationError as error:
        raise ExportError(str(error)) from None


def _frame_of(atoms, index: int):
    """An unlabelled ``Frame`` of one ASE structure (a zero cell unless periodic somewhere)."""
    from ..data import Frame

    pbc = np.asarray(atoms.pbc, dtype=bool).reshape(3)
    cell = np.array(atoms.cell.array, dtype=np.float64) if pbc.any() else np.zeros((3, 3))
    return Frame(numbers=np.asarray(atoms.numbers, dtype=np.int64).copy(),
                 positions=np.array(atoms.positions, dtype=np.float64), cell=cell, pbc=pbc,
                 source=f"structure {index}")


def _check_posterior(posterior) -> None:
    if not isinstance(posterior, Posterior):
        raise ExportError(f"export needs a bayesrace Posterior, got {type(posterior).__name__}")
    if posterior.training or any(m.training for m in posterior.modules()):
        raise ExportError("the posterior is in training mode; call posterior.eval() before exporting "
                          "(a deployable must not carry training-time behaviour)")
    first = posterior.members[0]
    for k, member in enumerate(posterior.members):
        for name in ("type_names", "cutoff", "n_layers"):
            if getattr(member, name) != getattr(first, name):
                raise ExportError(f"member {k} has {name} {getattr(member, name)!r}, member 0 has "
                                  f"{getattr(first, name)!r}: members must share one architecture")


def deployed_posterior(posterior: Posterior, dtype: torch.dtype) -> DeployedPosterior:
    """A DeployedPosterior (eager) over frozen copies of the members in ``dtype`` (the
    posterior is not touched): what both deployable formats are made of."""
    members = []
    for member in posterior.members:
        copied = copy.deepcopy(member).to(dtype).eval()
        # the deployable differentiates with respect to inputs only
        for parameter in copied.parameters():
            parameter.requires_grad_(False)
        members.append(copied)
    return DeployedPosterior(members).eval()


def script_posterior(posterior: Posterior, dtype: torch.dtype) -> torch.jit.ScriptModule:
    """A scripted DeployedPosterior over copies of the members (the posterior is not touched)."""
    from e3nn.util import jit as e3nn_jit

    # e3nn's script compiles its code-generated modules first (plain torch.jit.script
    # fails on e.g. Gate)
    return e3nn_jit.script(deployed_posterior(posterior, dtype))


def checked_metadata(posterior: Posterior, dtype, calibration, thresholds,
                     training_data_sha256) -> Tuple[str, Dict[str, object]]:
    """(dtype name, metadata) of a posterior fit for export (ExportError otherwise)."""
    _check_posterior(posterior)
    dtype_name = _dtype_name(_posterior_dtype(posterior) if dtype is None else dtype)
    return dtype_name, build_metadata(posterior, dtype_name, calibration, thresholds, training_data_sha256)


def export_posterior(
    posterior: Posterior,
    path,
    *,
    calibration: Optional[Dict[str, float]] = None,
    thresholds: Optional[Dict[str, float]] = None,
    dtype=None,
    training_data_sha256: Optional[str] = None,
) -> Dict[str, object]:
    """Write the deployable for ``posterior`` to ``path``; returns its metadata.

    ``calibration``: fields replacing the posterior's calibration (force_std_scale,
    energy_std_scale, force_std_map, energy_std_map; see ``resolve_calibration``);
    ``thresholds``: {atomic_force_std: eV/Å} (default: see the module docstring);
    ``dtype``: torch dtype or "float64"/"float32" (default: the posterior's);
    ``training_data_sha256``: overrides the hash of the posterior record;
    """
    dtype_name, metadata = checked_metadata(posterior, dtype, calibration, thresholds, training_data_sha256)
    module = script_posterior(posterior, DTYPES[dtype_name])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # atomic write: LAMMPS jobs may be reading the previous model
    with atomic_path(path) as tmp:
        torch.jit.save(module, str(tmp), _extra_files={keys.METADATA_FILE: json.dumps(metadata, indent=1)})
    return metadata

