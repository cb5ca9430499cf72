"""Bit-packed pruning masks: one bit per weight, with a canonical header.

Format: ``b"BPMASK1\\n" | u32 len | header | bits``; the header is canonical JSON
``{"tensors": [{"name", "shape", "offset", "nbytes"}...]}`` sorted by name, and each tensor's
bits are ``numpy.packbits`` (big bit order) of its flattened 0/1 values. Padding bits must be zero
and the sections must tile the data exactly, so one mask has exactly one encoding (nothing can
ride along in spare bits). ``unpack_masks`` returns ``torch.bool`` tensors.

``check_pattern_masks`` is the receiving owner's check of what a mask may say (DESIGN "Pruning"):
masks only on pattern-prunable conv weights, and every 3x3 kernel either removed whole
(connectivity pruning) or keeping one pattern of the library (four entries, the centre among
them). A mask that keeps a fifth weight, drops the centre, or uses a pattern outside the library
describes a model the code generator cannot emit and the entity did not say it made.
"""
from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Set
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import _json, canonical
from .errors import MaskError

__all__ = ["CENTRE", "DEFAULT_LIBRARY_SIZE", "KERNEL", "MAGIC", "MAX_HEADER", "MAX_LIBRARY", "MAX_RANK", "MaskStats", "PATTERN_ENTRIES", "check_pattern_masks", "pack_masks", "parse_library", "unpack_masks"]

MAGIC = b"BPMASK1\n"
MAX_HEADER = 16 * 1024 * 1024
MAX_RANK = 8


def pack_masks(masks: Mapping[str, torch.Tensor]) -> bytes:
    """Pack 0/1 (or bool) tensors keyed by parameter name; other values are a ``MaskError``."""
    entries = []
    blobs = []
    offset = 0
    for name in sorted(masks):
        if not isinstance(name, str) or not name:
            raise MaskError(f"mask name {name!r} must be a non-empty string")
        tensor = masks[name]
        if not isinstance(tensor, torch.Tensor):
            raise MaskError(f"mask {name!r} is not a tensor")
        flat = tensor.detach().to("cpu").reshape(-1)
        if flat.dtype != torch.bool:
            if flat.is_floating_point() and not bool(torch.isfinite(flat).all()):
                raise MaskError(f"mask {name!r} holds non-finite values")
            if not bool(((flat == 0) | (flat == 1)).all()):
                raise MaskError(f"mask {name!r} holds values other than 0 and 1")
            flat = flat != 0
        bits = np.packbits(flat.numpy().astype(np.uint8, copy=False)).tobytes()
        entries.append({"name": name, "shape": list(tensor.shape), "offset": offset, "nbytes": len(bits)})
        blobs.append(bits)
        offset += len(bits)
    header = canonical.dumps({"tensors": entries})
    return b"".join([MAGIC, struct.pack(">I", len(header)), header, *blobs])


def unpack_masks(data: bytes) -> dict[str, torch.Tensor]:
    """Strictly decode ``pack_masks`` output into bool tensors; anything else is a ``MaskError``."""
    if len(data) < len(MAGIC) + 4 or bytes(data[: len(MAGIC)]) != MAGIC:
        raise MaskError("not a packed mask file (bad magic)")
    (n,) = struct.unpack(">I", data[len(MAGIC) : len(MAGIC) + 4])
    start = len(MAGIC) + 4
    if n > MAX_HEADER or start + n > len(data):
        raise MaskError("packed mask header length out of bounds")
    try:
        header = _json.loads(bytes(data[start : start + n]))
    except canonical.CanonicalJSONError as exc:
        raise MaskError(f"packed mask header malformed: {exc}") from exc
    if not isinstance(header, dict) or set(header) != {"tensors"} or not isinstance(header["tensors"], list):
        raise MaskError("packed mask header must be {\"tensors\": [...]}")
    body = memoryview(data)[start + n :]
    out: dict[str, torch.Tensor] = {}
    cursor = 0
    previous = None
    for entry in header["tensors"]:
        if not isinstance(entry, dict) or set(entry) != {"name", "shape", "offset", "nbytes"}:
            raise MaskError("packed mask entry must have name, shape, offset, nbytes")
        name, shape, offset, nbytes = entry["name"], entry["shape"], entry["offset"], entry["nbytes"]
        if not isinstance(name, str) or not name or (previous is not None and name <= previous):
            raise MaskError("packed mask names must be non-empty, unique and sorted")
        previous = name
        if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(type(d) is int and 0 <= d < 2**40 for d in shape):
            raise MaskError(f"mask {name!r}: malformed shape")
        count = math.prod(shape)
        if offset != cursor or nbytes != (count + 7) // 8 or cursor + nbytes > len(body):
            raise MaskError(f"mask {name!r}: offsets or length inconsistent with its shape")
        packed = np.frombuffer(body[cursor : cursor + nbytes], dtype=np.uint8)
        cursor += nbytes
        if count % 8 and nbytes and int(packed[-1]) & ((1 << (8 - count % 8)) - 1):
            raise MaskError(f"mask {name!r}: non-zero padding bits")
        bits = np.unpackbits(packed, count=count).astype(bool)
        out[name] = torch.from_numpy(bits.copy()).reshape(shape)
    if cursor != len(body):
        raise MaskError(f"{len(body) - cursor} trailing bytes after the last mask")
    return out


