"""Which layers of a model the entity will prune, how, and why the others stay dense, read from the graph.

The owner prints this plan before anything leaves (``owner.run --check``, and first thing in
every real run) and refuses to send a model with nothing to prune. The rules are the entity
engine's (``entity.pruning.graph.pruning_of``), restated here from the exported graph alone so
that the owner needs no entity code:

- a 3x3, groups-1 convolution is pattern-pruned (one library pattern per kernel, whole kernels
  removed) at the conv rate;
- a depthwise 3x3 convolution (weight (C, 1, 3, 3), groups C) is pattern-pruned per channel (one
  library pattern per channel's kernel, none removed: a fixed 9/4);
- a 1x1 groups-1 convolution or a linear layer loses whole input columns, only when the request
  names a whole-model rate (``--model-rate``), as many as that rate needs;

each unless it is the stem (a conv with no convolution between it and the input), has fewer than
four input channels, or is skipped by name (``--skip``). Every other weight layer stays dense.
The whole-model rate counts every 2-D convolution and linear weight, dense ones as kept.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

MIN_IN_CHANNELS = 4
_CONVS = {"conv2d", "convolution", "_convolution", "cudnn_convolution"}
_LINEAR = {"linear", "addmm", "mm"}


@dataclass(frozen=True)
class LayerPlan:
    weight: str
    kind: str  # "3x3 conv", "depthwise conv", "1x1 conv", "linear", "grouped conv", "KxK conv", "conv", "matmul"
    shape: tuple[int, ...]
    pruned: bool
    why: str
    counted: bool = True  # part of the whole-model rate (2-D convolution and linear weights)

    @property
    def params(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def pruning(self) -> str:
        """How the layer is pruned: "pattern", "columns" or "dense" (the job report's words)."""
        if not self.pruned:
            return "dense"
        return "columns" if self.kind in ("1x1 conv", "linear") else "pattern"


def _bound(node: Any) -> dict[str, Any]:
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return {}
    bound = dict(zip([a.name for a in schema.arguments], node.args, strict=False))
    bound.update(node.kwargs)
    return bound


def _skipped(key: str, skip: Iterable[str]) -> bool:
    for s in skip:
        prefix = s[: -len(".weight")] if s.endswith(".weight") else s
        if key == s or key == prefix or key.startswith(prefix.rstrip(".") + "."):
            return True
    return False


def _conv_kind(shape: tuple[int, ...], groups: int) -> str:
    if groups > 1:
        return "depthwise conv" if shape[1] == 1 and shape[0] == groups else "grouped conv"
    if shape[2:] == (3, 3):
        return "3x3 conv"
    return "1x1 conv" if shape[2:] == (1, 1) else f"{shape[2]}x{shape[3]} conv"


def _verdict(key: str, kind: str, shape: tuple[int, ...], in_channels: int, stem: bool, skip: list[str], structured: bool) -> LayerPlan:
    """One layer's verdict, by the engine's rules in the engine's order."""
    if kind == "depthwise conv" and shape[2:] != (3, 3):
        return LayerPlan(key, kind, shape, False, "depthwise convs other than 3x3 stay dense (the pattern library is 3x3)")
    if kind == "grouped conv":
        return LayerPlan(key, kind, shape, False, "grouped convs (other than depthwise) stay dense")
    if kind not in ("3x3 conv", "depthwise conv", "1x1 conv", "linear"):
        return LayerPlan(key, kind, shape, False, f"{kind}s stay dense (the engine prunes 3x3, depthwise 3x3, 1x1 and linear layers)")
    if kind in ("1x1 conv", "linear") and not structured:
        return LayerPlan(key, kind, shape, False, f"{kind} layers are pruned (whole input columns) only for a whole-model rate (--model-rate)")
    if stem:
        return LayerPlan(key, kind, shape, False, "the stem conv stays dense (few weights, the most sensitive)")
    if in_channels < MIN_IN_CHANNELS:
        return LayerPlan(key, kind, shape, False, f"fewer than {MIN_IN_CHANNELS} input channels")
    if _skipped(key, skip):
        return LayerPlan(key, kind, shape, False, "skipped at the owner's request (--skip)")
    why = {
        "3x3 conv": "pattern-pruned (one library pattern per kernel, whole kernels removed) at the conv rate",
        "depthwise conv": "pattern-pruned per channel (one library pattern per channel's kernel: a fixed 9/4)",
    }.get(kind, "structured: whole input columns removed, for the whole-model rate")
    return LayerPlan(key, kind, shape, True, why)


def prune_plan(program: torch.export.ExportedProgram, skip: Iterable[str] = (), *, model_rate: float | None = None) -> list[LayerPlan]:
    """Every conv and linear weight of ``program``, in graph order, with the engine's verdict.

    ``model_rate`` is the request's whole-model rate: with one, 1x1 convs and linear layers are
    pruned too (whole input columns); without, they stay dense.
    """
    signature = program.graph_signature
    key_of = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
    state = program.state_dict
    skip = list(skip)
    structured = model_rate is not None
    after_conv: dict[Any, bool] = {}
    plans: dict[str, LayerPlan] = {}
    for node in program.graph.nodes:
        packet = getattr(getattr(node.target, "overloadpacket", None), "__name__", "")
        upstream = any(after_conv.get(a, False) for a in node.all_input_nodes)
        is_conv = node.op == "call_function" and packet in _CONVS
        after_conv[node] = upstream or is_conv
        if node.op != "call_function" or not (is_conv or packet in _LINEAR):
            continue
        bound = _bound(node)
        weight = bound.get("weight", bound.get("mat2") if packet != "linear" else None)
        key = key_of.get(getattr(weight, "name", None))
        if key is None or key not in state or key in plans:
            continue
        shape = tuple(int(d) for d in state[key].shape)
        if packet != "linear" and not is_conv:
            plans[key] = LayerPlan(key, "matmul", shape, False, "a matrix product on a stored weight stays dense (not an aten.linear)", counted=False)
            continue
        if not is_conv:
            counted = len(shape) == 2
            plans[key] = (
                _verdict(key, "linear", shape, shape[-1], False, skip, structured)
                if counted
                else LayerPlan(key, "linear", shape, False, "not a 2-D linear weight", counted=False)
            )
            continue
        groups = int(bound.get("groups", 1) or 1)
        if len(shape) != 4 or bound.get("transposed", False):
            plans[key] = LayerPlan(key, "conv", shape, False, "not a 2-D convolution the engine prunes", counted=False)
            continue
        plans[key] = _verdict(key, _conv_kind(shape, groups), shape, shape[1] * groups, not upstream, skip, structured)
    return list(plans.values())


def pruned_share(plan: Iterable[LayerPlan]) -> tuple[int, int]:
    """(weights in pruned layers, weights in all planned layers)."""
    layers = list(plan)
    return sum(p.params for p in layers if p.pruned), sum(p.params for p in layers)


def _kept_kernels(kernels: int, rate: float) -> int:
    """The engine's kernel budget at a conv rate (``entity.pruning.patterns.kept_kernels_for_rate``)."""
    return max(1, min(kernels, round(9 * kernels / (4 * rate))))


def model_rate_bounds(plan: Iterable[LayerPlan], rate: float) -> tuple[float, float] | None:
    """The lowest and highest whole-model rates the entity can meet at conv rate ``rate``.

    With the 3x3 convs at ``rate``, the depthwise convs at 9/4 and every dense layer whole, the
    1x1 and linear layers keep between one column each and all of them; None when the plan
    prunes no 1x1 or linear layer (then only one model rate follows from ``rate``).
    """
    layers = [p for p in plan if p.counted]
    total = sum(p.params for p in layers)
    kernels = sum(p.shape[0] * p.shape[1] for p in layers if p.pruned and p.kind == "3x3 conv")
    fixed = 4 * _kept_kernels(kernels, rate) if kernels else 0
    fixed += sum(4 * p.shape[0] for p in layers if p.pruned and p.kind == "depthwise conv")
    fixed += sum(p.params for p in layers if not p.pruned)
    columns = [p for p in layers if p.pruning == "columns"]
    if not columns:
        return None
    low, high = fixed + sum(p.shape[0] for p in columns), fixed + sum(p.params for p in columns)
    return total / high, total / low
