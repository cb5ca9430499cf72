"""Bit-packed pruning masks: one bit per weight, with a canonical header.

Format: ``b"BPMASK1\\n" | u32 len | header | bits``; the header is canonical JSON
``{"tensors": [{"name", "shape", "offset", "nbytes"}...]}`` sorted by name, and each tensor's
bits are ``numpy.packbits`` (big bit order) of its flattened 0/1 values. Padding bits must be zero
and the sections must tile the data exactly, so one mask has exactly one encoding (nothing can
ride along in spare bits). ``unpack_masks`` returns ``torch.bool`` tensors.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping

import numpy as np
import torch

from ..errors import MaskError
from . import canonical

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
        header = canonical.loads(bytes(data[start : start + n]))
    except canonical.CanonicalJSONError as exc:
        raise MaskError(f"packed mask header malformed: {exc}") from exc
    if not isinstance(header, dict) or set(header) != {"tensors"} or not isinstance(header["tensors"], list):
        raise MaskError('packed mask header must be {"tensors": [...]}')
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
