"""Finding convolutions and linear layers (and the BatchNorm/ReLU after them) in an exported graph, and running it.

The entity never sees the owner's ``nn.Module`` class: it works on ``program.module()``, whose
graph holds ``aten.conv2d`` / ``aten.convolution`` / ``aten.linear`` calls reading their weights
through ``get_attr`` nodes named by state_dict key. This module turns that graph into lists of
``ConvLayer`` / ``LinearLayer`` facts, says which of them the engine prunes and how (``kind_of``:
pattern-pruned 3x3, depthwise 3x3, structured 1x1 / linear), and runs the graph while recording
chosen intermediate values (the inputs and outputs of layers, the inputs of batch norms), which is
all the layer-wise solvers need. ``protocol.prune_plan`` restates the same rules for the owner.
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
_LINEAR_OPS = {_aten.linear.default}

# How the engine prunes a layer of each kind (the words the report and the owner's plan use).
PATTERN = "pattern"  # one library pattern per kernel (3x3: plus whole kernels removed)
COLUMNS = "columns"  # whole input columns removed (structured)
DENSE = "dense"


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

    @property
    def is_depthwise_3x3(self) -> bool:
        """A 3x3 conv with one input channel per group and one filter per channel: (C, 1, 3, 3), groups C."""
        return self.shape[2:] == (3, 3) and self.groups > 1 and self.shape[1] == 1 and self.shape[0] == self.groups

    @property
    def is_1x1(self) -> bool:
        return self.shape[2:] == (1, 1) and self.groups == 1

    @property
    def in_channels(self) -> int:
        return self.shape[1] * self.groups

    @property
    def weights(self) -> int:
        return self.shape[0] * self.shape[1] * self.shape[2] * self.shape[3]

    def conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """This layer's convolution with other weights (same stride, padding, dilation, groups)."""
        return torch.nn.functional.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


@dataclass(frozen=True)
class LinearLayer:
    """One ``aten.linear`` on a stored (O, I) weight, in topological order.

    Shares the attributes the layer-wise code reads with ``ConvLayer`` (``node``, ``key``,
    ``bias``, ``bn``, ``relu``), so statistics, refits and error probes treat both alike.
    """

    index: int
    node: str
    key: str
    bias: str | None
    shape: tuple[int, int]
    relu: bool
    bn: None = None  # a BatchNorm after a linear layer is not folded by the solvers

    @property
    def in_channels(self) -> int:
        return self.shape[1]

    @property
    def weights(self) -> int:
        return self.shape[0] * self.shape[1]


Layer = ConvLayer | LinearLayer


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


def find_linears(gm: fx.GraphModule) -> list[LinearLayer]:
    """Every ``aten.linear`` of ``gm`` whose (O, I) weight is a stored tensor, in topological order."""
    layers: list[LinearLayer] = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _LINEAR_OPS:
            continue
        args = dict(zip(["input", "weight", "bias"], node.args, strict=False))
        args.update(node.kwargs)
        key = _attr_key(args.get("weight"))
        if key is None:
            continue
        weight = get_tensor(gm, key)
        if weight.dim() != 2:
            continue
        _, relu = _follow(node)
        out, inp = (int(d) for d in weight.shape)
        layers.append(LinearLayer(len(layers), node.name, key, _attr_key(args.get("bias")), (out, inp), relu))
    return layers


def skipped(key: str, skip: Iterable[str]) -> bool:
    """Whether a weight is named by ``skip``: its key, its module's name, or a prefix of either."""
    for s in skip:
        prefix = s[: -len(".weight")] if s.endswith(".weight") else s
        if key == s or key.startswith(prefix.rstrip(".") + ".") or key == prefix:
            return True
    return False


def prunable(layer: ConvLayer, skip: Iterable[str] = (), skip_stem: bool = True, min_in_channels: int = 4) -> bool:
    """Whether a conv is pattern-pruned at the conv rate: a 3x3 group-1 conv not skipped by name, stem or width."""
    return layer.is_3x3 and pruning_of(layer, skip, skip_stem, min_in_channels) == PATTERN


def kind_of(layer: Layer) -> str:
    """The report's word for a layer: "3x3", "depthwise", "1x1", "linear" or "other" (never pruned)."""
    if isinstance(layer, LinearLayer):
        return "linear"
    if layer.is_3x3:
        return "3x3"
    if layer.is_depthwise_3x3:
        return "depthwise"
    if layer.is_1x1:
        return "1x1"
    return "other"


def pruning_of(layer: Layer, skip: Iterable[str] = (), skip_stem: bool = True, min_in_channels: int = 4, structured: bool = False) -> str:
    """How the engine prunes ``layer``: ``PATTERN``, ``COLUMNS`` or ``DENSE``.

    3x3 group-1 convs and depthwise 3x3 convs are pattern-pruned, 1x1 group-1 convs and linear
    layers lose whole input columns when ``structured`` (the request names a whole-model rate),
    under the same exceptions everywhere: the stem conv (no conv between it and the input),
    fewer than ``min_in_channels`` input channels, or a name in ``skip`` keep a layer dense. The
    stem rule is a conv rule: a linear layer is never a stem. Everything else stays dense.
    """
    kind = kind_of(layer)
    if kind == "other" or (kind in ("1x1", "linear") and not structured):
        return DENSE
    if isinstance(layer, ConvLayer) and skip_stem and layer.is_stem:
        return DENSE
    if layer.in_channels < min_in_channels or skipped(layer.key, skip):
        return DENSE
    return PATTERN if kind in ("3x3", "depthwise") else COLUMNS


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
