"""LAMMPS from Python: writing inputs and data files, launching lmp (in this process or under
mpirun), reading dumps and logs; the on-the-fly MD segment and the PSB3 example.

The one place of the package that starts LAMMPS (``_runner``); nothing heavy is imported
before a function needs it.
"""

from .._mpi import mpirun_executable
from ._example import (
    PSB3_INPUT,
    psb3_data_text,
    run_psb3_example,
    write_psb3_example,
)
from ._inputs import (
    lammps_data_text,
    lammps_number,
)
from ._outputs import (
    MAX_SIGMA,
    MD_STEP,
    dump_frame_atoms,
    parse_thermo,
    read_dump,
)
from ._runner import (
    LmpResult,
    lammps_in,
    lmp_command,
    new_lammps,
    plugin_directory,
    preload_mpi,
    run_input_file,
    run_lmp,
)
from ._segment import (
    END_DATA,
    HALT_COLUMNS,
    HALT_MAXIMA,
    RESTART_DATA,
    frame_max_sigma,
    halting_column,
    last_trusted_frame,
    md_input_text,
    run_md_segment,
)

__all__ = [
    "mpirun_executable",
    "END_DATA",
    "HALT_COLUMNS",
    "HALT_MAXIMA",
    "MAX_SIGMA",
    "MD_STEP",
    "PSB3_INPUT",
    "RESTART_DATA",
    "LmpResult",
    "dump_frame_atoms",
    "frame_max_sigma",
    "halting_column",
    "lammps_data_text",
    "lammps_in",
    "lammps_number",
    "last_trusted_frame",
    "lmp_command",
    "md_input_text",
    "new_lammps",
    "parse_thermo",
    "plugin_directory",
    "preload_mpi",
    "psb3_data_text",
    "read_dump",
    "run_input_file",
    "run_lmp",
    "run_md_segment",
    "run_psb3_example",
    "write_psb3_example",
]
