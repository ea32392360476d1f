"""The package version (one home: the root package, the CLI and the exporter read it here)."""

__version__ = "0.1.0"
