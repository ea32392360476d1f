"""Posteriors over RACE weights: the predictive of M weight sets, calibration maps, Laplace.

Every posterior kind ends as M members (weight sets) evaluated together; how they were
obtained (ensemble, SWAG, IVON, Laplace) lives in ``train``; what they predict lives here.
"""

from ._calibration_maps import (
    IDENTITY,
    MAP_VALUE_FLOOR_FRACTION,
    MAX_MAP_KNOTS,
    METHODS,
    CalibrationError,
    calibrate_prediction,
    calibrated_std,
    std_ratio,
    validate_calibration,
    validate_std_map,
    validate_thresholds,
)
from ._laplace import (
    LastLayerLaplace,
    fit_last_layer_laplace,
    get_last_layer_weights,
    laplace_log_marginal_likelihood,
    last_layer_jacobians,
    last_layer_mask,
    predictive_covariance,
    sample_last_layer_weights,
    sample_members,
    set_last_layer_weights,
)
from ._posterior import (
    Posterior,
    aggregate_members,
    load_posterior,
    save_posterior,
    update_posterior_file,
)

__all__ = [
    "CalibrationError",
    "IDENTITY",
    "LastLayerLaplace",
    "MAP_VALUE_FLOOR_FRACTION",
    "MAX_MAP_KNOTS",
    "METHODS",
    "Posterior",
    "aggregate_members",
    "calibrate_prediction",
    "calibrated_std",
    "fit_last_layer_laplace",
    "get_last_layer_weights",
    "laplace_log_marginal_likelihood",
    "last_layer_jacobians",
    "last_layer_mask",
    "load_posterior",
    "predictive_covariance",
    "sample_last_layer_weights",
    "sample_members",
    "save_posterior",
    "set_last_layer_weights",
    "std_ratio",
    "update_posterior_file",
    "validate_calibration",
    "validate_std_map",
    "validate_thresholds",
]
