"""pair_bayesrace/keys.h is generated from python/bayesrace/keys.py and must be current."""

from __future__ import annotations

import re
import runpy
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GEN = ROOT / "pair_bayesrace" / "gen_keys.py"
HEADER = ROOT / "pair_bayesrace" / "keys.h"


def test_keys_header_is_current():
    proc = subprocess.run([sys.executable, str(GEN), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr + "\n(run: python pair_bayesrace/gen_keys.py)"


def test_header_carries_every_python_key():
    keys = runpy.run_path(str(ROOT / "python" / "bayesrace" / "keys.py"))
    header = dict(re.findall(r'constexpr const char \*(\w+) = "([^"]*)";', HEADER.read_text()))
    for name, value in keys.items():
        if name.isupper() and isinstance(value, str):
            assert header.get(name) == value, name
    values = list(header.values())
    assert len(values) == len(set(values)), "two names share one string"


def test_no_field_literals_in_cpp():
    """C++ sources take field names from keys.h, never as string literals."""
    keys = runpy.run_path(str(ROOT / "python" / "bayesrace" / "keys.py"))
    names = {v for k, v in keys.items() if k.isupper() and isinstance(v, str)}
    names |= set(dict(re.findall(r'constexpr const char \*(\w+) = "([^"]*)";', HEADER.read_text())).values())
    # words that are also ordinary English in messages are checked only as exact literals
    offenders = []
    for path in (ROOT / "pair_bayesrace").rglob("*.[ch]*"):
        if path.name == "keys.h" or path.suffix not in {".h", ".cpp", ".hpp"}:
            continue
        for lit in re.findall(r'"([^"\\]*)"', path.read_text()):
            if lit in names:
                offenders.append(f"{path.relative_to(ROOT)}: \"{lit}\"")
    assert not offenders, offenders
