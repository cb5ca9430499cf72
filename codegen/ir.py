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

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch


class CodegenError(ValueError):
    """A model the generator cannot compile (the message is one line, fit for the CLI)."""


class UnsupportedOpError(CodegenError):
    """An ATen op outside the supported set; the message names the op and the graph node."""


@dataclass(frozen=True)
class Conv:
    """2-D convolution, groups=1, with BatchNorm folded into ``weight``/``bias``.

    ``mask`` marks the weights that may be nonzero (the pruning mask, or the nonzeros when no mask
    was given); ``residual`` names a tensor added before the (optional) ReLU.
    """

    name: str
    inp: str
    out: str
    weight: np.ndarray = field(repr=False)
    bias: np.ndarray = field(repr=False)
    mask: np.ndarray = field(repr=False)
    stride: tuple[int, int]
    padding: tuple[int, int]
    relu: bool = False
    residual: str | None = None

    @property
    def kernel(self) -> tuple[int, int]:
        return int(self.weight.shape[2]), int(self.weight.shape[3])


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
    name: str
    inp: str
    out: str
    weight: np.ndarray = field(repr=False)
    bias: np.ndarray = field(repr=False)
    relu: bool = False


@dataclass(frozen=True)
class Add:
    name: str
    a: str
    b: str
    out: str
    relu: bool = False


@dataclass(frozen=True)
class Relu:
    name: str
    inp: str
    out: str


Layer = Conv | Pool | AdaptiveAvgPool | Flatten | Linear | Add | Relu


@dataclass(frozen=True)
class Graph:
    """Layers in execution order; ``shapes`` maps every tensor to its per-image shape."""

    input: str
    output: str
    layers: tuple[Layer, ...]
    shapes: Mapping[str, tuple[int, ...]]


def layer_inputs(layer: Layer) -> tuple[str, ...]:
    if isinstance(layer, Add):
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
    seq = list(value)  # type: ignore[arg-type]
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


_CONV = {"aten.conv2d.default", "aten.convolution.default"}
_BN = {"aten.batch_norm.default", "aten._native_batch_norm_legit_no_training.default"}
_RELU = {"aten.relu.default", "aten.relu_.default"}
_ADD = {"aten.add.Tensor", "aten.add_.Tensor"}
_MAXPOOL = {"aten.max_pool2d.default", "aten.max_pool2d_with_indices.default"}
_AVGPOOL = {"aten.avg_pool2d.default"}
_ADAPTIVE = {"aten.adaptive_avg_pool2d.default", "aten._adaptive_avg_pool2d.default"}
_FLATTEN = {"aten.flatten.using_ints", "aten.view.default", "aten.reshape.default", "aten._unsafe_view.default"}
_IDENTITY = {"aten.dropout.default", "aten.dropout_.default", "aten.clone.default", "aten.contiguous.default",
             "aten.alias.default", "aten.detach.default", "aten.detach_.default"}
_TRANSPOSE = {"aten.permute.default", "aten.t.default", "aten.transpose.int"}


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
    relu: bool = False
    residual: str | None = None


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
            arrays[name] = value.detach().to(torch.float64).cpu().numpy() if value.is_floating_point() \
                else value.detach().cpu().numpy()
            keys[name] = target
    if len(user_inputs) != 1:
        raise CodegenError(f"expected exactly one tensor input, got {len(user_inputs)}")
    return arrays, keys, user_inputs[0]


