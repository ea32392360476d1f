"""Running training: ``train``, the entry point (members over the MPI ranks, then
``posterior.pt``), and running it as ``mpirun`` child processes from a config file.

An ensemble trains its members one after another, or in parallel under
``mpirun -np K bayesrace train`` (member m on rank m mod K, one torch thread per rank).
The other kinds train one model: under mpirun only rank 0 trains and the other ranks
wait. Rank 0 then writes ``posterior.pt``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from .._mpi import mpi_world, mpirun_executable
from ..bayes import save_posterior, training_feature_density
from ..data import shortest_contacts
from ._config import Config, config_to_dict
from ._data import prepare_data, write_held_out
from ._kinds import posterior_members
from ._shallow import head_config
from ._loop import train_member

POSTERIOR_FILE = "posterior.pt"


def train_under_mpirun(config_path, ranks: int, quiet: bool = False) -> None:
    """``bayesrace train config_path`` as ``mpirun -np ranks`` child processes (ensemble members
    spread over the ranks, one torch thread each); raises RuntimeError naming the command if
    it fails (the trainer's own message is on stderr above it)."""
    import subprocess

    command = [mpirun_executable(), "-np", str(int(ranks)), sys.executable, "-m", "bayesrace.cli", "train",
               str(config_path)] + (["--quiet"] if quiet else [])
    if subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode != 0:
        raise RuntimeError(f"training failed (see its message above); command: {' '.join(command)}")


def train_config_file(config: Config, path) -> Path:
    """Write ``config`` as the YAML that ``bayesrace train`` reads back to the same Config."""
    import yaml

    path = Path(path)
    path.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    return path


def train(config: Config, progress: bool = True) -> Path:
    """Train the configured posterior (resuming where checkpoints exist); write posterior.pt.

    Under mpirun, ensemble members are spread over the ranks; the other kinds train one
    model on rank 0 while the other ranks wait."""
    comm, rank, size = mpi_world()
    torch.set_num_threads(config.training.threads)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (out / "config.json").write_text(json.dumps(config_to_dict(config), indent=2))
    data = prepare_data(config, progress=False)
    held_out = write_held_out(config, data, out) if rank == 0 else None
    kind = config.posterior.kind
    if rank == 0 and progress:
        what = dict(ensemble=f"{config.n_members} member(s)",
                    shallow=f"one network with {config.n_members} readout heads").get(kind, "one model")
        print(
            f"bayesrace train: posterior {kind}, {len(data.train)} training / {len(data.valid)} validation "
            f"structures, types {data.type_names}, {what} on {size} process(es), "
            f"avg neighbours {data.avg_num_neighbors:.1f}"
            + (f"; the {len(data.valid)} held-out structures are in {held_out}" if held_out else ""),
            file=sys.stderr,
            flush=True,
        )
    if kind == "shallow":
        # the heads train on member 0's trunk: it comes first, then the heads over the ranks
        if rank == 0:
            train_member(config, data, 0, progress=progress, use_bar=size == 1)
        if comm is not None:
            _wait_for_every_rank(comm)
        for member in range(1 + rank, config.n_members, size):
            train_member(head_config(config), data, member, progress=progress, use_bar=size == 1)
    else:
        for member in range(rank, config.n_members, size):
            train_member(config, data, member, progress=progress, use_bar=size == 1)
    if comm is not None:
        _wait_for_every_rank(comm)
    path = out / POSTERIOR_FILE
    if rank == 0:
        members, extra = posterior_members(config, data, progress=progress)
        save_posterior(
            path,
            members,
            kind=kind,
            config=config_to_dict(config),
            data_sha256=data.data_sha256,
            shortest_contacts=shortest_contacts(data.train, len(data.type_names)),
            feature_density=training_feature_density(members, data.train),
            **extra,
        )
    if comm is not None:
        _wait_for_every_rank(comm)
    return path


def _wait_for_every_rank(comm, poll_seconds: float = 0.2) -> None:
    """A barrier that sleeps while it waits: a rank whose members are done (or every rank but 0
    while it writes the posterior) would otherwise spin a core at 100 % in MPI_Barrier for
    minutes, slowing the ranks still training on a shared machine."""
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(poll_seconds)
