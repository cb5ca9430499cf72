"""Refuse pickled content anywhere in a bundle: pickles run code when loaded.

A file is refused when it is itself a pickle (protocol 2+ starts with ``0x80`` and a protocol
byte), or when it is a zip archive (a ``torch.save`` / ``torch.export.save`` file) holding, at
any nesting depth, an entry that is a pickle or is named like one (``*.pkl``, ``*.pickle``).
Nesting matters: ``torch.export.save`` stores its sample inputs as a ``torch.save`` zip *inside*
the pt2 zip, and that inner zip holds ``data.pkl``. This runs on raw bytes before any parser sees
them, on both the sending and the receiving side.
"""
from __future__ import annotations

import io
import zipfile

from .errors import ArtifactError

_PICKLE_SUFFIXES = (".pkl", ".pickle")
_MAX_ZIP_ENTRIES = 100_000
_MAX_DEPTH = 4
_MAX_NESTED_BYTES = 512 * 1024 * 1024
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")


def _looks_pickled(head: bytes) -> bool:
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def reject_pickles(name: str, data: bytes) -> None:
    """Raise ``ArtifactError`` naming ``name`` (and the entry) if ``data`` holds a pickle."""
    _check(name, data, 0)


def _check(name: str, data: bytes, depth: int) -> None:
    head = bytes(data[:4])
    if _looks_pickled(head):
        raise ArtifactError(f"{name} is a pickle; pickled content is refused (it would run code when loaded)")
    if head not in _ZIP_MAGICS:
        return
    if depth >= _MAX_DEPTH:
        raise ArtifactError(f"{name}: zip archives nested more than {_MAX_DEPTH} deep")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, NotImplementedError) as exc:
        raise ArtifactError(f"{name} looks like a zip archive but is malformed") from exc
    if len(infos) > _MAX_ZIP_ENTRIES:
        raise ArtifactError(f"{name}: zip archive with more than {_MAX_ZIP_ENTRIES} entries")
    for info in infos:
        entry = f"{name}:{info.filename}"
        if info.filename.lower().endswith(_PICKLE_SUFFIXES):
            raise ArtifactError(f"{entry} is a pickled entry; archives holding pickles are refused")
        try:
            with archive.open(info) as handle:
                entry_head = handle.read(4)
                if entry_head in _ZIP_MAGICS:
                    if info.file_size > _MAX_NESTED_BYTES:
                        raise ArtifactError(f"{entry}: nested archive too large to inspect")
                    nested = entry_head + handle.read(_MAX_NESTED_BYTES + 1)
                    if len(nested) > _MAX_NESTED_BYTES:
                        raise ArtifactError(f"{entry}: nested archive too large to inspect")
                    _check(entry, nested, depth + 1)
        except (zipfile.BadZipFile, NotImplementedError, RuntimeError, OSError, EOFError, ValueError) as exc:
            raise ArtifactError(f"{entry}: cannot read zip entry") from exc
        if _looks_pickled(entry_head):
            raise ArtifactError(f"{entry} is a pickled entry; archives holding pickles are refused")
