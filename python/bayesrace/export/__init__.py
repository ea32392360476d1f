"""Export: a trained posterior frozen into one deployable file with its metadata.

The command line (``bayesrace export`` and its alias ``bayesrace-export``) is in
``bayesrace.cli``; this package is the library behind it.
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

__all__ = [
    "DEFAULT_THRESHOLD_FACTOR",
    "DTYPES",
    "ExportError",
    "build_metadata",
    "export_posterior",
    "read_metadata",
    "resolve_calibration",
    "threshold_from_structures",
]