def lower(program: torch.export.ExportedProgram, masks: Mapping[str, torch.Tensor] | None = None) -> Graph:
    """Lower an exported program (eval mode, dynamic batch) to fused layers.

    BatchNorm is folded into the preceding conv, ReLU into its producer when that producer has no
    other user, and a residual add into the later of its conv operands.
    """
    masks = dict(masks or {})
    arrays, keys, user_input = _params(program)
    graph = program.graph
    shapes: dict[str, tuple[int, ...]] = {}
    alias: dict[str, str] = {}  # node name -> tensor name it forwards
    consts: dict[str, np.ndarray] = dict(arrays)
    layers: list[object] = []
    producer: dict[str, object] = {}
    used_masks: set[str] = set()

    def val(arg: object, node: torch.fx.Node) -> str:
        if not isinstance(arg, torch.fx.Node):
            raise CodegenError(f"node {node.name}: expected a tensor argument, got {arg!r}")
        name = alias.get(arg.name, arg.name)
        if name not in shapes:
            raise CodegenError(f"node {node.name}: argument {arg.name} is not an activation")
        return name

    def const(arg: object, node: torch.fx.Node) -> np.ndarray | None:
        if arg is None:
            return None
        if not isinstance(arg, torch.fx.Node) or arg.name not in consts:
            raise CodegenError(f"node {node.name}: expected a weight argument, got {arg}")
        return consts[arg.name]

    out_node = next(n for n in graph.nodes if n.op == "output")
    out_args = out_node.args[0]
    if isinstance(out_args, (list, tuple)):
        if len(out_args) != 1:
            raise CodegenError(f"expected exactly one output, got {len(out_args)}")
        out_arg = out_args[0]
    else:
        out_arg = out_args

    for node in graph.nodes:
        if node.op == "placeholder":
            if node.name == user_input:
                shapes[node.name] = _shape(node)
            continue
        if node.op == "output":
            continue
        if node.op != "call_function":
            raise UnsupportedOpError(f"unsupported node kind {node.op} at node {node.name}")
        target = str(node.target)
        args = list(node.args)
        kwargs = dict(node.kwargs)
        if target == "aten.sym_size.int":
            continue
        if target == "<built-in function getitem>":
            src = args[0]
            if isinstance(src, torch.fx.Node) and (src.name in shapes or src.name in alias):
                if args[1] != 0:
                    raise UnsupportedOpError(f"unsupported use of output {args[1]} of {src.name} at node {node.name}")
                alias[node.name] = alias.get(src.name, src.name)
                continue
            raise UnsupportedOpError(f"unsupported getitem at node {node.name}")
        if target in _TRANSPOSE and isinstance(args[0], torch.fx.Node) and args[0].name in consts:
            consts[node.name] = consts[args[0].name].T
            continue
        if target in _IDENTITY:
            alias[node.name] = val(args[0], node)
            continue

        if target in _CONV:
            x = val(args[0], node)
            w_node = args[1]
            weight = const(w_node, node)
            bias = const(args[2] if len(args) > 2 else kwargs.get("bias"), node)
            if target == "aten.conv2d.default":
                names = ("stride", "padding", "dilation", "groups")
                given = dict(zip(names, args[3:]))
                given.update({k: v for k, v in kwargs.items() if k in names})
                stride, padding = given.get("stride", 1), given.get("padding", 0)
                dilation, groups, transposed = given.get("dilation", 1), given.get("groups", 1), False
            else:
                stride, padding, dilation, transposed, _, groups = args[3:9]
            if isinstance(padding, str):
                raise UnsupportedOpError(f"unsupported conv padding mode {padding!r} at node {node.name}")
            if transposed or groups != 1 or _pair(dilation) != (1, 1) or weight is None or weight.ndim != 4:
                raise UnsupportedOpError(f"unsupported convolution (transposed, grouped or dilated) at node {node.name}")
            key = keys.get(w_node.name, w_node.name)  # type: ignore[union-attr]
            if key in masks:
                mask = masks[key].detach().cpu().numpy().astype(bool)
                used_masks.add(key)
                if mask.shape != weight.shape:
                    raise CodegenError(f"mask {key} has shape {mask.shape}, weight has {weight.shape}")
            else:
                mask = weight != 0
            w = np.where(mask, weight, 0.0)
            b = np.zeros(w.shape[0]) if bias is None else np.asarray(bias, dtype=np.float64)
            layer = _Conv(node.name, x, node.name, w, b, mask, _pair(stride), _pair(padding))
        elif target in _BN:
            x = val(args[0], node)
            if target == "aten.batch_norm.default":
                gamma, beta, mean, var = (const(a, node) for a in args[1:5])
                if args[5]:
                    raise CodegenError(f"node {node.name}: batch norm in training mode; export the model in eval mode")
                eps = float(args[7])
            else:
                gamma, beta, mean, var = (const(a, node) for a in args[1:5])
                eps = float(args[6])
            c = shapes[x][0]
            gamma = np.ones(c) if gamma is None else gamma
            beta = np.zeros(c) if beta is None else beta
            scale = gamma / np.sqrt(var + eps)
            shift = beta - mean * scale
            prev = producer.get(x)
            if isinstance(prev, _Conv) and not prev.relu and prev.residual is None and len(args[0].users) == 1:
                prev.weight = prev.weight * scale[:, None, None, None]
                prev.bias = prev.bias * scale + shift
                prev.out = node.name
                producer.pop(x)
                producer[node.name] = prev
                shapes[node.name] = _shape(node)
                continue
            raise UnsupportedOpError(f"unsupported batch norm not preceded by a conv at node {node.name}")
        elif target in _RELU:
            x = val(args[0], node)
            prev = producer.get(x)
            if isinstance(prev, (_Conv, _Linear, _Add)) and not prev.relu and len(args[0].users) == 1 and args[0] is not out_arg:
                prev.relu = True
                prev.out = node.name
                producer.pop(x)
                producer[node.name] = prev
                shapes[node.name] = _shape(node)
                continue
            layer = _Relu(node.name, x, node.name)
        elif target in _ADD:
            if kwargs.get("alpha", 1) != 1:
                raise UnsupportedOpError(f"unsupported add with alpha at node {node.name}")
            a, b = val(args[0], node), val(args[1], node)
            if shapes[a] != shapes[b]:
                raise UnsupportedOpError(f"unsupported broadcasting add at node {node.name}")
            layer = _Add(node.name, a, b, node.name)
        elif target in _MAXPOOL or target in _AVGPOOL:
            x = val(args[0], node)
            kernel = _pair(args[1])
            stride = _pair(args[2] if len(args) > 2 else kwargs.get("stride"), None) if (len(args) > 2 and args[2]) or kwargs.get("stride") else kernel
            padding = _pair(args[3] if len(args) > 3 else kwargs.get("padding", 0))
            if target in _MAXPOOL:
                dilation = _pair(args[4] if len(args) > 4 else kwargs.get("dilation", 1))
                if dilation != (1, 1):
                    raise UnsupportedOpError(f"unsupported dilated max pooling at node {node.name}")
                ceil = bool(args[5] if len(args) > 5 else kwargs.get("ceil_mode", False))
                layer = Pool(node.name, x, node.name, "max", kernel, stride, padding, ceil)
            else:
                ceil = bool(args[4] if len(args) > 4 else kwargs.get("ceil_mode", False))
                include = bool(args[5] if len(args) > 5 else kwargs.get("count_include_pad", True))
                divisor = args[6] if len(args) > 6 else kwargs.get("divisor_override")
                layer = Pool(node.name, x, node.name, "avg", kernel, stride, padding, ceil, include, divisor)
        elif target in _ADAPTIVE:
            x = val(args[0], node)
            out_shape = _shape(node)
            layer = AdaptiveAvgPool(node.name, x, node.name, (out_shape[1], out_shape[2]))
        elif target == "aten.mean.dim":
            x = val(args[0], node)
            dims = sorted(d % 4 for d in args[1])
            keep = bool(args[2] if len(args) > 2 else kwargs.get("keepdim", False))
            if dims != [2, 3] or len(shapes[x]) != 3:
                raise UnsupportedOpError(f"unsupported mean over dims {args[1]} at node {node.name}")
            if keep:
                layer = AdaptiveAvgPool(node.name, x, node.name, (1, 1))
            else:
                pooled = node.name + "_pool"
                shapes[pooled] = (shapes[x][0], 1, 1)
                layers.append(AdaptiveAvgPool(node.name, x, pooled, (1, 1)))
                layer = Flatten(node.name + "_flatten", pooled, node.name)
        elif target in _FLATTEN:
            x = val(args[0], node)
            out_shape = _shape(node)
            if out_shape == shapes[x]:
                alias[node.name] = x
                continue
            if len(out_shape) != 1 or int(np.prod(shapes[x])) != out_shape[0]:
                raise UnsupportedOpError(f"unsupported reshape {shapes[x]} -> {out_shape} at node {node.name}")
            layer = Flatten(node.name, x, node.name)
        elif target in ("aten.linear.default", "aten.addmm.default"):
            if target == "aten.linear.default":
                x = val(args[0], node)
                weight = const(args[1], node)
                bias = const(args[2] if len(args) > 2 else kwargs.get("bias"), node)
            else:
                if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1:
                    raise UnsupportedOpError(f"unsupported addmm with alpha/beta at node {node.name}")
                bias = const(args[0], node)
                x = val(args[1], node)
                weight = const(args[2], node).T  # type: ignore[union-attr]
            assert weight is not None
            if len(shapes[x]) != 1:
                raise UnsupportedOpError(f"unsupported linear on a {len(shapes[x]) + 1}-d tensor at node {node.name}")
            b = np.zeros(weight.shape[0]) if bias is None else bias
            layer = _Linear(node.name, x, node.name, weight, b)
        else:
            raise UnsupportedOpError(f"unsupported op {target} at node {node.name}")

        shapes[node.name] = _shape(node)
        layers.append(layer)
        producer[node.name] = layer

    if not isinstance(out_arg, torch.fx.Node):
        raise CodegenError("the model output is not a tensor")
    output_name = alias.get(out_arg.name, out_arg.name)
    unknown = set(masks) - used_masks
    if unknown:
        raise CodegenError(f"mask {sorted(unknown)[0]} does not belong to any convolution weight")
    # final output names: layers record their (possibly fused) output in .out
    final = _fuse_residuals(layers)
    final_layers = tuple(_freeze(l) for l in final)
    produced = {l.out for l in final_layers}
    if output_name not in produced and output_name != user_input:
        raise CodegenError(f"model output {output_name} is not produced by any layer")
    return Graph(user_input, output_name, final_layers, {k: v for k, v in shapes.items()})


