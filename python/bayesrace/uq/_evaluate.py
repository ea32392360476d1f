"""Evaluation of a posterior on several named sets: ``evaluate_sets``.

It predicts every set (``predict_frames``), computes its ``set_metrics`` (the numbers of
``METRIC_UNITS``) and the OOD scores of every set (the first is the in-distribution
reference, the others are scored as out-of-distribution with ``ood_scores`` and AUROC),
optionally refits a calibration on one of them and reports every metric before and after
it, and with a ``report_dir`` writes ``metrics.json``, plots, the predictions of every set
(``predictions_<set>.npz``) and ``report.md`` (see ``write_report``).
"""

from __future__ import annotations

import os
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from .. import keys
from ..bayes import METHODS as CALIBRATION_METHODS
from ..bayes import Posterior, calibrate_prediction
from ..data import Frame, read_frames
from ._calibration import fit_calibration
from ._ood import OOD_SCORES, flagged_fractions, ood_aurocs, ood_scores, present_scores
from ._predict import predict_frames, reference_key
from ._report import write_report
from ._set_metrics import METRIC_UNITS, set_metrics


def _read_set(source, energy_key: str, forces_key: str) -> List[Frame]:
    if isinstance(source, (str, os.PathLike)):
        return read_frames(source, energy_key=energy_key, forces_key=forces_key, require_energy=False,
                           require_forces=False)
    return list(source)


def evaluate_sets(
    posterior: Posterior,
    sets: Mapping[str, Union[str, os.PathLike, Sequence[Frame]]],
    report_dir: Optional[Union[str, os.PathLike]] = None,
    energy_key: str = "energy",
    forces_key: str = "forces",
    progress: bool = True,
    batch_size: int = 16,
    calibrate_on: Optional[str] = None,
    calibration_method: str = "isotonic",
) -> Dict[str, object]:
    """Metrics of a posterior on named sets, before and after an optional recalibration.

    A set is a structure file (read with ``read_frames``; labels are optional, so an
    unlabelled trajectory still gets its σ's and OOD scores) or a list of frames. Sets keep
    their order; the first one is the in-distribution reference of the OOD scores.

    Without ``calibrate_on`` the posterior is evaluated as given (with its own
    ``calibration``, if any). With ``calibrate_on`` = the name of one of the sets (a
    labelled validation set) every set is predicted UNcalibrated, a calibration is fitted
    on that set with ``fit_calibration(prediction, calibration_method)``, and every metric
    is reported again on the recalibrated predictions (``calibrate_prediction``; no second
    prediction). The numbers of the calibration set itself are in-sample; the report flags
    it, and it is left out of the OOD pairs (it is in-distribution by construction).

    Returns (the content of ``metrics.json``)::

        {"units": {metric: unit},
         "sets": {set: {metric: value}},                 # as predicted
         "recalibrated": {set: {metric: value}} | None,  # with the fitted calibration
         "calibration": {"fitted_on", "method", "parameters"} | None,
         "posterior_calibration": the posterior's own calibration ({} = identity),
         "ood": {"in_distribution": set, "scores": {score: unit},
                 "auroc": {ood set: {score: AUROC}},
                 "auroc_recalibrated": {ood set: {score: AUROC}} | None,
                 "flagged": flagged_fractions of the recalibrated scores, thresholds from the
                            calibration set (what ``bayesrace calibrate`` stores) | None}}

    With ``report_dir`` the files of ``write_report`` are written there.
    """
    if not sets:
        raise ValueError("evaluate_sets: no sets given")
    names = list(sets)
    if calibrate_on is not None and calibrate_on not in sets:
        raise ValueError(f"evaluate_sets: calibrate_on={calibrate_on!r} is not one of the sets {names}")
    if calibration_method not in CALIBRATION_METHODS:
        raise ValueError(f"evaluate_sets: calibration_method must be one of {list(CALIBRATION_METHODS)}, "
                         f"got {calibration_method!r}")
    dtype = next(posterior.parameters()).dtype
    own_calibration = dict(getattr(posterior, "calibration", None) or {})

    predictions: Dict[str, Dict[str, np.ndarray]] = {}
    if calibrate_on is not None:
        posterior.calibration = {}  # predict uncalibrated; the fitted calibration replaces the own one
    try:
        for name, source in sets.items():
            predictions[name] = predict_frames(
                posterior, _read_set(source, energy_key, forces_key), batch_size=batch_size, dtype=dtype,
                progress=progress, progress_label=f"predict {name}",
            )
    finally:
        if calibrate_on is not None:
            posterior.calibration = own_calibration

    recalibrated_predictions: Optional[Dict[str, Dict[str, np.ndarray]]] = None
    calibration = None
    if calibrate_on is not None:
        fit_on = predictions[calibrate_on]
        missing = [field for field in (keys.ENERGY, keys.FORCES) if reference_key(field) not in fit_on]
        if missing:
            raise ValueError(f"evaluate_sets: the calibration set {calibrate_on!r} has no reference "
                             f"{' or '.join(missing)} (labels {energy_key!r} / {forces_key!r} in every frame)")
        parameters = fit_calibration(fit_on, calibration_method)
        calibration = {"fitted_on": calibrate_on, "method": calibration_method, "parameters": parameters}
        recalibrated_predictions = {
            name: dict(calibrate_prediction(prediction, parameters, prediction[keys.NUM_ATOMS],
                                            prediction[keys.BATCH]))
            for name, prediction in predictions.items()
        }

    in_distribution = names[0]
    ood_names = [name for name in names[1:] if name != calibrate_on]
    scores = {name: ood_scores(prediction) for name, prediction in predictions.items()}
    recalibrated_scores = None
    if recalibrated_predictions is not None:
        recalibrated_scores = {name: ood_scores(p) for name, p in recalibrated_predictions.items()}
    evaluation = {
        "units": dict(METRIC_UNITS),
        "sets": {name: set_metrics(prediction) for name, prediction in predictions.items()},
        "recalibrated": None if recalibrated_predictions is None else {
            name: set_metrics(prediction) for name, prediction in recalibrated_predictions.items()
        },
        "calibration": calibration,
        "posterior_calibration": own_calibration,
        "ood": {
            "in_distribution": in_distribution,
            "scores": {score: OOD_SCORES[score][1] for score in present_scores(scores[in_distribution])},
            "auroc": ood_aurocs(scores, in_distribution, ood_names),
            "auroc_recalibrated": None if recalibrated_scores is None
            else ood_aurocs(recalibrated_scores, in_distribution, ood_names),
            "flagged": None if recalibrated_scores is None else flagged_fractions(recalibrated_scores, calibrate_on),
        },
    }
    if report_dir is not None:
        write_report(evaluation, predictions, report_dir, recalibrated_predictions)
    return evaluation
