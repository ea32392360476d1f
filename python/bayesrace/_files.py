"""Writing files safely and as plain JSON: the one home of both, for every subpackage.

Atomic writes: a LAMMPS job may be reading the previous model, a kill -9 may land
mid-write, and a reader must see the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np


@contextmanager
def atomic_path(path: os.PathLike | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix, so writers that infer the format
    from it work); when the block succeeds it replaces ``path`` in one rename, and when it
    fails the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f"{path.stem}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: os.PathLike | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: os.PathLike | str, value: Any, indent: int | None = 2) -> None:
    """``value`` through ``jsonable`` (numpy and non-finite numbers made plain), atomically."""
    write_text_atomic(path, json.dumps(jsonable(value), indent=indent))


def jsonable(value: Any) -> Any:
    """Plain JSON data: numpy scalars and arrays become numbers and lists; NaN and ±inf
    (JSON has none; e.g. a missing correlation of a constant σ) become null."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value
