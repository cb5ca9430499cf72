"""Which ops a received graph may call: an explicit list of compute ops, checked on the JSON.

A received ``program.json`` is data, not code, only while every node is a pure tensor computation.
An op's namespace proves nothing: ``aten.from_file`` reads any file the entity can read,
``aten._print`` prints, ``aten.full`` allocates whatever size it is told, ``aten.copy_`` writes
into a tensor, and the deserializer resolves any dotted ``torch.*`` name to a Python callable
(``torch.load`` included). The serialized format also carries Python source in disguise: the
program's ``guards_code`` is ``exec``-ed when its module runs, and every symbolic-shape
``expr_str`` is parsed by ``sympy.sympify``, which evaluates Python. So a graph is admitted only
when:

* every node calls an op on ``ALLOWED_OPS`` (by full overload name) or ``operator.getitem``;
* the graph's inputs are tensors, no argument is a subgraph, an operator or a custom object,
  and there are no guards;
* every symbolic expression is sympy ``srepr`` text of shape arithmetic (calls of listed sympy
  classes on numbers and shape symbols, checked on its syntax tree);
* node metadata holds only the keys the deserializer copies as plain strings.

``check_serialized_program`` runs on the parsed JSON *before* torch's deserializer sees it, so
nothing in torch runs for a refused graph; ``check_graph`` repeats the op check on the rebuilt
``fx`` graph. The list covers what the pruning engine (``entity/pruning/graph.py``) and the code
generator (``codegen/ir.py``) handle plus what torchvision's ResNet, MobileNet v2/v3,
EfficientNet, SqueezeNet and ShuffleNet exports contain (both the export IR and the core-ATen
form after ``run_decompositions``); every entry computes its outputs from its tensor inputs
only. In-place forms of activations and ``add_`` are listed because ``nn.ReLU(inplace=True)``
and ``out += identity`` export as them; they write only into the graph's own values.
"""

from __future__ import annotations

import ast
import re
from typing import Any

import torch

from .errors import ArtifactError

__all__ = [
    "ALLOWED_OPS",
    "GETITEM",
    "MAX_EXPR_CHARS",
    "MAX_EXPR_DEPTH",
    "NODE_METADATA_ALLOWED",
    "OP_PREFIX",
    "check_expression",
    "check_graph",
    "check_serialized_program",
    "why_not",
]

ALLOWED_OPS: frozenset[str] = frozenset(
    {
        # convolution, normalisation
        "aten.conv2d.default",
        "aten.conv2d.padding",
        "aten.convolution.default",
        "aten.batch_norm.default",
        "aten._native_batch_norm_legit_no_training.default",
        # activations (and the in-place forms inplace=True modules export as)
        "aten.relu.default",
        "aten.relu_.default",
        "aten.relu6.default",
        "aten.hardtanh.default",
        "aten.hardtanh_.default",
        "aten.hardswish.default",
        "aten.hardswish_.default",
        "aten.hardsigmoid.default",
        "aten.hardsigmoid_.default",
        "aten.silu.default",
        "aten.silu_.default",
        "aten.sigmoid.default",
        "aten.tanh.default",
        "aten.gelu.default",
        "aten.leaky_relu.default",
        "aten.leaky_relu_.default",
        "aten.elu.default",
        "aten.clamp.default",
        "aten.softmax.int",
        "aten._softmax.default",
        "aten.log_softmax.int",
        "aten._log_softmax.default",
        # element-wise arithmetic
        "aten.add.Tensor",
        "aten.add_.Tensor",
        "aten.add.Scalar",
        "aten.sub.Tensor",
        "aten.mul.Tensor",
        "aten.mul_.Tensor",
        "aten.mul.Scalar",
        "aten.div.Tensor",
        # pooling and reductions
        "aten.max_pool2d.default",
        "aten.max_pool2d_with_indices.default",
        "aten.avg_pool2d.default",
        "aten.adaptive_avg_pool2d.default",
        "aten._adaptive_avg_pool2d.default",
        "aten.mean.dim",
        "aten.sum.default",
        "aten.sum.dim_IntList",
        # linear layers
        "aten.linear.default",
        "aten.addmm.default",
        "aten.mm.default",
        "aten.matmul.default",
        "aten.t.default",
        # views and layout (outputs no larger than their inputs, except cat which sums them)
        "aten.view.default",
        "aten.reshape.default",
        "aten._unsafe_view.default",
        "aten.flatten.using_ints",
        "aten.permute.default",
        "aten.transpose.int",
        "aten.squeeze.dim",
        "aten.squeeze.dims",
        "aten.unsqueeze.default",
        "aten.cat.default",
        "aten.slice.Tensor",
        "aten.select.int",
        "aten.split.Tensor",
        "aten.split_with_sizes.default",
        "aten.chunk.default",
        "aten.contiguous.default",
        "aten.clone.default",
        "aten.alias.default",
        "aten.detach.default",
        "aten.to.dtype",
        "aten._assert_tensor_metadata.default",
        "aten.dropout.default",
        "aten.dropout_.default",
        # the dynamic batch size
        "aten.sym_size.int",
    }
)

