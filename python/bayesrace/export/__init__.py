"""Export: a trained posterior frozen into one deployable file with its metadata."""

from ._deployable import (
    ExportError,
    build_metadata,
    export_posterior,
    main,
    read_metadata,
    threshold_from_structures,
)

__all__ = [
    "ExportError",
    "build_metadata",
    "export_posterior",
    "main",
    "read_metadata",
    "threshold_from_structures",
]
