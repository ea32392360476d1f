"""Uncertainty quantification: prediction over data sets, metrics, OOD scores, recalibration
fitting and thresholds, the evaluation report and its plots.

Modules: ``_predict`` (predictions over frames), ``_metrics`` (metrics on arrays),
``_set_metrics`` (the numbers of one set), ``_ood`` (OOD scores and AUROCs),
``_calibration`` (fitting maps, the extrapolation threshold, calibrating a posterior file),
``_evaluate`` (several sets, before and after recalibration), ``_report`` (tables, report.md,
the report folder) and ``_plots`` (its figures).
"""

from ..bayes import relative_force_std
from ._calibration import (
    check_threshold_settings,
    calibrate_posterior_file,
    describe_calibration,
    energy_extrapolation_threshold,
    extrapolation_threshold,
    fit_calibration,
    fit_std_map,
    relative_extrapolation_threshold,
    uncertainty_metrics,
)
from ._evaluate import evaluate_sets
from ._metrics import (
    CALIBRATION_LEVELS,
    auroc,
    calibration_curve,
    coverage,
    ence,
    error_summary,
    gaussian_nll,
    mae,
    miscalibration_area,
    rmse,
    roc_curve,
    sharpness,
    spearman,
)
from ._ood import OOD_SCORES, THRESHOLD_SCORES, flagged_fractions, ood_aurocs, ood_scores
from ._plots import PLOT_FILES
from ._predict import energy_std, predict_frames, reference_key
from ._report import format_summary, format_table
from ._set_metrics import METRIC_UNITS, set_metrics

__all__ = [
    "check_threshold_settings",
    "CALIBRATION_LEVELS",
    "METRIC_UNITS",
    "OOD_SCORES",
    "THRESHOLD_SCORES",
    "PLOT_FILES",
    "auroc",
    "calibrate_posterior_file",
    "calibration_curve",
    "coverage",
    "describe_calibration",
    "ence",
    "energy_std",
    "relative_force_std",
    "error_summary",
    "evaluate_sets",
    "energy_extrapolation_threshold",
    "extrapolation_threshold",
    "relative_extrapolation_threshold",
    "fit_calibration",
    "fit_std_map",
    "format_summary",
    "format_table",
    "gaussian_nll",
    "mae",
    "miscalibration_area",
    "flagged_fractions",
    "ood_aurocs",
    "ood_scores",
    "predict_frames",
    "reference_key",
    "rmse",
    "roc_curve",
    "set_metrics",
    "sharpness",
    "spearman",
    "uncertainty_metrics",
]