GETITEM = "_operator.getitem"
OP_PREFIX = "torch.ops."

# Why some ops people ask about are not on the list (keyed by op name without overload).
_WHY_NOT: dict[str, str] = {
    "aten.from_file": "it reads a file on the entity's host",
    "aten._print": "it prints",
    "aten.save": "it writes a file",
    "aten.copy_": "it writes into an existing tensor",
    "aten.fill_": "it writes into an existing tensor",
    "aten.set_": "it rebinds a tensor's storage",
    "aten.resize_": "it allocates whatever size it is given",
}
_FACTORY_PREFIXES = (
    "full",
    "empty",
    "zeros",
    "ones",
    "new_",
    "arange",
    "linspace",
    "logspace",
    "rand",
    "randint",
    "randperm",
    "normal",
    "eye",
    "scalar_tensor",
)

# Argument kinds the deserializer turns into code or objects rather than values.
_REFUSED_ARGUMENTS = {
    "as_graph": "a subgraph (control flow runs code the list does not cover)",
    "as_operator": "an operator passed as a value",
    "as_custom_obj": "a custom (script) object",
}
# Node metadata the deserializer only copies as strings; everything else it interprets.
NODE_METADATA_ALLOWED: frozenset[str] = frozenset({"stack_trace", "nn_module_stack", "torch_fn"})

# Symbolic shapes travel as sympy ``srepr`` text, e.g.
# ``Mul(Integer(2), Symbol('s77', positive=True, integer=True))``: calls of these names only.
_EXPR_NAMES = frozenset(
    {
        "Symbol",
        "Integer",
        "Rational",
        "Float",
        "Add",
        "Mul",
        "Pow",
        "Mod",
        "Max",
        "Min",
        "Abs",
        "floor",
        "ceiling",
        "Equality",
        "Unequality",
        "StrictLessThan",
        "LessThan",
        "StrictGreaterThan",
        "GreaterThan",
        "Eq",
        "Ne",
        "Lt",
        "Le",
        "Gt",
        "Ge",
        "And",
        "Or",
        "Not",
        "true",
        "false",
        "oo",
        "int_oo",
        "zoo",
        "nan",
        "Zero",
        "One",
        "NegativeOne",
        "Half",
        "Infinity",
        "NegativeInfinity",
        "IntInfinity",
        "NegativeIntInfinity",
        "BooleanTrue",
        "BooleanFalse",
        # torch.utils._sympy.functions, as the deserializer names them
        "FloorDiv",
        "ModularIndexing",
        "Where",
        "PythonMod",
        "CleanDiv",
        "CeilToInt",
        "FloorToInt",
        "CeilDiv",
        "LShift",
        "RShift",
        "PowByNatural",
        "FloatPow",
        "FloatTrueDiv",
        "IntTrueDiv",
        "IsNonOverlappingAndDenseIndicator",
        "TruncToFloat",
        "TruncToInt",
        "RoundToInt",
        "RoundDecimal",
        "ToFloat",
        "Identity",
    }
)
_EXPR_KEYWORDS = frozenset(
    {
        "positive",
        "negative",
        "nonnegative",
        "nonpositive",
        "integer",
        "real",
        "finite",
        "infinite",
        "zero",
        "nonzero",
        "even",
        "odd",
        "commutative",
        "precision",
    }
)
# The only calls whose first argument may be a string, and what that string may be: a shape
# symbol's name as torch.export makes them (s0, u3, zuf0; printed into code elsewhere in torch) or
# a decimal number.
_EXPR_STRINGS = {
    "Symbol": re.compile(r"[a-z]{1,8}[0-9]{0,12}"),
    "Float": re.compile(r"-?(?:[0-9]{1,40}(?:\.[0-9]{0,40})?(?:e[-+]?[0-9]{1,4})?|inf|nan)"),
}
_EXPR_NODES = (
    ast.Expression,
    ast.Call,
    ast.Name,
    ast.Load,
    ast.Constant,
    ast.keyword,
    ast.BinOp,
    ast.UnaryOp,
    ast.BoolOp,
    ast.Compare,
    ast.Add,
    ast.Sub,
    ast.Mult,
    ast.Div,
    ast.FloorDiv,
    ast.Mod,
    ast.Pow,
    ast.USub,
    ast.UAdd,
    ast.Not,
    ast.And,
    ast.Or,
    ast.Eq,
    ast.NotEq,
    ast.Lt,
    ast.LtE,
    ast.Gt,
    ast.GtE,
)
MAX_EXPR_CHARS = 4096
MAX_EXPR_DEPTH = 32


