"""Posteriors over RACE weights: the predictive of M weight sets, calibration maps, and the
posterior math of the kinds that draw their members (SWAG moments, last-layer Laplace).

Every posterior kind ends as M members (weight sets) evaluated together; training them
(ensemble, SWAG, IVON, Laplace around a trained member, shallow heads) lives in ``train``; the Gaussians
they are drawn from and what they predict live here.
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
from ._feature_density import (
    atom_features,
    feature_columns,
    feature_distance,
    fit_feature_density,
    fit_feature_density_on_file,
    training_feature_density,
    validate_feature_density,
)
from ._laplace import (
    LastLayerLaplace,
    fit_last_layer_laplace,
    laplace_log_marginal_likelihood,
    predictive_covariance,
    sample_last_layer_weights,
    sample_members,
)
from ._laplace_workflow import (
    LaplacePosteriorFile,
    fit_laplace_members,
    laplace_posterior_file,
    mean_epistemic_force_std,
)
from ._last_layer import (
    get_last_layer_weights,
    last_layer_jacobians,
    last_layer_mask,
    set_last_layer_weights,
)
from ._posterior import (
    Posterior,
    aggregate_members,
    load_posterior,
    read_posterior_record,
    relative_force_std,
    save_posterior,
    update_posterior_file,
)
from ._swag import SwagCollector

__all__ = [
    "IDENTITY",
    "MAP_VALUE_FLOOR_FRACTION",
    "MAX_MAP_KNOTS",
    "METHODS",
    "CalibrationError",
    "LaplacePosteriorFile",
    "LastLayerLaplace",
    "Posterior",
    "SwagCollector",
    "aggregate_members",
    "atom_features",
    "calibrate_prediction",
    "calibrated_std",
    "feature_columns",
    "feature_distance",
    "fit_feature_density",
    "fit_feature_density_on_file",
    "fit_laplace_members",
    "fit_last_layer_laplace",
    "get_last_layer_weights",
    "laplace_log_marginal_likelihood",
    "laplace_posterior_file",
    "last_layer_jacobians",
    "last_layer_mask",
    "load_posterior",
    "mean_epistemic_force_std",
    "predictive_covariance",
    "read_posterior_record",
    "relative_force_std",
    "sample_last_layer_weights",
    "sample_members",
    "save_posterior",
    "set_last_layer_weights",
    "std_ratio",
    "training_feature_density",
    "update_posterior_file",
    "validate_calibration",
    "validate_feature_density",
    "validate_std_map",
    "validate_thresholds",
]
