"""How blindprune payloads ride in Flower messages: opaque sealed bytes, fixed record keys.

Everything that crosses is already signed and sealed by the time it reaches Flower, so Flower only
carries bytes. Large bytes go in an ArrayRecord (Flower chunks arrays, so artifacts of hundreds of
megabytes cross); small routing facts (job id, fingerprints, status) go in a ConfigRecord.
The message types themselves are part of the contract (``protocol.contract``).
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

__all__ = ["BLOB_KEY", "FACTS_KEY", "MAX_BLOB_BYTES", "NPY_STYPE", "PAYLOAD_KEY", "RecordError", "blob_of", "facts_of", "pack"]


PAYLOAD_KEY = "payload"
BLOB_KEY = "sealed"
FACTS_KEY = "facts"

MAX_BLOB_BYTES = 2 * 1024**3
NPY_STYPE = "numpy.ndarray"  # how Flower serialises an Array made from a NumPy array


class RecordError(ValueError):
    """A Flower message does not carry the records blindprune expects."""


def pack(facts: Mapping[str, str | int | bytes | bool], blob: bytes | None = None) -> RecordDict:
    """A RecordDict with routing ``facts`` and, optionally, one opaque ``blob``."""
    records: dict = {FACTS_KEY: ConfigRecord(dict(facts))}
    if blob is not None:
        if len(blob) > MAX_BLOB_BYTES:
            raise RecordError(f"payload of {len(blob)} bytes exceeds the {MAX_BLOB_BYTES}-byte limit")
        records[PAYLOAD_KEY] = ArrayRecord({BLOB_KEY: Array(np.frombuffer(blob, dtype=np.uint8).copy())})
    return RecordDict(records)


def facts_of(content: RecordDict) -> dict:
    """The routing facts of a message (an empty dict if it has none)."""
    record = content.get(FACTS_KEY) if hasattr(content, "get") else None
    if record is None:
        return {}
    if not isinstance(record, ConfigRecord):
        raise RecordError(f"record {FACTS_KEY!r} is not a ConfigRecord")
    return dict(record)


def blob_of(content: RecordDict) -> bytes:
    """The opaque payload of a message.

    The array's bytes are the ``.npy`` image Flower made of it; its header is read here and checked
    against the data's length rather than handed to ``np.load``, which would first allocate
    whatever size the (other party's) header claims.
    """
    record = content.get(PAYLOAD_KEY) if hasattr(content, "get") else None
    if not isinstance(record, ArrayRecord) or BLOB_KEY not in record:
        raise RecordError("message carries no sealed payload")
    array = record[BLOB_KEY]
    if array.stype != NPY_STYPE or array.dtype != "uint8" or len(array.shape) != 1:
        raise RecordError("sealed payload is not a flat byte array")
    return _npy_bytes(array.data)


def _npy_bytes(data: bytes) -> bytes:
    """The contents of a one-dimensional uint8 ``.npy`` image, or ``RecordError``."""
    if not isinstance(data, bytes):
        raise RecordError("sealed payload is not a flat byte array")
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"npy version {version}")
    except (ValueError, TypeError, SyntaxError, RecursionError) as exc:
        raise RecordError("sealed payload is not a valid byte array (bad array header)") from exc
    if dtype != np.dtype(np.uint8) or len(shape) != 1:
        raise RecordError("sealed payload is not a flat byte array")
    offset = stream.tell()
    if shape[0] > MAX_BLOB_BYTES:
        raise RecordError(f"payload of {shape[0]} bytes exceeds the {MAX_BLOB_BYTES}-byte limit")
    if shape[0] != len(data) - offset:
        raise RecordError("sealed payload's length does not match its array header (truncated or padded)")
    return data[offset:]