def why_not(op: str) -> str:
    """Why ``op`` (``aten.full.default`` style) is refused, in words for the refusal line."""
    packet = op.rsplit(".", 1)[0] if op.count(".") >= 2 else op
    if packet in _WHY_NOT:
        return _WHY_NOT[packet]
    namespace, _, name = packet.partition(".")
    if namespace == "higher_order":
        return "it runs a subgraph"
    if namespace == "aten" and name.lstrip("_").startswith(_FACTORY_PREFIXES):
        return "it allocates a tensor of a size written in the graph"
    if namespace == "aten" and name.endswith("_"):
        return "it modifies a tensor in place"
    if namespace in ("profiler", "prim", "prims"):
        return "it is not a tensor computation"
    return "it is not one of the compute ops the entity runs"


def _refuse_op(node_name: str, op: str) -> ArtifactError:
    shown = op if len(op) <= 120 else op[:117] + "..."
    return ArtifactError(
        f"graph node {node_name!r} calls {shown}, which is refused because {why_not(op)}; "
        "export the model with only the ops in protocol.graph_ops.ALLOWED_OPS"
    )


def check_expression(expr: Any) -> None:
    """Raise ``ArtifactError`` unless ``expr`` is a sympy ``srepr`` of shape arithmetic (no Python).

    ``sympy.sympify`` evaluates its input as Python, so the text is parsed here (parsing runs
    nothing) and every syntax node must be a call of a listed sympy class, a number, a shape
    symbol's quoted name, an assumption keyword or an operator: no attribute access, no
    subscripts, no builtins, no strings anywhere else.
    """
    if not isinstance(expr, str) or len(expr) > MAX_EXPR_CHARS:
        raise ArtifactError(f"symbolic shape expression must be a string of at most {MAX_EXPR_CHARS} characters")
    shown = repr(expr[:60])
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise ArtifactError(f"symbolic shape expression {shown} does not parse") from exc
    stack: list[tuple[ast.AST, int, re.Pattern[str] | None]] = [(tree, 0, None)]
    while stack:
        node, depth, string_ok = stack.pop()
        if depth > MAX_EXPR_DEPTH:
            raise ArtifactError(f"symbolic shape expression nests deeper than {MAX_EXPR_DEPTH}")
        if not isinstance(node, _EXPR_NODES):
            raise ArtifactError(f"symbolic shape expression {shown} holds a {type(node).__name__}, not arithmetic")
        if isinstance(node, ast.Name) and node.id not in _EXPR_NAMES:
            raise ArtifactError(f"symbolic shape expression {shown} names {node.id[:30]!r}, which is not a sympy class")
        if isinstance(node, ast.Constant):
            value = node.value
            if isinstance(value, str):
                if string_ok is None or not string_ok.fullmatch(value):
                    raise ArtifactError(f"symbolic shape expression {shown} holds a string where none belongs")
            elif not isinstance(value, (bool, int, float)):
                raise ArtifactError(f"symbolic shape expression {shown} holds a {type(value).__name__} constant")
            elif isinstance(value, int) and abs(value) >= 2**63:  # sympy would compute with it exactly
                raise ArtifactError(f"symbolic shape expression {shown} holds an integer beyond 64 bits")
        if isinstance(node, ast.keyword):
            if node.arg not in _EXPR_KEYWORDS or not isinstance(node.value, ast.Constant) or isinstance(node.value.value, str):
                raise ArtifactError(f"symbolic shape expression {shown} has an unexpected keyword argument")
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name):
                raise ArtifactError(f"symbolic shape expression {shown} calls something other than a sympy class")
            quoted = _EXPR_STRINGS.get(node.func.id)
            stack.append((node.func, depth + 1, None))
            stack.extend((arg, depth + 1, quoted if i == 0 else None) for i, arg in enumerate(node.args))
            stack.extend((kw, depth + 1, None) for kw in node.keywords)
            continue
        stack.extend((child, depth + 1, None) for child in ast.iter_child_nodes(node))


