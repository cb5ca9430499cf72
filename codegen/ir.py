"""Layer IR: an exported ATen graph lowered to a short list of fused, inference-only layers.

Why a separate IR: the emitter should see only what it renders (a conv with its folded bias, fused
ReLU and residual add; a pool; a linear), never ATen spellings. Lowering accepts both the training
IR that ``torch.export.export`` produces (``aten.conv2d``, ``aten.batch_norm``, ``aten.linear``)
and the core-ATen form after ``run_decompositions()`` (``aten.convolution``,
``_native_batch_norm_legit_no_training``, ``aten.addmm``), so a program loaded from its JSON
serialisation lowers the same way. Any other op raises :class:`UnsupportedOpError` naming the op
and the node.

Activations are per-image tensors (the batch dimension is dynamic and handled by the runtime
loop): ``(C, H, W)`` feature maps or ``(F,)`` vectors.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


class CodegenError(ValueError):
    """A model the generator cannot compile (the message is one line, fit for the CLI)."""


class UnsupportedOpError(CodegenError):
    """An ATen op outside the supported set; the message names the op and the graph node."""


@dataclass(frozen=True)
class Act:
    """An elementwise activation fused into a layer's epilogue or run on its own.

    ``kind``: 'relu', 'clamp' (hardtanh, ReLU6: ``lo``/``hi``), 'hardswish', 'hardsigmoid',
    'sigmoid' or 'silu'; each has one C spelling per vector flavour (targets.VectorIsa) and one
    scalar spelling (:data:`SCALAR_ACT`).
    """

    kind: str
    lo: float = 0.0
    hi: float = 0.0


RELU = Act("relu")
ACT_KINDS = ("relu", "clamp", "hardswish", "hardsigmoid", "sigmoid", "silu")
# scalar C of each activation on float ``v`` (helpers from the vector prelude template)
SCALAR_ACT: Mapping[str, str] = {
    "relu": "(v > 0.0f ? v : 0.0f)",
    "clamp": "bp_clampf(v, {lo}, {hi})",
    "hardswish": "bp_hswishf(v)",
    "hardsigmoid": "bp_hsigmoidf(v)",
    "sigmoid": "bp_sigmoidf(v)",
    "silu": "bp_siluf(v)",
}


def scalar_act(act: Act | None) -> str:
    """C expression of ``act`` applied to the float variable ``v`` (``v`` itself when None)."""
    if act is None:
        return "v"
    return SCALAR_ACT[act.kind].format(lo=repr(float(np.float32(act.lo))) + "f", hi=repr(float(np.float32(act.hi))) + "f")


def numpy_act(act: Act | None, x: np.ndarray) -> np.ndarray:
    """``act`` on a float32 array, as :data:`SCALAR_ACT` computes it: for values the generator
    knows when it runs (the planes of pruned output channels)."""
    x = np.asarray(x, dtype=np.float32)
    if act is None:
        return x
    three, six = np.float32(3.0), np.float32(6.0)
    with np.errstate(over="ignore"):
        if act.kind == "relu":
            return np.where(x > 0, x, np.float32(0.0))
        if act.kind == "clamp":
            return np.minimum(np.maximum(x, np.float32(act.lo)), np.float32(act.hi))
        if act.kind == "hardswish":
            return x * np.clip(x + three, 0, six) / six
        if act.kind == "hardsigmoid":
            return np.clip(x + three, 0, six) / six
        if act.kind == "sigmoid":
            return np.float32(1.0) / (np.float32(1.0) + np.exp(-x))
        if act.kind == "silu":
            return x / (np.float32(1.0) + np.exp(-x))
    raise CodegenError(f"activation {act.kind!r} has no numpy spelling")


@dataclass(frozen=True)
class Conv:
    """2-D convolution with BatchNorm folded into ``weight``/``bias``: groups=1, or depthwise
    (``groups`` = input = output channels, ``weight`` of shape (C, 1, kh, kw)).

    ``mask`` marks the weights that may be nonzero (the pruning mask, or the nonzeros when no mask
    was given); ``residual`` names a tensor added before the (optional) activation.
    """

    name: str
    inp: str
    out: str
    weight: np.ndarray = field(repr=False)
    bias: np.ndarray = field(repr=False)
    mask: np.ndarray = field(repr=False)
    stride: tuple[int, int]
    padding: tuple[int, int]
    act: Act | None = None
    residual: str | None = None
    groups: int = 1

    @property
    def kernel(self) -> tuple[int, int]:
        return int(self.weight.shape[2]), int(self.weight.shape[3])

    @property
    def depthwise(self) -> bool:
        return self.groups > 1

    @property
    def relu(self) -> bool:
        return self.act == RELU


@dataclass(frozen=True)
class Pool:
    """Max or average pooling (``kind`` 'max' | 'avg') with torch's exact window semantics."""

    name: str
    inp: str
    out: str
    kind: str
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    ceil_mode: bool = False
    count_include_pad: bool = True
    divisor: int | None = None


