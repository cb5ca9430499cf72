"""A strict, bounded safetensors header parser that never touches torch.

Used on received and outbound bytes before anything else reads them: the header length is bounded
(a hostile 8-byte prefix cannot make us allocate gigabytes), every tensor's byte range must be in
bounds, match its dtype and shape, and the ranges must tile the data section exactly (no gaps, no
overlap, no trailing bytes: nowhere to hide a side channel).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass

from ..errors import ArtifactError
from .canonical import JSONDepthError, check_depth, refuse_duplicate_keys

MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_TENSORS = 100_000
MAX_RANK = 8

DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "F8_E5M2", "F8_E4M3"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None
    header_len: int
    raw_header: bytes


def parse_header(data: bytes | memoryview, *, what: str = "safetensors file", max_header: int = MAX_HEADER_BYTES) -> Header:
    view = memoryview(data)
    if len(view) < 8:
        raise ArtifactError(f"{what}: too short for a safetensors header")
    (n,) = struct.unpack("<Q", view[:8])
    if n > max_header:
        raise ArtifactError(f"{what}: safetensors header of {n} bytes exceeds the {max_header}-byte limit")
    if 8 + n > len(view):
        raise ArtifactError(f"{what}: safetensors header length {n} runs past the end of the file")
    raw = bytes(view[8 : 8 + n])

    no_dupes = refuse_duplicate_keys(lambda key: ArtifactError(f"{what}: duplicate key {key!r} in safetensors header"))

    try:
        check_depth(raw)
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=no_dupes)
    except JSONDepthError as exc:
        raise ArtifactError(f"{what}: safetensors header: {exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ArtifactError(f"{what}: safetensors header is not valid JSON") from exc
    if not isinstance(obj, dict):
        raise ArtifactError(f"{what}: safetensors header is not a JSON object")
    metadata = obj.pop("__metadata__", None)
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ArtifactError(f"{what}: __metadata__ must map strings to strings")
    if len(obj) > MAX_TENSORS:
        raise ArtifactError(f"{what}: more than {MAX_TENSORS} tensors")
    base = 8 + n
    size = len(view) - base
    tensors: dict[str, TensorInfo] = {}
    for name, entry in obj.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise ArtifactError(f"{what}: tensor {name!r} entry must have exactly dtype, shape, data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPE_SIZES:
            raise ArtifactError(f"{what}: tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(type(d) is int and 0 <= d < 2**40 for d in shape):
            raise ArtifactError(f"{what}: tensor {name!r} has a malformed shape")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int and o >= 0 for o in offsets):
            raise ArtifactError(f"{what}: tensor {name!r} has malformed data_offsets")
        begin, end = offsets
        if not begin <= end <= size:
            raise ArtifactError(f"{what}: tensor {name!r} data lies outside the file")
        if end - begin != math.prod(shape) * DTYPE_SIZES[dtype]:
            raise ArtifactError(f"{what}: tensor {name!r} byte length does not match dtype {dtype} and shape {shape}")
        tensors[name] = TensorInfo(name, dtype, tuple(shape), base + begin, base + end)
    cursor = base
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if info.start != cursor:
            raise ArtifactError(f"{what}: tensor data is not contiguous at {info.name!r} (gap or overlap)")
        cursor = info.end
    if cursor != len(view):
        raise ArtifactError(f"{what}: {len(view) - cursor} trailing bytes after the last tensor")
    return Header(tensors=tensors, metadata=metadata, header_len=n, raw_header=raw)


def tensor_digests(data: bytes | memoryview, header: Header) -> dict[str, str]:
    """SHA-256 of each tensor's raw little-endian bytes (no copies: hashes memoryview slices)."""
    view = memoryview(data)
    return {name: hashlib.sha256(view[t.start : t.end]).hexdigest() for name, t in header.tensors.items()}


TREE_DIGEST = "sha256-safetensors"
_TREE_LABEL = b"blindprune/safetensors-digest/v1\n"


def tree_digest(data: bytes | memoryview, header: Header, digests: dict[str, str]) -> str:
    """A digest of the whole file computed from its tensor digests, so each byte is hashed once.

    SHA-256 over a label, the 8-byte length and header bytes, then every tensor's SHA-256 (raw
    32 bytes) in the order their data lies in the file. ``parse_header`` has already checked that
    header and tensor data tile the file exactly (no gap, overlap or trailing byte), so this
    commits to every byte of the file as a plain SHA-256 would, and costs one pass over the
    tensors instead of two (the tensor digests are needed for the statement anyway).
    """
    outer = hashlib.sha256(_TREE_LABEL)
    outer.update(memoryview(data)[: 8 + header.header_len])
    for info in sorted(header.tensors.values(), key=lambda t: (t.start, t.end, t.name)):
        outer.update(bytes.fromhex(digests[info.name]))
    return outer.hexdigest()
