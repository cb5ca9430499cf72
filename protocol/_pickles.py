"""Refuse pickled content anywhere in a bundle: pickles run code when loaded.

A file is refused when it is itself a pickle (protocol 2+ starts with ``0x80`` and a protocol
byte), or when it is a zip archive (a ``torch.save`` / ``torch.export.save`` file) holding any
entry that is a pickle or is named like one (``*.pkl``, ``data.pkl``, ``*.pickle``). This runs on
raw bytes before any parser sees them, on both the sending and the receiving side.
"""
from __future__ import annotations

import io
import zipfile

from .errors import ArtifactError

_PICKLE_SUFFIXES = (".pkl", ".pickle")
_MAX_ZIP_ENTRIES = 100_000


def _looks_pickled(head: bytes) -> bool:
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def reject_pickles(name: str, data: bytes) -> None:
    """Raise ``ArtifactError`` naming ``name`` (and the entry) if ``data`` holds a pickle."""
    head = bytes(data[:4])
    if _looks_pickled(head):
        raise ArtifactError(f"{name} is a pickle; pickled content is refused (it would run code when loaded)")
    if head[:4] != b"PK\x03\x04" and head[:4] != b"PK\x05\x06":
        return
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise ArtifactError(f"{name} looks like a zip archive but is malformed") from exc
    if len(infos) > _MAX_ZIP_ENTRIES:
        raise ArtifactError(f"{name}: zip archive with more than {_MAX_ZIP_ENTRIES} entries")
    for info in infos:
        if info.filename.lower().endswith(_PICKLE_SUFFIXES):
            raise ArtifactError(f"{name} holds pickled entry {info.filename!r}; pickled archives are refused")
        try:
            with archive.open(info) as handle:
                entry_head = handle.read(2)
        except (zipfile.BadZipFile, NotImplementedError, RuntimeError, OSError, EOFError) as exc:
            raise ArtifactError(f"{name}: cannot read zip entry {info.filename!r}") from exc
        if _looks_pickled(entry_head):
            raise ArtifactError(f"{name} holds pickled entry {info.filename!r}; pickled archives are refused")