@dataclass(frozen=True)
class AdaptiveAvgPool:
    name: str
    inp: str
    out: str
    size: tuple[int, int]


@dataclass(frozen=True)
class Flatten:
    name: str
    inp: str
    out: str


@dataclass(frozen=True)
class Linear:
    """``mask`` as for :class:`Conv`: whole zero rows and columns are skipped by the emitter."""

    name: str
    inp: str
    out: str
    weight: np.ndarray = field(repr=False)
    bias: np.ndarray = field(repr=False)
    mask: np.ndarray = field(repr=False)
    act: Act | None = None

    @property
    def relu(self) -> bool:
        return self.act == RELU


@dataclass(frozen=True)
class Add:
    name: str
    a: str
    b: str
    out: str
    act: Act | None = None

    @property
    def relu(self) -> bool:
        return self.act == RELU


@dataclass(frozen=True)
class Mul:
    """``a * b`` where ``b`` has ``a``'s shape or is one value per channel (squeeze-excitation)."""

    name: str
    a: str
    b: str
    out: str


@dataclass(frozen=True)
class Activation:
    """An activation that could not fuse into its producer."""

    name: str
    inp: str
    out: str
    act: Act


Layer = Conv | Pool | AdaptiveAvgPool | Flatten | Linear | Add | Mul | Activation


@dataclass(frozen=True)
class Graph:
    """Layers in execution order; ``shapes`` maps every tensor to its per-image shape."""

    input: str
    output: str
    layers: tuple[Layer, ...]
    shapes: Mapping[str, tuple[int, ...]]


def layer_inputs(layer: Layer) -> tuple[str, ...]:
    if isinstance(layer, (Add, Mul)):
        return (layer.a, layer.b)
    if isinstance(layer, Conv) and layer.residual is not None:
        return (layer.inp, layer.residual)
    return (layer.inp,)


# --------------------------------------------------------------------------------------------
# lowering


def _pair(value: object, default: int | None = None) -> tuple[int, int]:
    if value is None or (isinstance(value, (list, tuple)) and len(value) == 0):
        if default is None:
            raise CodegenError("missing window argument")
        return default, default
    if isinstance(value, int):
        return value, value
    if not isinstance(value, (list, tuple)):
        raise CodegenError(f"window argument {value!r} is not an int or a list")
    seq = list(value)
    if len(seq) == 1:
        return int(seq[0]), int(seq[0])
    return int(seq[0]), int(seq[1])


def _shape(node: torch.fx.Node) -> tuple[int, ...]:
    val = node.meta.get("val")
    if isinstance(val, (list, tuple)) and val:  # multi-output ops: the tensor is output 0
        val = val[0]
    if val is None or not hasattr(val, "shape"):
        raise CodegenError(f"node {node.name} has no shape metadata")
    dims = []
    for i, d in enumerate(val.shape):
        if i == 0:
            continue  # dynamic batch
        try:
            dims.append(int(d))
        except TypeError as exc:
            raise CodegenError(f"node {node.name}: only the batch dimension may be dynamic") from exc
    return tuple(dims)


@dataclass
class _Conv:  # mutable while lowering
    name: str
    inp: str
    out: str
    weight: np.ndarray
    bias: np.ndarray
    mask: np.ndarray
    stride: tuple[int, int]
    padding: tuple[int, int]
    act: Act | None = None
    residual: str | None = None
    groups: int = 1


@dataclass
class _Linear:
    name: str
    inp: str
    out: str
    weight: np.ndarray
    bias: np.ndarray
    mask: np.ndarray
    act: Act | None = None


@dataclass
class _Add:
    name: str
    a: str
    b: str
    out: str
    act: Act | None = None


