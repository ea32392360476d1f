"""The ``bayesrace`` command line: ``main`` (every subcommand) and ``export_main``
(``bayesrace-export``). argparse lives in this subpackage only: ``_main`` holds the
commands, ``_data`` the data sets, ``_properties`` the property and multi-state models."""

from ._main import build_parser, export_main, main

__all__ = ["build_parser", "export_main", "main"]