def check_serialized_program(program: Any, *, max_nodes: int) -> None:
    """Raise ``ArtifactError`` unless a parsed ``program.json`` is a graph of allowed ops only.

    Runs before ``torch._export.serde`` builds anything, so a refused graph never reaches torch.
    """
    try:
        graph_module = program["graph_module"]
        graph = graph_module["graph"]
        nodes = graph["nodes"]
    except (KeyError, TypeError) as exc:
        raise ArtifactError("program.json is not a serialized exported program (no graph_module.graph.nodes)") from exc
    if not isinstance(nodes, list):
        raise ArtifactError("program.json graph nodes are not a list")
    if len(nodes) > max_nodes:
        raise ArtifactError(
            f"graph has {len(nodes)} nodes, more than the limit of {max_nodes}; send a smaller model or raise ArtifactLimits.max_nodes"
        )
    if program.get("guards_code"):
        raise ArtifactError("program.json carries guards_code (Python source that would run on the entity); export without guards")
    if graph_module.get("treespec_namedtuple_fields"):
        raise ArtifactError("program.json declares namedtuple types; return plain tensors from the model")
    if graph.get("custom_obj_values"):
        raise ArtifactError("program.json carries custom objects; only tensors can travel")
    inputs = graph.get("inputs")
    if not isinstance(inputs, list) or not all(isinstance(i, dict) and list(i) == ["as_tensor"] for i in inputs):
        # Constant (int, string...) inputs become Python values torch writes into generated code.
        raise ArtifactError("program.json graph takes inputs other than tensors; export with tensor inputs only")
    for node in nodes:
        if not isinstance(node, dict):
            raise ArtifactError("program.json has a malformed node (not an object)")
        name = node.get("name")
        name = name[:80] if isinstance(name, str) else "?"
        target = node.get("target")
        if not isinstance(target, str):
            raise ArtifactError(f"graph node {name!r} has a malformed target")
        if target != GETITEM and not (target.startswith(OP_PREFIX) and target[len(OP_PREFIX) :] in ALLOWED_OPS):
            raise _refuse_op(name, target[len(OP_PREFIX) :] if target.startswith(OP_PREFIX) else target)
        metadata = node.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise ArtifactError(f"graph node {name!r} has malformed metadata")
        extra = sorted(set(metadata) - NODE_METADATA_ALLOWED)
        if extra:
            raise ArtifactError(f"graph node {name!r} carries metadata {extra[0][:40]!r}; strip it with protocol.program_guard.strip_program")
        if not all(isinstance(v, str) for v in metadata.values()):
            raise ArtifactError(f"graph node {name!r} has non-string metadata")
    _check_values(program)


def _check_values(program: Any) -> None:
    """Walk the whole document: no code-like argument kinds anywhere, every expression safe."""
    stack = [program]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key in _REFUSED_ARGUMENTS and value is not None:
                    raise ArtifactError(f"program.json passes {_REFUSED_ARGUMENTS[key]}; export a plain feed-forward model")
                if key == "expr_str":
                    check_expression(value)
                elif isinstance(value, (dict, list)):
                    stack.append(value)
        elif isinstance(item, list):
            stack.extend(v for v in item if isinstance(v, (dict, list)))


def check_graph(program: torch.export.ExportedProgram) -> None:
    """The same rules on a rebuilt program: only placeholders, allowed calls and the output.

    ``call_module``/``call_method`` nodes and attributes that are not tensors would run Python the
    list does not cover, and an exported program has none of them.
    """
    import operator

    graph_module = program.graph_module
    if any(True for _ in graph_module.named_children()):
        raise ArtifactError("graph holds submodules (subgraphs); export a plain feed-forward model")
    for node in program.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op == "get_attr":
            value = getattr(graph_module, str(node.target), None)
            if not isinstance(value, torch.Tensor):
                raise ArtifactError(f"graph node {node.name!r} reads attribute {str(node.target)[:80]!r}, which is not a tensor")
            continue
        if node.op != "call_function":
            raise ArtifactError(f"graph node {node.name!r} is a {node.op} node; only calls of listed ops are accepted")
        target = node.target
        if target is operator.getitem:
            continue
        if not isinstance(target, torch._ops.OpOverload) or str(target) not in ALLOWED_OPS:
            raise _refuse_op(node.name, str(target))
