"""Finding convolutions (and the BatchNorm/ReLU after them) in an exported graph, and running it.

The entity never sees the owner's ``nn.Module`` class: it works on ``program.module()``, whose
graph holds ``aten.conv2d`` / ``aten.convolution`` calls reading their weights through
``get_attr`` nodes named by state_dict key. This module turns that graph into a list of
``ConvLayer`` facts and runs it while recording chosen intermediate values (the inputs and
outputs of convolutions, the inputs of batch norms), which is all the layer-wise solvers need.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import fx

_aten = torch.ops.aten
_CONV_OPS = {_aten.conv2d.default, _aten.convolution.default}
if hasattr(_aten.conv2d, "padding"):
    _CONV_OPS.add(_aten.conv2d.padding)
_BN_OPS = {_aten.batch_norm.default, _aten._native_batch_norm_legit_no_training.default}
_RELU_OPS = {_aten.relu.default, _aten.relu_.default}


class GraphError(ValueError):
    """The exported program cannot be pruned (unsupported structure)."""


@dataclass(frozen=True)
class BatchNormRef:
    """State_dict keys of an inference BatchNorm that directly follows a conv."""

    node: str
    weight: str | None
    bias: str | None
    running_mean: str
    running_var: str
    eps: float
    output: str  # the node holding the normalised tensor (differs from ``node`` for tuple-valued ops)


@dataclass(frozen=True)
class ConvLayer:
    """One convolution in the graph, in topological order."""

    index: int
    node: str
    key: str  # state_dict key of the weight
    bias: str | None
    shape: tuple[int, int, int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] | str
    dilation: tuple[int, int]
    groups: int
    bn: BatchNormRef | None
    relu: bool  # the conv's (or its BN's) only consumer is a ReLU
    is_stem: bool  # no other conv lies between the model input and this conv

    @property
    def kernels(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def is_3x3(self) -> bool:
        return self.shape[2:] == (3, 3) and self.groups == 1

    def conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """This layer's convolution with other weights (same stride, padding, dilation, groups)."""
        return torch.nn.functional.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


def _pair(value: Any, default: int) -> tuple[int, int]:
    if value is None:
        return (default, default)
    if isinstance(value, int):
        return (value, value)
    vals = [int(v) for v in value]
    return (vals[0], vals[0]) if len(vals) == 1 else (vals[0], vals[1])


def _attr_key(node: Any) -> str | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return str(node.target)
    return None


def _conv_args(node: fx.Node) -> dict[str, Any]:
    names = ["input", "weight", "bias", "stride", "padding", "dilation"]
    if node.target == _aten.convolution.default:
        names += ["transposed", "output_padding", "groups"]
    else:
        names += ["groups"]
    args = dict(zip(names, node.args, strict=False))  # trailing arguments may be left out
    args.update(node.kwargs)
    return args