KERNEL = 9
CENTRE = 4
PATTERN_ENTRIES = 4
DEFAULT_LIBRARY_SIZE = 8  # DESIGN "Pruning": m = 8 unless the report states its library
MAX_LIBRARY = 56  # every 4-entry pattern that keeps the centre


@dataclass(frozen=True)
class MaskStats:
    """What a set of pattern masks keeps: the counts the achieved compression rate is made of."""

    total: int  # weights covered by masks
    kept: int  # weights the masks keep
    patterns: int  # distinct kernel patterns in use


def _is_pattern(row: tuple[int, ...]) -> bool:
    return len(row) == KERNEL and sum(row) == PATTERN_ENTRIES and row[CENTRE] == 1


def parse_library(value: Any) -> torch.Tensor:
    """The pattern library a report states (a list of 9-entry 0/1 lists) as a (P, 9) bool tensor."""
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_LIBRARY:
        raise MaskError(f"pattern library must be a list of 1..{MAX_LIBRARY} patterns")
    rows: list[tuple[int, ...]] = []
    for item in value:
        if not isinstance(item, list) or len(item) != KERNEL or any(type(v) is not int or v not in (0, 1) for v in item):
            raise MaskError("pattern library entries must be lists of nine 0/1 integers")
        row = tuple(item)
        if not _is_pattern(row):
            raise MaskError(f"pattern library entry {list(row)} does not keep exactly {PATTERN_ENTRIES} weights including the centre")
        if row in rows:
            raise MaskError(f"pattern library lists {list(row)} twice")
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool)


def check_pattern_masks(masks: Mapping[str, torch.Tensor], prunable: Set[str], library: torch.Tensor | None = None,
                        library_size: int = DEFAULT_LIBRARY_SIZE) -> MaskStats:
    """Refuse (``MaskError``) any mask that is not a pattern mask of a prunable conv weight.

    ``prunable`` holds the weights a mask may cover (see ``protocol.tensors.graph_roles``). Every
    kernel keeps nothing or exactly one pattern: one of ``library`` (P, 9) when the entity stated
    it, else any four entries including the centre, with at most ``library_size`` distinct
    patterns over all layers (the library is one set for the whole model).
    """
    if not masks:
        raise MaskError("the result holds no masks: nothing was pattern-pruned")
    allowed = None if library is None else {tuple(int(v) for v in row) for row in library.to(torch.int64).tolist()}
    seen: set[tuple[int, ...]] = set()
    total = kept = 0
    for name in sorted(masks):
        if name not in prunable:
            raise MaskError(f"mask {name!r} is not on a 3x3 convolution weight (groups=1): only those are pattern-pruned")
        mask = masks[name]
        if mask.dim() != 4 or tuple(mask.shape[2:]) != (3, 3):
            raise MaskError(f"mask {name!r} has shape {list(mask.shape)}, not that of a 3x3 convolution weight")
        rows = mask.reshape(-1, KERNEL).to(torch.int64)
        live = rows[rows.any(dim=1)]
        patterns = {tuple(row) for row in torch.unique(live, dim=0).tolist()} if live.numel() else set()
        for row in sorted(patterns):
            if not _is_pattern(row):
                raise MaskError(f"mask {name!r} keeps kernel entries {list(row)}: not {PATTERN_ENTRIES} weights "
                                "including the centre (a library pattern) nor an all-zero kernel")
            if allowed is not None and row not in allowed:
                raise MaskError(f"mask {name!r} uses pattern {list(row)}, which is not in the report's pattern library")
        seen |= patterns
        total += mask.numel()
        kept += int(live.sum())
    if allowed is None and len(seen) > library_size:
        raise MaskError(f"masks use {len(seen)} distinct patterns, more than a library of {library_size}")
    return MaskStats(total=total, kept=kept, patterns=len(seen))
