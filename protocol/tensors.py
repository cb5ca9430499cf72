"""Checks on tensor files against a schema, shared by the egress guard and the receiving side.

A *schema* maps tensor name -> (safetensors dtype, shape), e.g. ``schema_of(model.state_dict())``.
``check_safetensors`` admits a safetensors file only if it holds exactly the schema's tensors,
no metadata beyond an allow-list, finite floating-point values, and bytes equal to a fresh
serialisation of its tensors. The owner runs it on pruned weights it receives (wrong shapes, NaN
weights and extra tensors are refused there too), the egress guard on what it sends.

``graph_roles`` reads from the exported program's graph (not from tensor names, which the model's
author chose) which stored tensors are 3x3 group-1 convolution weights (pattern masks), depthwise
3x3 weights (one pattern per channel), 1x1 group-1 convolution and linear weights (whole-column
masks), which count in the whole-model rate, and which are BatchNorm running variances (which must
stay positive: a negative one makes the normalisation divide by the square root of a negative
number).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ._wire.safetensors import FLOAT_DTYPES, parse_header
from .errors import ArtifactError, MaskError

__all__ = ["GraphRoles", "Schema", "check_masks", "check_running_vars", "check_safetensors", "graph_roles", "schema_of"]

Schema = Mapping[str, tuple[str, tuple[int, ...]]]

_TORCH_TO_ST = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
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


_CONV_OPS = frozenset({"conv2d", "convolution", "_convolution"})
_LINEAR_OPS = frozenset({"linear"})


@dataclass(frozen=True)
class GraphRoles:
    """What the graph does with each stored tensor (state_dict keys)."""

    pattern_convs: frozenset[str]  # used only as the weight of 3x3, groups=1, non-transposed convolutions
    running_vars: frozenset[str]  # passed as ``running_var`` to a batch-norm op
    depthwise_convs: frozenset[str] = frozenset()  # used only as a (C, 1, 3, 3) weight of a groups=C convolution
    structured: frozenset[str] = frozenset()  # used only as a 1x1 groups=1 convolution weight or a linear weight
    # Every weight of a 2-D (non-transposed) convolution or a linear layer: what the whole-model rate counts.
    weight_layers: frozenset[str] = frozenset()

    def kind(self, name: str) -> str | None:
        """The kind of layer a maskable weight belongs to ("3x3", "depthwise", "1x1 or linear"), or None."""
        if name in self.pattern_convs:
            return "3x3"
        if name in self.depthwise_convs:
            return "depthwise"
        if name in self.structured:
            return "1x1 or linear"
        return None


def _bound_args(node: Any) -> dict[str, Any]:
    """A call's arguments by schema name (positional and keyword alike)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return {}
    names = [a.name for a in schema.arguments]
    bound = dict(zip(names, node.args, strict=False))  # trailing defaulted arguments may be left out
    bound.update(node.kwargs)
    return bound


def _weight_role(packet: str, bound: Mapping[str, Any], shape: tuple[int, ...]) -> str | None:
    """What a conv / linear call makes of its stored weight: a mask kind, "dense", or None (not a weight layer)."""
    if packet in _LINEAR_OPS:
        return "structured" if len(shape) == 2 else None
    if len(shape) != 4 or bound.get("transposed", False):
        return None
    groups = int(bound.get("groups", 1) or 1)
    if shape[2:] == (3, 3) and groups == 1:
        return "pattern"
    if shape[2:] == (3, 3) and groups > 1 and shape[1] == 1 and shape[0] == groups:
        return "depthwise"
    if shape[2:] == (1, 1) and groups == 1:
        return "structured"
    return "dense"


def graph_roles(program: torch.export.ExportedProgram) -> GraphRoles:
    """Find the maskable weights, the weight layers and the BatchNorm running variances from the graph.

    A weight counts as maskable of a kind only if every use of it in the graph is as the
    ``weight`` of a layer of that kind: a 2-D non-transposed convolution with a (O, I, 3, 3)
    kernel and ``groups`` 1 (pattern), with a (C, 1, 3, 3) kernel and ``groups`` C (depthwise), a
    1x1 ``groups`` 1 convolution or an ``aten.linear`` (whole columns). These are the rules the
    entity's engine prunes by, read here independently of the entity's code.
    """
    signature = program.graph_signature
    key_of = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
    state = program.state_dict
    uses: dict[str, set[str]] = {}
    other_uses: set[str] = set()
    running_vars: set[str] = set()
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        bound = _bound_args(node)
        packet = getattr(getattr(node.target, "overloadpacket", None), "__name__", "")
        as_weight = None
        if packet in _CONV_OPS or packet in _LINEAR_OPS:
            weight = bound.get("weight")
            key = key_of.get(getattr(weight, "name", None))
            shape = tuple(state[key].shape) if key in state else ()
            role = _weight_role(packet, bound, shape) if key is not None else None
            if key is not None and role is not None:
                uses.setdefault(key, set()).add(role)
                as_weight = weight
        var = bound.get("running_var")
        if var is not None and key_of.get(getattr(var, "name", None)) is not None:
            running_vars.add(key_of[var.name])
        for arg in node.all_input_nodes:
            if arg is not as_weight and arg.name in key_of:
                other_uses.add(key_of[arg.name])

    def only(role: str) -> frozenset[str]:
        return frozenset(key for key, roles in uses.items() if roles == {role} and key not in other_uses)

    return GraphRoles(
        pattern_convs=only("pattern"),
        running_vars=frozenset(running_vars),
        depthwise_convs=only("depthwise"),
        structured=only("structured"),
        weight_layers=frozenset(uses),
    )


def check_running_vars(tensors: Mapping[str, torch.Tensor], names: frozenset[str], own: Mapping[str, torch.Tensor]) -> None:
    """Every BatchNorm running variance in ``names`` positive, or equal to the owner's ``own`` value.

    The owner's own model is the one exception: a variance it already had (a dead channel's 0)
    comes back as it left.
    """
    for name in sorted(names):
        value = tensors[name]
        if not value.is_floating_point():
            raise ArtifactError(f"BatchNorm running variance {name!r} is not a floating-point tensor")
        bad = (value <= 0) & (value != own[name].to(value.dtype))
        if bool(bad.any()):
            raise ArtifactError(
                f"BatchNorm running variance {name!r} holds {int(bad.sum())} value(s) <= 0 "
                f"(the smallest {float(value.min()):.3g}); variances must be positive"
            )
