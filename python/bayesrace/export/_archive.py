"""Which format a deployable file is, and its metadata, without running it.

Both formats are zip archives that keep the metadata in the record
``<archive>/extra/metadata.json`` (``keys.ARCHIVE_METADATA_RECORD``): a TorchScript file
(``torch.jit.save``) and an AOTInductor package (``.pt2``), which the C++ core tells apart
the same way as here: a package holds ``<archive>/archive_format`` with the text ``pt2``.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Dict, Optional

from .. import keys
from ._deployable import ExportError

PT2_FORMAT_RECORD = "archive_format"  # torch's name: the record that marks a .pt2 package
PT2_FORMAT_TEXT = "pt2"


def _record(archive: zipfile.ZipFile, name: str) -> Optional[str]:
    """The full name of ``<archive>/name`` (any top-level folder), or None."""
    for full in archive.namelist():
        head, _, tail = full.partition("/")
        if head and tail == name:
            return full
    return None


def deployable_format(path) -> str:
    """``keys.FORMAT_AOTI`` for an AOTInductor package, else ``keys.FORMAT_TORCHSCRIPT``
    (also for files that are no zip archive: the TorchScript loader then says what is wrong)."""
    try:
        with zipfile.ZipFile(path) as archive:
            marker = _record(archive, PT2_FORMAT_RECORD)
            if marker is not None and archive.read(marker).decode(errors="replace").strip() == PT2_FORMAT_TEXT:
                return keys.FORMAT_AOTI
    except (zipfile.BadZipFile, OSError):
        pass
    return keys.FORMAT_TORCHSCRIPT


def read_metadata(path) -> Dict[str, object]:
    """The metadata of a deployable of either format (TorchScript ``.pt`` or AOTInductor
    ``.pt2``), without running it. A TorchScript file is loaded by torch (which checks it);
    a package is only read as the zip archive it is (loading it would load compiled code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such deployable")
    if deployable_format(path) == keys.FORMAT_AOTI:
        with zipfile.ZipFile(path) as archive:
            name = _record(archive, keys.ARCHIVE_METADATA_RECORD)
            if name is None:
                raise ExportError(f"{path}: an AOTInductor package without {keys.ARCHIVE_METADATA_RECORD}: "
                                  "not a bayesrace deployable")
            text = archive.read(name).decode()
    else:
        import torch

        extra = {keys.METADATA_FILE: ""}
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        text = extra[keys.METADATA_FILE]
        if not text:
            raise ExportError(f"{path}: no {keys.METADATA_FILE} inside")
    return json.loads(text)