def _params(program: torch.export.ExportedProgram) -> tuple[dict[str, np.ndarray], dict[str, str], str]:
    """Placeholder name -> array, placeholder name -> state_dict key, and the user input's name."""
    state = program.state_dict
    constants = getattr(program, "constants", {}) or {}
    arrays: dict[str, np.ndarray] = {}
    keys: dict[str, str] = {}
    user_inputs: list[str] = []
    for spec in program.graph_signature.input_specs:
        kind = spec.kind.name
        name = spec.arg.name
        if kind == "USER_INPUT":
            user_inputs.append(name)
            continue
        target = spec.target
        if target in state:
            value = state[target]
        elif target in constants:
            value = constants[target]
        else:
            raise CodegenError(f"input {name} ({target}) has no value in the program")
        if isinstance(value, torch.Tensor):
            arrays[name] = value.detach().to(torch.float64).cpu().numpy() if value.is_floating_point() else value.detach().cpu().numpy()
            keys[name] = target
    if len(user_inputs) != 1:
        raise CodegenError(f"expected exactly one tensor input, got {len(user_inputs)}")
    return arrays, keys, user_inputs[0]


def _output_arg(graph: torch.fx.Graph) -> object:
    out_node = next(n for n in graph.nodes if n.op == "output")
    out_args = out_node.args[0]
    if isinstance(out_args, (list, tuple)):
        if len(out_args) != 1:
            raise CodegenError(f"expected exactly one output, got {len(out_args)}")
        return out_args[0]
    return out_args


class _Lowering:
    """State of one pass over the graph, shared by the per-op lowering functions.

    ``shapes`` holds every activation seen so far, ``alias`` the nodes that forward another
    tensor (views, dropout, getitem), ``consts`` weights by placeholder name, ``producer`` the
    (still mutable) layer writing each tensor, so that BatchNorm and ReLU can fuse into it.
    """

    def __init__(self, program: torch.export.ExportedProgram, masks: Mapping[str, torch.Tensor] | None) -> None:
        self.masks = dict(masks or {})
        arrays, self.keys, self.user_input = _params(program)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.alias: dict[str, str] = {}
        self.consts: dict[str, np.ndarray] = dict(arrays)
        self.layers: list[object] = []
        self.producer: dict[str, object] = {}
        self.used_masks: set[str] = set()
        self.out_arg = _output_arg(program.graph)

    def val(self, arg: object, node: torch.fx.Node) -> str:
        """The activation an argument names (through aliases)."""
        if not isinstance(arg, torch.fx.Node):
            raise CodegenError(f"node {node.name}: expected a tensor argument, got {arg!r}")
        name = self.alias.get(arg.name, arg.name)
        if name not in self.shapes:
            raise CodegenError(f"node {node.name}: argument {arg.name} is not an activation")
        return name

    def const(self, arg: object, node: torch.fx.Node) -> np.ndarray | None:
        """The weight an argument names (None for an absent optional one)."""
        if arg is None:
            return None
        if not isinstance(arg, torch.fx.Node) or arg.name not in self.consts:
            raise CodegenError(f"node {node.name}: expected a weight argument, got {arg}")
        return self.consts[arg.name]

    def mask(self, w_node: torch.fx.Node, weight: np.ndarray) -> np.ndarray:
        """The pruning mask of a conv weight (its nonzeros when the owner sent none)."""
        key = self.keys.get(w_node.name, w_node.name)
        if key in self.masks:
            mask = self.masks[key].detach().cpu().numpy().astype(bool)
            self.used_masks.add(key)
            if mask.shape != weight.shape:
                raise CodegenError(f"mask {key} has shape {mask.shape}, weight has {weight.shape}")
            return mask
        return weight != 0

    def absorb(self, x: str, node: torch.fx.Node, prev: _Conv | _Linear | _Add) -> None:
        """``prev``, the producer of ``x``, now also computes ``node`` and writes its tensor."""
        prev.out = node.name
        self.producer.pop(x)
        self.producer[node.name] = prev
        self.shapes[node.name] = _shape(node)

    def add(self, node: torch.fx.Node, layer: object) -> None:
        self.shapes[node.name] = _shape(node)
        self.layers.append(layer)
        self.producer[node.name] = layer

    def graph(self) -> Graph:
        """Residual fusion over the whole list, then the frozen, checked graph."""
        if not isinstance(self.out_arg, torch.fx.Node):
            raise CodegenError("the model output is not a tensor")
        output_name = self.alias.get(self.out_arg.name, self.out_arg.name)
        unknown = set(self.masks) - self.used_masks
        if unknown:
            raise CodegenError(f"mask {sorted(unknown)[0]} does not belong to any convolution or linear weight")
        # final output names: layers record their (possibly fused) output in .out
        final = _fuse_residuals(self.layers)
        final_layers = tuple(_freeze(layer) for layer in final)
        produced = {layer.out for layer in final_layers}
        if output_name not in produced and output_name != self.user_input:
            raise CodegenError(f"model output {output_name} is not produced by any layer")
        return Graph(self.user_input, output_name, final_layers, dict(self.shapes))


