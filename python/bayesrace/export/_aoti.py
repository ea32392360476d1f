"""Export a posterior as an AOTInductor package (``.pt2``) beside the TorchScript deployable.

The package holds the same ``DeployedPosterior.forward`` (shell mode: the whole graph of a
structure, forces and virials by autograd) compiled ahead of time to C++ by
``torch._inductor``, and the same metadata as the TorchScript file (``build_metadata``)
plus the fields the compiled code needs (``keys.META_FORMAT`` ... ``keys.META_COMPILED_ON``).
The C++ core loads it with ``torch::inductor::AOTIModelPackageLoader`` and applies the same
checks; it runs the shell mode only (the per-layer methods of layer mode are not compiled).

How: ``torch.export`` cannot trace ``torch.autograd.grad`` inside a forward pass, so the
forward pass is first traced by ``make_fx`` (symbolic sizes), which writes the backward
pass out as plain aten operations; that graph is exported with dynamic sizes (atoms N,
edges E, local atoms n_local) and compiled by AOTInductor. ``n_local`` is an integer
argument of forward(); here it is the length of an extra int64 input
(``keys.LOCAL_ATOMS``, values unused), so that it stays a size, not a constant.

Two compiled models go into one package, because the per-atom virial is a graph output
only when asked for (LAMMPS asks when a compute needs it): ``keys.AOTI_MODEL_PLAIN`` and
``keys.AOTI_MODEL_ATOMIC_VIRIAL``; each takes about a minute to compile.

The compiled kernels are tied to what compiled them: the torch version (the C++ core
refuses another) and the CPU (inductor compiles with ``-march=native`` and the vector ISA
it picks, ``keys.META_CPU_ISA``; the core refuses a CPU without that ISA). The kernels are
compiled single-threaded: the LAMMPS plugin runs one torch thread per MPI rank.
"""

from __future__ import annotations

import contextlib
import json
import platform
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import keys
from .._files import atomic_path
from ..bayes import Posterior
from ._deployable import DTYPES, DeployedPosterior, ExportError, checked_metadata, deployed_posterior

# the order of the compiled models' inputs and outputs (also written into the metadata)
INPUT_KEYS = [keys.POSITIONS, keys.SPECIES, keys.EDGE_INDEX, keys.EDGE_SHIFTS, keys.LOCAL_ATOMS]
OUTPUT_KEYS = [
    keys.MEMBER_ENERGY,
    keys.MEMBER_ATOMIC_ENERGY,
    keys.MEMBER_FORCES,
    keys.MEMBER_VIRIAL,
    keys.MEMBER_ATOMIC_VIRIAL,
    keys.ATOMIC_ENERGY_LOG_VAR,
    keys.FORCE_COVARIANCE,
    keys.MEMBER_FEATURE_DISTANCE,  # [M, 0] without a feature density
]
MODELS = {keys.AOTI_MODEL_PLAIN: False, keys.AOTI_MODEL_ATOMIC_VIRIAL: True}  # name -> compute_atomic_virial
MAX_ATOMS = 1 << 24  # upper bounds of the dynamic sizes (the compiled code checks them)
MAX_EDGES = 1 << 30


def check_aoti_toolchain() -> str:
    """The C++ compiler AOTInductor will use; ExportError when this torch has no inductor or
    no C++ compiler is found."""
    try:
        import torch._inductor  # noqa: F401
        from torch._inductor import aot_compile  # noqa: F401
        from torch._inductor.cpp_builder import get_cpp_compiler
        from torch.export.pt2_archive._package import package_pt2  # noqa: F401
    except ImportError as error:
        raise ExportError(f"this torch build ({torch.__version__}) cannot compile AOTInductor packages "
                          f"({error}); use --format torchscript") from None
    try:
        return get_cpp_compiler()
    except Exception as error:  # torch raises its own InvalidCxxCompiler
        raise ExportError(f"no C++ compiler found for AOTInductor ({str(error).strip().splitlines()[0]}): install "
                          "g++ or clang++ (or set CXX), or use --format torchscript") from None


