"""Which layers of a model the entity will prune, and why the others stay dense, read from the graph.

The owner prints this plan before anything leaves (``owner.run --check``, and first thing in
every real run) and refuses to send a model with nothing to prune. The rules are the entity
engine's (``entity.pruning.graph.prunable``), restated here from the exported graph alone so that
the owner needs no entity code: a 3x3, groups-1, non-transposed 2-D convolution is pattern-pruned
unless it is the stem (no convolution between it and the input), has fewer than four input
channels, or is skipped by name; every other weight layer stays dense.
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
    kind: str  # "3x3 conv", "1x1 conv", "depthwise conv", "grouped conv", "conv", "linear"
    shape: tuple[int, ...]
    pruned: bool
    why: str

    @property
    def params(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


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


def prune_plan(program: torch.export.ExportedProgram, skip: Iterable[str] = ()) -> list[LayerPlan]:
    """Every conv and linear weight of ``program``, in graph order, with the engine's verdict."""
    signature = program.graph_signature
    key_of = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
    state = program.state_dict
    skip = list(skip)
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
        if not is_conv:
            plans[key] = LayerPlan(key, "linear", shape, False, "linear layers stay dense (the engine prunes 3x3 kernels)")
            continue
        groups = int(bound.get("groups", 1) or 1)
        if len(shape) != 4 or bound.get("transposed", False):
            plans[key] = LayerPlan(key, "conv", shape, False, "not a 2-D convolution the engine prunes")
        elif groups > 1:
            kind = "depthwise conv" if shape[1] == 1 else "grouped conv"
            plans[key] = LayerPlan(key, kind, shape, False, f"{kind}s stay dense")
        elif shape[2:] != (3, 3):
            kind = "1x1 conv" if shape[2:] == (1, 1) else f"{shape[2]}x{shape[3]} conv"
            plans[key] = LayerPlan(key, kind, shape, False, f"{kind}s stay dense (the engine prunes 3x3 kernels)")
        elif not upstream:
            plans[key] = LayerPlan(key, "3x3 conv", shape, False, "the stem conv stays dense (few weights, the most sensitive)")
        elif shape[1] < MIN_IN_CHANNELS:
            plans[key] = LayerPlan(key, "3x3 conv", shape, False, f"fewer than {MIN_IN_CHANNELS} input channels")
        elif _skipped(key, skip):
            plans[key] = LayerPlan(key, "3x3 conv", shape, False, "skipped at the owner's request (--skip)")
        else:
            plans[key] = LayerPlan(key, "3x3 conv", shape, True, "pattern-pruned")
    return list(plans.values())


def pruned_share(plan: Iterable[LayerPlan]) -> tuple[int, int]:
    """(weights in pruned layers, weights in all planned layers)."""
    layers = list(plan)
    return sum(p.params for p in layers if p.pruned), sum(p.params for p in layers)
