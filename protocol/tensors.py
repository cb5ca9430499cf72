"""Checks on tensor files against a schema, shared by the egress guard and the receiving side.

A *schema* maps tensor name -> (safetensors dtype, shape), e.g. ``schema_of(model.state_dict())``.
``check_safetensors`` admits a safetensors file only if it holds exactly the schema's tensors,
no metadata beyond an allow-list, finite floating-point values, and bytes equal to a fresh
serialisation of its tensors. The owner runs it on pruned weights it receives (wrong shapes, NaN
weights and extra tensors are refused there too), the egress guard on what it sends.
"""
from __future__ import annotations

from typing import Mapping

import torch

from ._safetensors import FLOAT_DTYPES, parse_header
from .errors import ArtifactError, MaskError

Schema = Mapping[str, tuple[str, tuple[int, ...]]]

_TORCH_TO_ST = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def schema_of(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The schema of a ``state_dict``: name -> (safetensors dtype, shape)."""
    out = {}
    for name, tensor in state_dict.items():
        if tensor.dtype not in _TORCH_TO_ST:
            raise ArtifactError(f"tensor {name!r} has unsupported dtype {tensor.dtype}")
        out[name] = (_TORCH_TO_ST[tensor.dtype], tuple(int(d) for d in tensor.shape))
    return out


def check_safetensors(
    data: bytes,
    schema: Schema,
    *,
    what: str = "weights.safetensors",
    allowed_metadata: frozenset[str] = frozenset(),
    exact_bytes: bool = True,
) -> dict[str, torch.Tensor]:
    """The tensors of ``data`` if it matches ``schema`` exactly; ``ArtifactError`` otherwise."""
    header = parse_header(data, what=what)
    extra_meta = sorted(set(header.metadata or {}) - allowed_metadata)
    if extra_meta:
        raise ArtifactError(f"{what}: metadata key(s) not allowed: {', '.join(extra_meta)}")
    extra = sorted(set(header.tensors) - set(schema))
    missing = sorted(set(schema) - set(header.tensors))
    if extra:
        raise ArtifactError(f"{what}: tensor(s) not in the model schema: {', '.join(extra[:5])}")
    if missing:
        raise ArtifactError(f"{what}: schema tensor(s) missing: {', '.join(missing[:5])}")
    for name, info in sorted(header.tensors.items()):
        dtype, shape = schema[name]
        if info.dtype != dtype or info.shape != tuple(shape):
            raise ArtifactError(f"{what}: tensor {name!r} is {info.dtype}{list(info.shape)}, schema says {dtype}{list(shape)}")
    from safetensors.torch import load, save

    try:
        tensors = load(bytes(data))
    except Exception as exc:  # safetensors raises its own (Rust) error type; the header was already checked
        raise ArtifactError(f"{what}: does not load as safetensors: {exc}") from exc
    for name in sorted(tensors):
        if header.tensors[name].dtype in FLOAT_DTYPES and not bool(torch.isfinite(tensors[name]).all()):
            raise ArtifactError(f"{what}: tensor {name!r} holds NaN or infinite values")
    if exact_bytes and save(tensors, metadata=header.metadata or None) != data:
        raise ArtifactError(f"{what}: bytes differ from a fresh serialisation of their tensors (padding or hidden bytes)")
    return tensors


def check_masks(masks: Mapping[str, torch.Tensor], schema: Schema) -> None:
    """Every mask names a schema tensor and has its shape (``unpack_masks`` output is bool)."""
    for name in sorted(masks):
        if name not in schema:
            raise MaskError(f"mask {name!r} names no tensor of the model")
        if tuple(masks[name].shape) != tuple(schema[name][1]):
            raise MaskError(f"mask {name!r} has shape {list(masks[name].shape)}, the weight is {list(schema[name][1])}")