def cpu_isa() -> str:
    """The vector ISA inductor compiles CPU kernels for on this machine ("" for none)."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return str(pick_vec_isa() or "")


def cpu_name() -> str:
    """The CPU model (``model name`` of /proc/cpuinfo), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def example_inputs(type_count: int, cutoff: float, dtype: torch.dtype) -> Tuple[torch.Tensor, ...]:
    """A structure to trace with: 37 atoms on a jittered lattice (spacing 0.45 × cutoff) with
    every pair within the cutoff as edges, 35 of them local. Its sizes differ from each other
    and from every width of the network, so that none is mistaken for a constant."""
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(np.arange(4), np.arange(4), np.arange(3), indexing="ij"), -1).reshape(-1, 3)[:37]
    positions = (grid + rng.uniform(-0.1, 0.1, grid.shape)) * 0.45 * cutoff
    distance = np.linalg.norm(positions[None, :, :] - positions[:, None, :], axis=-1)
    centre, neighbour = np.nonzero((distance < cutoff) & ~np.eye(len(positions), dtype=bool))
    species = np.arange(len(positions)) % type_count
    return (
        torch.tensor(positions, dtype=dtype),
        torch.tensor(species, dtype=torch.int64),
        torch.tensor(np.stack([centre, neighbour]), dtype=torch.int64),
        torch.zeros(len(centre), 3, dtype=dtype),
        torch.zeros(len(positions) - 2, dtype=torch.int64),
    )


@contextlib.contextmanager
def _distinct_symbolic_sizes():
    """Tracing gives every input size its own symbol, even sizes equal in the example
    ("duck shapes" would tie them for good)."""
    config = torch.fx.experimental._config
    old = config.use_duck_shape
    config.use_duck_shape = False
    try:
        yield
    finally:
        config.use_duck_shape = old


