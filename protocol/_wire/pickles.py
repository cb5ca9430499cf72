"""Refuse pickled content anywhere in a bundle: pickles run code when loaded.

A file is refused when it is itself a pickle (protocol 2+ starts with ``0x80`` and a protocol
byte), or when it is a zip archive (a ``torch.save`` / ``torch.export.save`` file) holding, at
any nesting depth, an entry that is a pickle or is named like one (``*.pkl``, ``*.pickle``).
Nesting matters: ``torch.export.save`` stores its sample inputs as a ``torch.save`` zip *inside*
the pt2 zip, and that inner zip holds ``data.pkl``. This runs on raw bytes before any parser sees
them, on both the sending and the receiving side.

The scan must not be a way to exhaust the host either (``ScanLimits``): a nested archive has to be
inflated to be read, so the bytes inflated over the whole scan are bounded (read in chunks,
stopping at the bound) and a nested entry whose declared sizes claim more than ``max_ratio``
times compression is refused without inflating it (zipfile never yields more than the declared
size). A safetensors file is not a pickle even when its 8-byte little-endian header length starts
with the pickle magic (a 640-byte header is ``80 02 00 ...``): the bytes are refused only if they
do not parse as safetensors, or if they also read as a pickle past the length field (a
safetensors/pickle polyglot).
"""

from __future__ import annotations

import io
import pickletools
import zipfile
from dataclasses import dataclass
from typing import IO

from ..errors import ArtifactError
from .safetensors import parse_header

_PICKLE_SUFFIXES = (".pkl", ".pickle")
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
_CHUNK = 1 << 20
_SAFETENSORS_LENGTH = 8  # bytes of the little-endian header length that opens a safetensors file


@dataclass(frozen=True)
class ScanLimits:
    """How much work one scan may do: archive entries, nesting, inflated bytes, compression ratio."""

    max_entries: int = 100_000  # per archive
    max_depth: int = 4
    max_inflated: int = 128 * 1024 * 1024  # nested-archive bytes inflated over the whole scan
    max_ratio: int = 100  # declared size / compressed size of a nested archive entry


DEFAULT_SCAN_LIMITS = ScanLimits()


def _pickle_reads_past(data: bytes, offset: int) -> bool:
    """Whether a pickle loader would get past ``offset`` bytes of ``data`` without an error."""
    try:
        for _, _, position in pickletools.genops(io.BytesIO(data)):
            if position is not None and position >= offset:
                return True
    except Exception:  # genops raises several kinds on bytes that are no pickle
        return False
    return False


def _is_safetensors(data: bytes) -> bool:
    try:
        parse_header(data)
    except ArtifactError:
        return False
    return not _pickle_reads_past(data, _SAFETENSORS_LENGTH)


def _looks_pickled(head: bytes, data: bytes | None = None) -> bool:
    """Pickle magic at the start, unless ``data`` (the whole file) is a valid safetensors file."""
    if not (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
        return False
    return data is None or not _is_safetensors(data)


def reject_pickles(name: str, data: bytes, limits: ScanLimits = DEFAULT_SCAN_LIMITS) -> None:
    """Raise ``ArtifactError`` naming ``name`` (and the entry) if ``data`` holds a pickle."""
    _Scan(limits).check(name, data, 0)


class _Scan:
    """One scan's state: the inflation budget left, shared by every nesting level."""

    def __init__(self, limits: ScanLimits):
        self.limits = limits
        self.budget = limits.max_inflated

    def check(self, name: str, data: bytes, depth: int) -> None:
        head = bytes(data[:4])
        if _looks_pickled(head, data):
            raise ArtifactError(f"{name} is a pickle; pickled content is refused (it would run code when loaded)")
        if head not in _ZIP_MAGICS:
            return
        if depth >= self.limits.max_depth:
            raise ArtifactError(f"{name}: zip archives nested more than {self.limits.max_depth} deep")
        try:
            archive = zipfile.ZipFile(io.BytesIO(data))
            infos = archive.infolist()
        except (zipfile.BadZipFile, ValueError, OSError, EOFError, NotImplementedError) as exc:
            raise ArtifactError(f"{name} looks like a zip archive but is malformed") from exc
        if len(infos) > self.limits.max_entries:
            raise ArtifactError(f"{name}: zip archive with more than {self.limits.max_entries} entries")
        for info in infos:
            entry = f"{name}:{info.filename}"
            if info.filename.lower().endswith(_PICKLE_SUFFIXES):
                raise ArtifactError(f"{entry} is a pickled entry; archives holding pickles are refused")
            try:
                with archive.open(info) as handle:
                    entry_head = handle.read(4)
                    if entry_head in _ZIP_MAGICS:
                        nested = self._inflate(entry, info, entry_head, handle)
                        self.check(entry, nested, depth + 1)
            except (zipfile.BadZipFile, NotImplementedError, RuntimeError, OSError, EOFError, ValueError) as exc:
                raise ArtifactError(f"{entry}: cannot read zip entry") from exc
            if _looks_pickled(entry_head):
                raise ArtifactError(f"{entry} is a pickled entry; archives holding pickles are refused")

    def _inflate(self, entry: str, info: zipfile.ZipInfo, head: bytes, handle: IO[bytes]) -> bytes:
        """A nested archive's bytes, refused before or while inflating once a bound is crossed."""
        if info.file_size > self.limits.max_ratio * max(info.compress_size, 1):
            raise ArtifactError(
                f"{entry}: nested archive claims more than {self.limits.max_ratio}x compression (a zip bomb); send the files uncompressed"
            )
        too_much = ArtifactError(
            f"{entry}: nested archives inflate past the scan's limit of {self.limits.max_inflated} bytes; send the files uncompressed and unnested"
        )
        if info.file_size > self.budget:
            raise too_much
        chunks, size = [head], len(head)
        while True:
            chunk = handle.read(_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > self.budget:
                raise too_much
            chunks.append(chunk)
        self.budget -= size
        return b"".join(chunks)
