"""Freeze a posterior into the deployable: one TorchScript file plus its metadata.

The deployable follows the contract of ``pair_bayesrace/README.md`` (format_version 1):
``forward(positions, species, edge_index, edge_shifts, n_local, compute_atomic_virial)``
returns the raw outputs of every member (energies, forces, virials, aleatoric heads);
the C++ core aggregates them. The network code is the model's own: the members' weights
stacked by ``bayesrace.model.StackedRace`` (all members in one pass, equal to
``RACE.atomic_outputs`` member by member). The module itself, with the autograd for forces
and virials, is ``_module.DeployedPosterior``; this file adds the metadata and writes the file.

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
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from .. import keys
from .._files import atomic_path
from .._version import __version__
from ..bayes import Posterior
from ._errors import ExportError
from ._module import DeployedPosterior

FORMAT_VERSION = 1
UNITS = "metal"  # eV, Å: the units the model is trained in
DTYPES = {"float64": torch.float64, "float32": torch.float32}
DEFAULT_THRESHOLD_FLOOR_MULTIPLE = 3.0
DEFAULT_THRESHOLD_FACTOR = 1.5  # margin over in-distribution σ for --threshold-from
RECORD_DATA_HASH = "data_sha256"  # where bayesrace.train stores the hash in the posterior record


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
    density = getattr(posterior, "feature_density", None)
    if density is not None:  # informative: the tensors are in the module
        contacts[keys.META_FEATURE_DENSITY] = {"training_atoms": list(density["training_atoms"]),
                                               "regularisation": float(density["regularisation"])}
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
    return DeployedPosterior(members, getattr(posterior, "feature_density", None)).eval()


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