def trace_forward(deployed: DeployedPosterior, example: Sequence[torch.Tensor],
                  compute_atomic_virial: bool) -> torch.fx.GraphModule:
    """forward() with its autograd written out as aten operations (make_fx, symbolic sizes):
    inputs ``INPUT_KEYS``, a tuple of outputs in the order ``OUTPUT_KEYS``."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def forward(positions, species, edge_index, edge_shifts, local_atoms):
        out = deployed(positions, species, edge_index, edge_shifts, local_atoms.shape[0], compute_atomic_virial)
        if sorted(out) != sorted(OUTPUT_KEYS):
            raise ExportError(f"forward() returned {sorted(out)}, the .pt2 export knows {sorted(OUTPUT_KEYS)}")
        return tuple(out[name] for name in OUTPUT_KEYS)

    with _distinct_symbolic_sizes():
        return make_fx(forward, tracing_mode="symbolic", _allow_non_fake_inputs=True,
                       _error_on_data_dependent_ops=True)(*[t.clone() for t in example])


def compile_forward(deployed: DeployedPosterior, example: Sequence[torch.Tensor], compute_atomic_virial: bool) -> list:
    """The files of one AOTInductor model of forward() (to be packaged)."""
    from torch.export import Dim

    graph = trace_forward(deployed, example, compute_atomic_virial)
    atoms = Dim("n_atoms", min=1, max=MAX_ATOMS)
    edges = Dim("n_edges", min=0, max=MAX_EDGES)
    local = Dim("n_local", min=0, max=MAX_ATOMS)
    dynamic = ({0: atoms}, {0: atoms}, {1: edges}, {0: edges}, {0: local})
    try:
        program = torch.export.export(graph, tuple(example), dynamic_shapes=dynamic, strict=False)
    except Exception as error:
        raise ExportError(f"torch.export failed on the traced forward(): {str(error).splitlines()[0]}") from error
    options = {"aot_inductor.package": True, "cpp.threads": 1}
    return torch._inductor.aot_compile(program.module(), tuple(example), options=options)


def export_posterior_aoti(
    posterior: Posterior,
    path,
    *,
    calibration: Optional[Dict[str, float]] = None,
    thresholds: Optional[Dict[str, float]] = None,
    dtype=None,
    training_data_sha256: Optional[str] = None,
    atomic_virial: bool = True,
    log=None,
) -> Dict[str, object]:
    """Write the AOTInductor deployable (``.pt2``) of ``posterior`` to ``path``; returns its
    metadata. The arguments mean what they mean for ``export_posterior``; in addition
    ``atomic_virial=False`` compiles only the model without the per-atom virial (half the
    compile time; the C++ core then refuses runs that need per-atom virials, e.g. LAMMPS
    ``compute stress/atom``); ``log``: a function given a line of progress, or None."""
    path = Path(path)
    if path.suffix != ".pt2":
        raise ExportError(f"{path}: an AOTInductor deployable's file name must end in .pt2")
    dtype_name, metadata = checked_metadata(posterior, dtype, calibration, thresholds, training_data_sha256)
    check_aoti_toolchain()
    dtype_value = DTYPES[dtype_name]
    deployed = deployed_posterior(posterior, dtype_value)
    example = example_inputs(len(posterior.type_names), float(posterior.cutoff), dtype_value)
    names: List[str] = [keys.AOTI_MODEL_PLAIN] + ([keys.AOTI_MODEL_ATOMIC_VIRIAL] if atomic_virial else [])
    files = {}
    # the kernels follow the thread count of the compiling process: compile them single-threaded
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in names:
            start = time.perf_counter()
            files[name] = compile_forward(deployed, example, MODELS[name])
            if log:
                log(f"compiled {name} in {time.perf_counter() - start:.0f} s")
    finally:
        torch.set_num_threads(threads)
    metadata.update({
        keys.META_FORMAT: keys.FORMAT_AOTI,
        keys.META_INPUT_KEYS: list(INPUT_KEYS),
        keys.META_OUTPUT_KEYS: list(OUTPUT_KEYS),
        keys.META_AOTI_MODELS: names,
        keys.META_MACHINE: platform.machine(),
        keys.META_CPU_ISA: cpu_isa(),
        keys.META_COMPILED_ON: cpu_name(),
    })
    from torch.export.pt2_archive._package import package_pt2

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        package_pt2(str(tmp), aoti_files=files,
                    extra_files={keys.METADATA_FILE: json.dumps(metadata, indent=1)})
    return metadata


def load_aoti(path, compute_atomic_virial: bool = False):
    """The compiled forward() of a ``.pt2`` deployable in Python (``aoti_load_package``):
    a function of (positions, species, edge_index, edge_shifts, n_local) returning the dict
    of ``DeployedPosterior.forward``; for tests and benchmarks (LAMMPS uses the C++ core)."""
    from torch._inductor.package import load_package

    from ._archive import read_metadata

    metadata = read_metadata(path)
    if metadata.get(keys.META_FORMAT) != keys.FORMAT_AOTI:
        raise ExportError(f"{path}: not an AOTInductor deployable ({keys.META_FORMAT} is "
                          f"{metadata.get(keys.META_FORMAT)!r})")
    name = keys.AOTI_MODEL_ATOMIC_VIRIAL if compute_atomic_virial else keys.AOTI_MODEL_PLAIN
    if name not in metadata[keys.META_AOTI_MODELS]:
        if compute_atomic_virial:
            raise ExportError(f"{path} was exported without the per-atom virial model")
        name = keys.AOTI_MODEL_ATOMIC_VIRIAL
    model = load_package(str(path), name, run_single_threaded=True)
    output_keys = list(metadata[keys.META_OUTPUT_KEYS])

    def forward(positions, species, edge_index, edge_shifts, n_local: int) -> Dict[str, torch.Tensor]:
        local = torch.empty(int(n_local), dtype=torch.int64)
        out = dict(zip(output_keys, model(positions, species, edge_index, edge_shifts, local)))
        if not compute_atomic_virial:
            out[keys.MEMBER_ATOMIC_VIRIAL] = torch.empty(0, dtype=positions.dtype)
        return out

    return forward