# --------------------------------------------------------------------------------------------
# one function per op: (state, node, args, kwargs) -> a new layer, or None when the node only
# forwarded a tensor or fused into its producer


Args = list[Any]
Kwargs = dict[str, Any]


def _skip(lw: _Lowering, node: torch.fx.Node, args: Args, kwargs: Kwargs) -> None:
    return None


def _getitem(lw: _Lowering, node: torch.fx.Node, args: Args, kwargs: Kwargs) -> None:
    src = args[0]
    if isinstance(src, torch.fx.Node) and (src.name in lw.shapes or src.name in lw.alias):
        if args[1] != 0:
            raise UnsupportedOpError(f"unsupported use of output {args[1]} of {src.name} at node {node.name}")
        lw.alias[node.name] = lw.alias.get(src.name, src.name)
        return None
    raise UnsupportedOpError(f"unsupported getitem at node {node.name}")


def _transpose_weight(lw: _Lowering, node: torch.fx.Node, args: Args, kwargs: Kwargs) -> None:
    """Transposes of a weight are folded into the constant; of an activation, refused."""
    if isinstance(args[0], torch.fx.Node) and args[0].name in lw.consts:
        lw.consts[node.name] = lw.consts[args[0].name].T
        return None
    raise UnsupportedOpError(f"unsupported op {node.target} at node {node.name}")


def _identity(lw: _Lowering, node: torch.fx.Node, args: Args, kwargs: Kwargs) -> None:
    lw.alias[node.name] = lw.val(args[0], node)


def _conv(
    lw: _Lowering,
    node: torch.fx.Node,
    x: str,
    w_node: object,
    weight: np.ndarray | None,
    bias: np.ndarray | None,
    stride: object,
    padding: object,
    dilation: object,
    transposed: object,
    groups: object,
) -> _Conv:
    if isinstance(padding, str):
        raise UnsupportedOpError(f"unsupported conv padding mode {padding!r} at node {node.name}")
    if transposed or _pair(dilation) != (1, 1) or weight is None or weight.ndim != 4:
        raise UnsupportedOpError(f"unsupported convolution (transposed or dilated) at node {node.name}")
    channels = lw.shapes[x][0]
    depthwise = groups == channels and weight.shape[:2] == (channels, 1) and channels > 1
    if groups != 1 and not depthwise:
        raise UnsupportedOpError(f"unsupported grouped convolution (groups={groups}; only 1 or depthwise) at node {node.name}")
    if not isinstance(w_node, torch.fx.Node):
        raise UnsupportedOpError(f"convolution weight at node {node.name} is not a graph input")
    mask = lw.mask(w_node, weight)
    w = np.where(mask, weight, 0.0)
    b = np.zeros(w.shape[0]) if bias is None else np.asarray(bias, dtype=np.float64)
    return _Conv(node.name, x, node.name, w, b, mask, _pair(stride), _pair(padding), groups=int(groups))  # type: ignore[call-overload]  # groups is an int here


def _conv2d(lw: _Lowering, node: torch.fx.Node, args: Args, kwargs: Kwargs) -> _Conv:
    """``aten.conv2d`` (export IR): optional arguments by position or keyword."""
    x = lw.val(args[0], node)
    weight = lw.const(args[1], node)
    bias = lw.const(args[2] if len(args) > 2 else kwargs.get("bias"), node)
    names = ("stride", "padding", "dilation", "groups")
    given = dict(zip(names, args[3:], strict=False))
    given.update({k: v for k, v in kwargs.items() if k in names})
    return _conv(
        lw, node, x, args[1], weight, bias, given.get("stride", 1), given.get("padding", 0), given.get("dilation", 1), False, given.get("groups", 1)
    )


