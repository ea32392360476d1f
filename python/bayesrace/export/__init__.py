"""Export: a trained posterior frozen into one deployable file with its metadata.

The command line (``bayesrace export`` and its alias ``bayesrace-export``) is in
``bayesrace.cli``; this package is the library behind it. ``export_posterior_aoti`` writes the
same deployable as an AOTInductor package (``.pt2``, compiled, shell mode only);
``read_metadata`` reads either format. ``layered_evaluate`` is the
reference of layer mode (the per-layer halo exchange the C++ core follows) and
``ghost_images`` builds its inputs for a periodic structure.
"""

from ._aoti import check_aoti_toolchain, export_posterior_aoti, load_aoti
from ._archive import deployable_format, read_metadata
from ._deployable import (
    DEFAULT_THRESHOLD_FACTOR,
    DTYPES,
    ExportError,
    build_metadata,
    export_posterior,
    resolve_calibration,
    threshold_from_structures,
)
from ._layered import ghost_images, layered_evaluate

__all__ = [
    "DEFAULT_THRESHOLD_FACTOR",
    "DTYPES",
    "ExportError",
    "build_metadata",
    "check_aoti_toolchain",
    "deployable_format",
    "export_posterior",
    "export_posterior_aoti",
    "ghost_images",
    "layered_evaluate",
    "load_aoti",
    "read_metadata",
    "resolve_calibration",
    "threshold_from_structures",
]