def find_convs(gm: fx.GraphModule) -> list[ConvLayer]:
    """Every 2-D convolution of ``gm`` whose weight is a stored tensor, in topological order."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise GraphError(f"expected a model with exactly one input tensor, found {len(placeholders)} inputs")
    after_conv: dict[fx.Node, bool] = {}
    layers: list[ConvLayer] = []
    for node in gm.graph.nodes:
        upstream = any(after_conv.get(a, False) for a in node.all_input_nodes)
        is_conv = node.op == "call_function" and node.target in _CONV_OPS
        after_conv[node] = upstream or is_conv
        if not is_conv:
            continue
        args = _conv_args(node)
        key = _attr_key(args.get("weight"))
        if key is None:
            continue  # a conv on computed weights is not a layer we can prune
        if args.get("transposed", False):
            continue
        weight = gm.get_parameter(key) if key in dict(gm.named_parameters()) else gm.get_buffer(key)
        if weight.dim() != 4:
            continue
        padding = args.get("padding", 0)
        pad: tuple[int, int] | str = padding if isinstance(padding, str) else _pair(padding, 0)
        bn, relu = _follow(node)
        layers.append(
            ConvLayer(
                index=len(layers),
                node=node.name,
                key=key,
                bias=_attr_key(args.get("bias")),
                shape=tuple(int(d) for d in weight.shape),  # type: ignore[arg-type]
                stride=_pair(args.get("stride"), 1),
                padding=pad,
                dilation=_pair(args.get("dilation"), 1),
                groups=int(args.get("groups", 1) or 1),
                bn=bn,
                relu=relu,
                is_stem=not upstream,
            )
        )
    return layers


def _follow(node: fx.Node) -> tuple[BatchNormRef | None, bool]:
    """The inference BatchNorm that is the conv's only consumer, and whether a ReLU follows."""
    bn: BatchNormRef | None = None
    tail = node
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_function" and users[0].target in _BN_OPS:
        user = users[0]
        a = list(user.args)
        if user.target == _aten.batch_norm.default:
            # (input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn)
            training, eps = a[5], a[7]
        else:
            # (input, weight, bias, running_mean, running_var, momentum, eps)
            training, eps = False, a[6]
        mean, var = _attr_key(a[3]), _attr_key(a[4])
        if not training and mean is not None and var is not None:
            tail = user
            if user.target != _aten.batch_norm.default:
                getitems = [g for g in user.users if g.op == "call_function" and g.args[1] == 0]
                if len(getitems) == 1:
                    tail = getitems[0]
            bn = BatchNormRef(
                node=user.name,
                weight=_attr_key(a[1]),
                bias=_attr_key(a[2]),
                running_mean=mean,
                running_var=var,
                eps=float(cast(float, eps)),
                output=tail.name,
            )
    users = list(tail.users)
    relu = len(users) == 1 and users[0].op == "call_function" and users[0].target in _RELU_OPS
    return bn, relu


def prunable(layer: ConvLayer, skip: Iterable[str] = (), skip_stem: bool = True, min_in_channels: int = 4) -> bool:
    """Whether a conv is pattern-pruned: a 3x3 group-1 conv not skipped by name, stem or width."""
    if not layer.is_3x3:
        return False
    if skip_stem and layer.is_stem:
        return False
    if layer.shape[1] < min_in_channels:
        return False
    for s in skip:
        prefix = s[: -len(".weight")] if s.endswith(".weight") else s
        if layer.key == s or layer.key.startswith(prefix.rstrip(".") + ".") or layer.key == prefix:
            return False
    return True


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, want: set[str], stop_after: str | None):
        super().__init__(gm)
        self.want = want
        self.stop_after = stop_after
        self.seen: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.want:
            self.seen[n.name] = out
        if n.op == "call_function" and f"in:{n.name}" in self.want:
            self.seen[f"in:{n.name}"] = self.env[n.args[0]]  # type: ignore[index]
        if self.stop_after is not None and n.name == self.stop_after and set(self.seen) >= self.want:
            raise _Stop()
        return out


class _Stop(Exception):
    pass


def record(gm: fx.GraphModule, x: torch.Tensor, want: Iterable[str], stop_after: str | None = None) -> dict[str, torch.Tensor]:
    """Run ``gm`` on ``x`` and return the values named in ``want``.

    A plain node name records that node's output; ``"in:<name>"`` records the first argument of
    node ``<name>`` (e.g. a conv's input or a BatchNorm's input). With ``stop_after`` the run ends
    as soon as that node has run and everything wanted has been seen (saves the rest of the model).
    """
    rec = _Recorder(gm, set(want), stop_after)
    try:
        rec.run(x)
    except _Stop:
        pass
    missing = set(want) - set(rec.seen)
    if missing:
        raise GraphError(f"nodes not found in the graph: {sorted(missing)}")
    return rec.seen


def set_tensor(gm: torch.nn.Module, key: str, value: torch.Tensor) -> None:
    """Overwrite a parameter or buffer of ``gm`` in place (by state_dict key)."""
    with torch.no_grad():
        target: torch.Tensor
        try:
            target = gm.get_parameter(key)
        except AttributeError:
            target = gm.get_buffer(key)
        target.copy_(value.to(dtype=target.dtype, device=target.device))


def get_tensor(gm: torch.nn.Module, key: str) -> torch.Tensor:
    """A parameter or buffer of ``gm`` by state_dict key (detached)."""
    try:
        return gm.get_parameter(key).detach()
    except AttributeError:
        return gm.get_buffer(key).detach()
