"""MPI helpers: the launcher next to this Python (the mpich wheel's) and the world we run in."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def mpirun_executable() -> str:
    """The mpich wheel's mpirun, so that LAMMPS and mpi4py share one MPI."""
    candidate = Path(sys.executable).parent / "mpirun"
    found = str(candidate) if candidate.exists() else shutil.which("mpirun")
    if not found:
        raise FileNotFoundError("mpirun not found next to this Python or on PATH (pip install 'lammps[mpi]')")
    return found


def mpi_world():
    """(comm, rank, size) when launched by mpirun with more than one rank, else (None, 0, 1)."""
    size = int(os.environ.get("PMI_SIZE", os.environ.get("OMPI_COMM_WORLD_SIZE", "1")))
    if size <= 1:
        return None, 0, 1
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    return comm, comm.Get_rank(), comm.Get_size()
