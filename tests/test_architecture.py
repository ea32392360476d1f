"""The house rules, checked on the source tree (docs/architecture.md draws the same layers).

- a module imports only from its own unit (subpackage or top-level module) or from a unit
  in a lower layer: data knows no model, the model knows no training loop, nothing below
  the front ends knows the CLI; siblings in one layer are independent of each other;
- no import loop, counting the imports inside functions too;
- inside a subpackage, modules import each other directly, never through the package's
  own ``__init__`` (that would be a loop through the public API);
- argparse lives in the ``cli`` subpackage only; the C++ core includes no LAMMPS header;
- no source file over 500 lines.
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "python" / "bayesrace"

# lowest first; a unit is a subpackage or a top-level module of bayesrace
LAYERS = (
    ("keys", "_version", "_files", "_mpi", "_schema", "lammps_plugin"),
    ("data", "_figures"),
    ("model",),
    ("bayes",),
    ("train", "uq", "lammps", "calculator"),
    ("export", "properties"),
    ("active",),
    ("demo",),
    ("cli", "__init__"),
)
LAYER_OF = {unit: level for level, units in enumerate(LAYERS) for unit in units}
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_package(module: str) -> bool:
    return (PACKAGE.parent / module.replace(".", "/") / "__init__.py").is_file()


def _exists(module: str) -> bool:
    base = PACKAGE.parent / module.replace(".", "/")
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _imports(path: Path):
    """(line, imported module) for every bayesrace import in ``path``, at any depth."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "bayesrace":
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "bayesrace":
                base = node.module
            else:
                continue
            for alias in node.names:  # `from . import keys` imports a module, not a name
                yield node.lineno, base + "." + alias.name if _exists(base + "." + alias.name) else base


def _unit(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_unit_has_a_layer():
    units = {_unit(_module_name(path)) for path in SOURCES}
    assert units <= set(LAYER_OF), f"units without a layer in LAYERS: {sorted(units - set(LAYER_OF))}"


def test_imports_go_down_the_layers():
    wrong = []
    for path in SOURCES:
        importer = _unit(_module_name(path))
        for line, imported in _imports(path):
            target = _unit(imported)
            if target != importer and LAYER_OF[target] >= LAYER_OF[importer]:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {importer} (layer {LAYER_OF[importer]}) "
                             f"imports {imported} (layer {LAYER_OF[target]})")
    assert not wrong, "imports that go up or sideways:\n" + "\n".join(wrong)


def test_a_subpackage_does_not_import_itself_through_its_init():
    wrong = []
    for path in SOURCES:
        module = _module_name(path)
        if path.name == "__init__.py" or module.count(".") < 2:
            continue
        own_package = module.rpartition(".")[0]
        for line, imported in _imports(path):
            if imported == own_package:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: imports its own package {own_package}")
    assert not wrong, "\n".join(wrong)


def test_no_import_loop():
    graph = {_module_name(path): sorted({imported for _, imported in _imports(path)}) for path in SOURCES}
    state, stack, loops = {}, [], []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for imported in graph.get(module, ()):
            if state.get(imported) == "open":
                loops.append(" -> ".join(stack[stack.index(imported):] + [imported]))
            elif imported not in state:
                visit(imported)
        stack.pop()
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module)
    assert not loops, "import loops:\n" + "\n".join(loops)


def test_argparse_only_in_the_cli():
    users = [str(path.relative_to(ROOT)) for path in SOURCES
             if path.parent.name != "cli" and re.search(r"^\s*(import argparse|from argparse)", path.read_text(), re.M)]
    assert not users, f"argparse outside bayesrace/cli/: {users}"


def test_the_cpp_core_knows_no_lammps():
    lammps_headers = re.compile(r'#include\s+[<"](lammps|lmptype|pointers|pair|compute|atom|comm|force|'
                                r'neighbor|neigh_list|error|memory|update|domain)\.h[>"]')
    users = [str(path.relative_to(ROOT)) for path in sorted((ROOT / "pair_bayesrace" / "core").iterdir())
             if lammps_headers.search(path.read_text())]
    assert not users, f"LAMMPS headers in the LAMMPS-free core: {users}"


def _own_files(folder: Path):
    """The project's files under ``folder``: tracked or new, not git-ignored (a benchmark's
    scratch venv under bench/runs/ is not ours); every file when this is not a git checkout."""
    try:
        listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z", str(folder)], cwd=ROOT,
                                capture_output=True, check=True).stdout.decode()
    except (OSError, subprocess.CalledProcessError):
        return sorted(folder.rglob("*"))
    return sorted(ROOT / name for name in listed.split("\0") if name)


@pytest.mark.parametrize("folder", ["python", "bench", "pair_bayesrace", "tests", "export"])
def test_no_file_over_500_lines(folder):
    suffixes = {".py", ".cpp", ".h", ".hpp", ".cmake", ".txt", ".sh"}
    long = []
    for path in _own_files(ROOT / folder):
        if path.suffix in suffixes and path.is_file() and "results" not in path.parts:
            count = len(path.read_text(errors="replace").splitlines())
            if count > MAX_LINES:
                long.append(f"{path.relative_to(ROOT)}: {count} lines")
    assert not long, f"files over {MAX_LINES} lines:\n" + "\n".join(long)
