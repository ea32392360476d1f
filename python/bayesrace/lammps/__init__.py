"""LAMMPS from Python: writing inputs, launching lmp (under mpirun), reading dumps and logs."""

from ._example import (
    PSB3_INPUT,
    psb3_data_text,
    run_psb3_example,
)

__all__ = [
    "PSB3_INPUT",
    "psb3_data_text",
    "run_psb3_example",
]