def _convolution(lw: _Lowering, node: torch.fx.Node, args: Args, kwargs: Kwargs) -> _Conv:
    """``aten.convolution`` (core ATen): every argument positional."""
    x = lw.val(args[0], node)
    weight = lw.const(args[1], node)
    bias = lw.const(args[2] if len(args) > 2 else kwargs.get("bias"), node)
    stride, padding, dilation, transposed, _, groups = args[3:9]
    return _conv(lw, node, x, args[1], weight, bias, stride, padding, dilation, transposed, groups)


def _fold_batch_norm(
    lw: _Lowering,
    node: torch.fx.Node,
    x: str,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    mean: np.ndarray | None,
    var: np.ndarray | None,
    eps: float,
) -> None:
    """Scale and shift the producing conv's weights; a BatchNorm elsewhere is refused."""
    c = lw.shapes[x][0]
    gamma = np.ones(c) if gamma is None else gamma
    beta = np.zeros(c) if beta is None else beta
    scale = gamma / np.sqrt(var + eps)  # type: ignore[operator]  # lw.const: an array for a BN parameter
    shift = beta - mean * scale  # type: ignore[operator]  # as above
    prev = lw.producer.get(x)
    source = node.args[0]
    if isinstance(prev, _Conv) and prev.act is None and prev.residual is None and len(source.users) == 1:  # type: ignore[union-attr]  # a BN input is a node
        prev.weight = prev.weight * scale[:, None, None, None]
        prev.bias = prev.bias * scale + shift
        lw.absorb(x, node, prev)
        return None
    raise UnsupportedOpError(f"unsupported batch norm not preceded by a conv at node {node.name}")


def _batch_norm(lw: _Lowering, node: torch.fx.Node, args: Args, kwargs: Kwargs) -> None:
    x = lw.val(args[0], node)
    gamma, beta, mean, var = (lw.const(a, node) for a in args[1:5])
    if args[5]:
        raise CodegenError(f"node {node.name}: batch norm in training mode; export the model in eval mode")
    return _fold_batch_norm(lw, node, x, gamma, beta, mean, var, float(args[7]))


def _batch_norm_no_training(lw: _Lowering, node: torch.fx.Node, args: Args, kwargs: Kwargs) -> None:
    x = lw.val(args[0], node)
    gamma, beta, mean, var = (lw.const(a, node) for a in args[1:5])
    return _fold_batch_norm(lw, node, x, gamma, beta, mean, var, float(args[6]))


def _activate(lw: _Lowering, node: torch.fx.Node, x_arg: object, act: Act) -> Activation | None:
    """Fused into its producer when nothing else reads the producer's output."""
    x = lw.val(x_arg, node)
    prev = lw.producer.get(x)
    if isinstance(prev, (_Conv, _Linear, _Add)) and prev.act is None and len(x_arg.users) == 1 and x_arg is not lw.out_arg:  # type: ignore[attr-defined]  # lw.val checked it is a node
        prev.act = act
        lw.absorb(x, node, prev)
        return None
    return Activation(node.name, x, node.name, act)


def _relu(lw: _Lowering, node: torch.fx.Node, args: Args, kwargs: Kwargs) -> Activation | None:
    return _activate(lw, node, args[0], RELU)


def _hardtanh(lw: _Lowering, node: torch.fx.Node, args: Args, kwargs: Kwargs) -> Activation | None:
    """hardtanh(min, max); ReLU6 is hardtanh(0, 6)."""
    lo = float(args[1] if len(args) > 1 else kwargs.get("min_val", -1.0))
    hi = float(args[2] if len(args) > 2 else kwargs.get("max_val", 1.0))
    return _activate(lw, node, args[0], Act("clamp", lo, hi))


def _relu6(lw: _Lowering, node: torch.fx.Node, args: Args, kwargs: Kwargs) -> Activation | None:
    return _activate(lw, node, args[0], Act("clamp", 0.0, 6.0))


