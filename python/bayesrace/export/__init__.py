"""Export: a trained posterior frozen into one deployable file with its metadata.

The command line (``bayesrace export`` and its alias ``bayesrace-export``) is in
``bayesrace.cli``; this package is the library behind it. ``layered_evaluate`` is the
reference of layer mode (the per-layer halo exchange the C++ core follows) and
``ghost_images`` builds its inputs for a periodic structure.
"""

from ._deployable import (
    DEFAULT_THRESHOLD_FACTOR,
    DTYPES,
    ExportError,
    build_metadata,
    export_posterior,
    read_metadata,
    resolve_calibration,
    threshold_from_structures,
)
from ._layered import ghost_images, layered_evaluate

__all__ = [
    "DEFAULT_THRESHOLD_FACTOR",
    "DTYPES",
    "ExportError",
    "build_metadata",
    "export_posterior",
    "ghost_images",
    "layered_evaluate",
    "read_metadata",
    "resolve_calibration",
    "threshold_from_structures",
]