@dataclass
class _Linear:
    name: str
    inp: str
    out: str
    weight: np.ndarray
    bias: np.ndarray
    relu: bool = False


@dataclass
class _Add:
    name: str
    a: str
    b: str
    out: str
    relu: bool = False


@dataclass
class _Relu:
    name: str
    inp: str
    out: str


def _inputs(layer: object) -> tuple[str, ...]:
    if isinstance(layer, (_Add, Add)):
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
            index = {l.out: j for j, l in enumerate(out)}  # type: ignore[attr-defined]
            best = None
            for mine, other in ((add.a, add.b), (add.b, add.a)):
                j = index.get(mine)
                if j is None or not isinstance(out[j], _Conv):
                    continue
                conv = out[j]
                if conv.relu or conv.residual is not None:
                    continue
                n_users = sum(1 for l in out for name in _inputs(l) if name == mine)
                if n_users != 1:
                    continue
                k = index.get(other, -1)  # -1: the model input
                if k < j and (best is None or j > best[0]):
                    best = (j, conv, other)
            if best is not None:
                j, conv, other = best
                conv.residual = other
                conv.relu = add.relu
                conv.out = add.out
                del out[i]
                continue
        i += 1
    return out


def _freeze(layer: object) -> Layer:
    if isinstance(layer, _Conv):
        return Conv(layer.name, layer.inp, layer.out, layer.weight, layer.bias, layer.mask, layer.stride,
                    layer.padding, layer.relu, layer.residual)
    if isinstance(layer, _Linear):
        return Linear(layer.name, layer.inp, layer.out, np.asarray(layer.weight), np.asarray(layer.bias), layer.relu)
    if isinstance(layer, _Add):
        return Add(layer.name, layer.a, layer.b, layer.out, layer.relu)
    if isinstance(layer, _Relu):
        return Relu(layer.name, layer.inp, layer.out)
    return layer  # type: ignore[return-value]


def conv_layers(graph: Graph) -> Sequence[Conv]:
    return [l for l in graph.layers if isinstance(l, Conv)]