def _clamp(lw: _Lowering, node: torch.fx.Node, args: Args, kwargs: Kwargs) -> Activation | None:
    """clamp(min, max) with both bounds given (one-sided clamps are refused)."""
    lo = args[1] if len(args) > 1 else kwargs.get("min")
    hi = args[2] if len(args) > 2 else kwargs.get("max")
    if not isinstance(lo, (int, float)) or not isinstance(hi, (int, float)):
        raise UnsupportedOpError(f"unsupported clamp without both numeric bounds at node {node.name}")
    return _activate(lw, node, args[0], Act("clamp", float(lo), float(hi)))


def _unary(kind: str) -> Lowering:
    """The lowering of a parameterless activation ``kind``."""

    def rule(lw: _Lowering, node: torch.fx.Node, args: Args, kwargs: Kwargs) -> Activation | None:
        return _activate(lw, node, args[0], Act(kind))

    return rule


def _mul(lw: _Lowering, node: torch.fx.Node, args: Args, kwargs: Kwargs) -> Mul:
    """Elementwise product of two activations: same shape, or one operand one value per channel."""
    a, b = lw.val(args[0], node), lw.val(args[1], node)
    sa, sb = lw.shapes[a], lw.shapes[b]
    if len(sa) == 3 and len(sb) == 3 and sa != sb and sa[1:] == (1, 1) and sb[0] == sa[0]:
        a, b, sa, sb = b, a, sb, sa
    per_channel = len(sa) == 3 and sb == (sa[0], 1, 1)
    if sa != sb and not per_channel:
        raise UnsupportedOpError(f"unsupported broadcasting mul {sa} * {sb} at node {node.name}")
    return Mul(node.name, a, b, node.name)


def _add(lw: _Lowering, node: torch.fx.Node, args: Args, kwargs: Kwargs) -> _Add:
    if kwargs.get("alpha", 1) != 1:
        raise UnsupportedOpError(f"unsupported add with alpha at node {node.name}")
    a, b = lw.val(args[0], node), lw.val(args[1], node)
    if lw.shapes[a] != lw.shapes[b]:
        raise UnsupportedOpError(f"unsupported broadcasting add at node {node.name}")
    return _Add(node.name, a, b, node.name)


def _window(lw: _Lowering, node: torch.fx.Node, args: Args, kwargs: Kwargs) -> tuple[str, tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(input, kernel, stride, padding) of a pooling node; the stride defaults to the kernel."""
    x = lw.val(args[0], node)
    kernel = _pair(args[1])
    stride = _pair(args[2] if len(args) > 2 else kwargs.get("stride"), None) if (len(args) > 2 and args[2]) or kwargs.get("stride") else kernel
    padding = _pair(args[3] if len(args) > 3 else kwargs.get("padding", 0))
    return x, kernel, stride, padding


def _max_pool(lw: _Lowering, node: torch.fx.Node, args: Args, kwargs: Kwargs) -> Pool:
    x, kernel, stride, padding = _window(lw, node, args, kwargs)
    dilation = _pair(args[4] if len(args) > 4 else kwargs.get("dilation", 1))
    if dilation != (1, 1):
        raise UnsupportedOpError(f"unsupported dilated max pooling at node {node.name}")
    ceil = bool(args[5] if len(args) > 5 else kwargs.get("ceil_mode", False))
    return Pool(node.name, x, node.name, "max", kernel, stride, padding, ceil)


def _avg_pool(lw: _Lowering, node: torch.fx.Node, args: Args, kwargs: Kwargs) -> Pool:
    x, kernel, stride, padding = _window(lw, node, args, kwargs)
    ceil = bool(args[4] if len(args) > 4 else kwargs.get("ceil_mode", False))
    include = bool(args[5] if len(args) > 5 else kwargs.get("count_include_pad", True))
    divisor = args[6] if len(args) > 6 else kwargs.get("divisor_override")
    return Pool(node.name, x, node.name, "avg", kernel, stride, padding, ceil, include, divisor)


def _adaptive_avg_pool(lw: _Lowering, node: torch.fx.Node, args: Args, kwargs: Kwargs) -> AdaptiveAvgPool:
    x = lw.val(args[0], node)
    out_shape = _shape(node)
    return AdaptiveAvgPool(node.name, x, node.name, (out_shape[1], out_shape[2]))


def _mean(lw: _Lowering, node: torch.fx.Node, args: Args, kwargs: Kwargs) -> AdaptiveAvgPool | Flatten:
    """A global mean over H and W: a 1x1 adaptive pool (then a flatten unless keepdim)."""
    x = lw.val(args[0], node)
    dims = sorted(d % 4 for d in args[1])
    keep = bool(args[2] if len(args) > 2 else kwargs.get("keepdim", False))
    if dims != [2, 3] or len(lw.shapes[x]) != 3:
        raise UnsupportedOpError(f"unsupported mean over dims {args[1]} at node {node.name}")
    if keep:
        return AdaptiveAvgPool(node.name, x, node.name, (1, 1))
    pooled = node.name + "_pool"
    lw.shapes[pooled] = (lw.shapes[x][0], 1, 1)
    lw.layers.append(AdaptiveAvgPool(node.name, x, pooled, (1, 1)))
    return Flatten(node.name + "_flatten", pooled, node.name)


def _flatten(lw: _Lowering, node: torch.fx.Node, args: Args, kwargs: Kwargs) -> Flatten | None:
    """A view that keeps the shape is an alias; one to a vector is a flatten; others are refused."""
    x = lw.val(args[0], node)
    out_shape = _shape(node)
    if out_shape == lw.shapes[x]:
        lw.alias[node.name] = x
        return None
    if len(out_shape) != 1 or int(np.prod(lw.shapes[x])) != out_shape[0]:
        raise UnsupportedOpError(f"unsupported reshape {lw.shapes[x]} -> {out_shape} at node {node.name}")
    return Flatten(node.name, x, node.name)


def _dense(lw: _Lowering, node: torch.fx.Node, x: str, weight: np.ndarray | None, bias: np.ndarray | None, mask: np.ndarray | None = None) -> _Linear:
    assert weight is not None
    if len(lw.shapes[x]) != 1:
        raise UnsupportedOpError(f"unsupported linear on a {len(lw.shapes[x]) + 1}-d tensor at node {node.name}")
    b = np.zeros(weight.shape[0]) if bias is None else bias
    mask = weight != 0 if mask is None else mask
    return _Linear(node.name, x, node.name, np.where(mask, weight, 0.0), b, mask)


def _linear(lw: _Lowering, node: torch.fx.Node, args: Args, kwargs: Kwargs) -> _Linear:
    x = lw.val(args[0], node)
    weight = lw.const(args[1], node)
    bias = lw.const(args[2] if len(args) > 2 else kwargs.get("bias"), node)
    mask = lw.mask(args[1], weight) if isinstance(args[1], torch.fx.Node) and weight is not None else None
    return _dense(lw, node, x, weight, bias, mask)


def _addmm(lw: _Lowering, node: torch.fx.Node, args: Args, kwargs: Kwargs) -> _Linear:
    """``bias + x @ W.T`` as core ATen writes a linear layer (``W.T`` folded by _transpose_weight)."""
    if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1:
        raise UnsupportedOpError(f"unsupported addmm with alpha/beta at node {node.name}")
    bias = lw.const(args[0], node)
    x = lw.val(args[1], node)
    weight = lw.const(args[2], node).T  # type: ignore[union-attr]  # addmm's weight is a constant, never None
    return _dense(lw, node, x, weight, bias)


Lowering = Callable[[_Lowering, torch.fx.Node, Args, Kwargs], object]

# op overload name -> lowering (both the export IR and the core-ATen spelling of each layer)
LOWERINGS: Mapping[str, Lowering] = {
    "aten.sym_size.int": _skip,
    str(operator.getitem): _getitem,
    **dict.fromkeys(("aten.permute.default", "aten.t.default", "aten.transpose.int"), _transpose_weight),
    **dict.fromkeys(
        (
            "aten.dropout.default",
            "aten.dropout_.default",
            "aten.clone.default",
            "aten.contiguous.default",
            "aten.alias.default",
            "aten.detach.default",
            "aten.detach_.default",
        ),
        _identity,
    ),
    "aten.conv2d.default": _conv2d,
    "aten.convolution.default": _convolution,
    "aten.batch_norm.default": _batch_norm,
    "aten._native_batch_norm_legit_no_training.default": _batch_norm_no_training,
    "aten.relu.default": _relu,
    "aten.relu_.default": _relu,
    "aten.hardtanh.default": _hardtanh,
    "aten.hardtanh_.default": _hardtanh,
    "aten.relu6.default": _relu6,
    "aten.clamp.default": _clamp,
    **{f"aten.{op}{inplace}.default": _unary(op) for op in ("hardswish", "hardsigmoid", "sigmoid", "silu") for inplace in ("", "_")},
    "aten.mul.Tensor": _mul,
    "aten.mul_.Tensor": _mul,
    "aten.add.Tensor": _add,
    "aten.add_.Tensor": _add,
    "aten.max_pool2d.default": _max_pool,
    "aten.max_pool2d_with_indices.default": _max_pool,
    "aten.avg_pool2d.default": _avg_pool,
    "aten.adaptive_avg_pool2d.default": _adaptive_avg_pool,
    "aten._adaptive_avg_pool2d.default": _adaptive_avg_pool,
    "aten.mean.dim": _mean,
    **dict.fromkeys(("aten.flatten.using_ints", "aten.view.default", "aten.reshape.default", "aten._unsafe_view.default"), _flatten),
    "aten.linear.default": _linear,
    "aten.addmm.default": _addmm,
}


def lower(program: torch.export.ExportedProgram, masks: Mapping[str, torch.Tensor] | None = None) -> Graph:
    """Lower an exported program (eval mode, dynamic batch) to fused layers.

    Each node goes to its op's function in :data:`LOWERINGS`; an op not listed there raises
    :class:`UnsupportedOpError` naming the op and the node. BatchNorm is folded into the preceding
    conv, ReLU into its producer when that producer has no other user, and a residual add into the
    later of its conv operands.
    """
    lw = _Lowering(program, masks)
    for node in program.graph.nodes:
        if node.op == "placeholder":
            if node.name == lw.user_input:
                lw.shapes[node.name] = _shape(node)
            continue
        if node.op == "output":
            continue
        if node.op != "call_function":
            raise UnsupportedOpError(f"unsupported node kind {node.op} at node {node.name}")
        target = str(node.target)
        rule = LOWERINGS.get(target)
        if rule is None:
            raise UnsupportedOpError(f"unsupported op {target} at node {node.name}")
        layer = rule(lw, node, list(node.args), dict(node.kwargs))
        if layer is not None:
            lw.add(node, layer)
    return lw.graph()


def _inputs(layer: object) -> tuple[str, ...]:
    if isinstance(layer, (_Add, Add, Mul)):
        return (layer.a, layer.b)
    if isinstance(layer, _Conv) and layer.residual is not None:
        return (layer.inp, layer.residual)
    return (layer.inp,)  # type: ignore[attr-defined]


def _fuse_residuals(layers: list[object]) -> list[object]:
    """Fold ``Add(conv_out, other)`` into the conv when the conv runs after ``other`` exists."""
    out: list[object] = list(layers)
    i = 0
    while i < len(out):
        add = out[i]
        if isinstance(add, _Add):
            index = {layer.out: j for j, layer in enumerate(out)}  # type: ignore[attr-defined]
            best: tuple[int, _Conv, str] | None = None
            for mine, other in ((add.a, add.b), (add.b, add.a)):
                j = index.get(mine)
                conv = out[j] if j is not None else None
                if j is None or not isinstance(conv, _Conv):
                    continue
                if conv.act is not None or conv.residual is not None:
                    continue
                n_users = sum(1 for layer in out for name in _inputs(layer) if name == mine)
                if n_users != 1:
                    continue
                k = index.get(other, -1)  # -1: the model input
                if k < j and (best is None or j > best[0]):
                    best = (j, conv, other)
            if best is not None:
                j, conv, other = best
                conv.residual = other
                conv.act = add.act
                conv.out = add.out
                del out[i]
                continue
        i += 1
    return out


def _freeze(layer: object) -> Layer:
    if isinstance(layer, _Conv):
        return Conv(
            layer.name,
            layer.inp,
            layer.out,
            layer.weight,
            layer.bias,
            layer.mask,
            layer.stride,
            layer.padding,
            layer.act,
            layer.residual,
            layer.groups,
        )
    if isinstance(layer, _Linear):
        return Linear(layer.name, layer.inp, layer.out, np.asarray(layer.weight), np.asarray(layer.bias), np.asarray(layer.mask), layer.act)
    if isinstance(layer, _Add):
        return Add(layer.name, layer.a, layer.b, layer.out, layer.act)
    return layer  # type: ignore[return-value]  # every other lowering already builds a final Layer


def conv_layers(graph: Graph) -> Sequence[Conv]:
    return [layer for layer in graph.layers if isinstance(layer, Conv)]
