"""A received graph is data, not code: the op allow-list, the JSON checks and the size bounds.

Every hostile graph here is crafted the way an owner could: by editing the ``program.json`` of a
small export. Each is refused by ``program_from_files`` before torch's deserializer runs (the
``no_deserializer`` fixture fails the test if it does), so nothing in it ever executes.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import torch

from protocol import graph_ops
from protocol.artifact import (
    CONSTANTS_FILE,
    PROGRAM_FILE,
    WEIGHTS_FILE,
    ArtifactLimits,
    check_program_files,
    dump_tensors,
    program_from_files,
    program_to_files,
)
from protocol.errors import ArtifactError
from protocol.graph_ops import ALLOWED_OPS, check_expression, check_graph
from protocol.program_guard import strip_program
from protocol.spec import InputSpec, SpecError
from tests.helpers import export_eval


def _small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3)
    ).eval()


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    exported = program_to_files(export_eval(_small_model(), (1, 8, 8)))  # dynamic batch: symbolic shapes
    exported[PROGRAM_FILE] = strip_program(exported[PROGRAM_FILE])
    return exported


@pytest.fixture()
def no_deserializer(monkeypatch):
    from torch._export.serde import serialize

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the deserializer ran on a graph that should have been refused before")

    monkeypatch.setattr(serialize.ExportedProgramDeserializer, "deserialize", refuse)


def _edited(files: dict[str, bytes], edit) -> dict[str, bytes]:
    program = json.loads(files[PROGRAM_FILE])
    edit(program)
    return {**files, PROGRAM_FILE: json.dumps(program).encode()}


def _nodes(program: dict) -> list[dict]:
    return program["graph_module"]["graph"]["nodes"]


def _relu(program: dict) -> dict:
    return next(n for n in _nodes(program) if n["target"] == "torch.ops.aten.relu.default")


def test_a_legitimate_export_still_rebuilds_and_runs(files):
    program = program_from_files(files)
    x = torch.rand(2, 1, 8, 8)
    assert torch.allclose(program.module()(x), _small_model()(x), atol=1e-6)


def test_graph_reading_a_file_is_refused_before_the_deserializer_runs(files, tmp_path, no_deserializer):
    secret = tmp_path / "signing.key"
    secret.write_bytes(b"ENTITY-SECRET-KEY-0123456789")

    def read_file(program: dict) -> None:
        _nodes(program).insert(
            0,
            {
                "target": "torch.ops.aten.from_file.default",
                "name": "leak",
                "metadata": {},
                "inputs": [
                    {"name": "filename", "arg": {"as_string": str(secret)}, "kind": 1},
                    {"name": "shared", "arg": {"as_bool": False}, "kind": 1},
                    {"name": "size", "arg": {"as_int": 28}, "kind": 1},
                    {"name": "dtype", "arg": {"as_scalar_type": 1}, "kind": 2},
                ],
                "outputs": [{"as_tensor": {"name": "leak"}}],
                "is_hop_single_tensor_return": None,
            },
        )
        program["graph_module"]["graph"]["tensor_values"]["leak"] = {
            "dtype": 1,
            "sizes": [{"as_int": 28}],
            "requires_grad": False,
            "device": {"type": "cpu", "index": None},
            "strides": [{"as_int": 1}],
            "storage_offset": {"as_int": 0},
            "layout": 7,
        }

    hostile = _edited(files, read_file)
    with pytest.raises(ArtifactError, match=r"graph node 'leak' calls aten\.from_file\.default, .*reads a file") as info:
        program_from_files(hostile)
    assert "ENTITY-SECRET" not in str(info.value)
    with pytest.raises(ArtifactError, match="from_file"):
        check_program_files(hostile)


def test_graph_that_prints_is_refused():
    class Prints(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            torch.ops.aten._print("hello from the owner")
            return x.relu()

    files = program_to_files(torch.export.export(Prints(), (torch.zeros(1, 1, 4, 4),)))
    with pytest.raises(ArtifactError, match=r"calls aten\._print\.default, which is refused because it prints"):
        program_from_files(files)


def test_graph_allocating_a_size_it_names_is_refused(no_deserializer):
    class Allocates(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.full((4,), 2.0).sum()

    files = program_to_files(torch.export.export(Allocates(), (torch.zeros(1, 1, 4, 4),)))

    def huge(program: dict) -> None:
        full = next(n for n in _nodes(program) if n["target"] == "torch.ops.aten.full.default")
        full["inputs"][0]["arg"] = {"as_ints": [100_000, 100_000, 64]}  # 2.5 TB of float32

    with pytest.raises(ArtifactError, match=r"aten\.full\.default, which is refused because it allocates"):
        program_from_files(_edited(files, huge))


@pytest.mark.parametrize(
    "target, why",
    [
        ("torch.ops.aten.copy_.default", "writes into an existing tensor"),
        ("torch.ops.aten.empty.memory_format", "allocates"),
        ("torch.ops.aten.zeros_like.default", "allocates"),
        ("torch.ops.aten.arange.default", "allocates"),
        ("torch.ops.aten.randn.default", "allocates"),
        ("torch.ops.aten.sigmoid_.default", "in place"),
        ("torch.ops.higher_order.cond", "runs a subgraph"),
        ("torch.ops.profiler._record_function_enter.default", "not a tensor computation"),
        ("torch.load", "not one of the compute ops"),
        ("builtins.exec", "not one of the compute ops"),
        ("#custom_extension", "not one of the compute ops"),
        ("torch.ops.aten.relu", "not one of the compute ops"),  # a packet, not an overload
    ],
)
def test_ops_off_the_list_are_refused_by_name(files, no_deserializer, target, why):
    hostile = _edited(files, lambda program: _relu(program).update(target=target))
    with pytest.raises(ArtifactError, match="graph node 'relu' calls") as info:
        program_from_files(hostile)
    assert why in str(info.value) and "ALLOWED_OPS" in str(info.value)


def test_guards_code_is_refused(files, no_deserializer):
    # guards_code is exec-ed as Python when the rebuilt module runs.
    hostile = _edited(files, lambda program: program.update(guards_code=["__import__('os').getpid() > 0"]))
    with pytest.raises(ArtifactError, match="guards_code"):
        program_from_files(hostile)


def _symbolic_paths(obj: Any, path: tuple = ()) -> list[tuple]:
    if isinstance(obj, dict):
        return [path + ("expr_str",)] if "expr_str" in obj else [p for k, v in obj.items() for p in _symbolic_paths(v, path + (k,))]
    if isinstance(obj, list):
        return [p for i, v in enumerate(obj) for p in _symbolic_paths(v, path + (i,))]
    return []


@pytest.mark.parametrize(
    "expr",
    [
        "__import__('os').getpid()",
        "exec(chr(49))",
        "S('1 + 1')",
        "Symbol('s0').__class__",
        "Symbol(chr(115))",
        "Symbol('os.system')",
        "Integer(1)[0]",
        "(lambda: 1)()",
        "Max(*[Integer(1)])",
        "Symbol('s0', **{'positive': True})",
        "Float('1.5', precision=53).evalf",
        "Integer('12')",
        "Pow(Integer(10), Integer(100000000000000000000000))",
    ],
)
def test_symbolic_expressions_that_are_not_arithmetic_are_refused(files, no_deserializer, expr):
    program = json.loads(files[PROGRAM_FILE])
    paths = _symbolic_paths(program)
    assert paths, "the fixture export should have a symbolic batch size"
    node = program
    for key in paths[0][:-1]:
        node = node[key]
    node["expr_str"] = expr
    with pytest.raises(ArtifactError, match="symbolic shape expression"):
        program_from_files({**files, PROGRAM_FILE: json.dumps(program).encode()})


def test_the_expressions_torch_export_writes_are_accepted(files):
    program = json.loads(files[PROGRAM_FILE])
    written = set()  # every expr_str of a real export
    for path in _symbolic_paths(program):
        node = program
        for key in path:
            node = node[key]
        written.add(node)
    assert written
    for expr in written | {
        "Mul(Integer(2), Symbol('s77', positive=True, integer=True))",
        "FloorDiv(Add(Symbol('s1', integer=True), Integer(-1)), Integer(2))",
        "Max(Integer(1), Symbol('u0', integer=True))",
        "Float('1.5', precision=53)",
        "-int_oo",
    }:
        check_expression(expr)


@pytest.mark.parametrize("kind", ["as_graph", "as_operator", "as_custom_obj"])
def test_arguments_that_carry_code_or_objects_are_refused(files, no_deserializer, kind):
    def inject(program: dict) -> None:
        _relu(program)["inputs"].append({"name": "extra", "arg": {kind: {"name": "x", "graph": {}}}, "kind": 1})

    with pytest.raises(ArtifactError, match="passes"):
        program_from_files(_edited(files, inject))


def test_non_tensor_graph_inputs_are_refused(files, no_deserializer):
    # A string input's value is written into generated guard code by torch's unlifting.
    def string_input(program: dict) -> None:
        program["graph_module"]["graph"]["inputs"].append({"as_string": "x'); print('owned"})

    with pytest.raises(ArtifactError, match="inputs other than tensors"):
        program_from_files(_edited(files, string_input))


def test_node_metadata_the_deserializer_interprets_is_refused(files, no_deserializer):
    hostile = _edited(files, lambda program: _relu(program).update(metadata={"source_fn_stack": "relu,torch.load"}))
    with pytest.raises(ArtifactError, match="metadata 'source_fn_stack'"):
        program_from_files(hostile)


def test_plain_string_metadata_is_still_accepted(files):
    kept = _edited(files, lambda program: _relu(program).update(metadata={"stack_trace": "File x.py, line 1"}))
    program_from_files(kept)


def test_node_count_is_bounded_before_the_graph_is_parsed(files, no_deserializer):
    many = _edited(files, lambda program: _nodes(program).extend(copy.deepcopy(_nodes(program)) * 3))
    with pytest.raises(ArtifactError, match="more than the limit of 10; .*ArtifactLimits.max_nodes"):
        program_from_files(many, ArtifactLimits(max_nodes=10))
    assert ArtifactLimits().max_nodes == 20_000


def test_tensor_count_and_bytes_are_bounded_from_the_headers_before_loading(files, monkeypatch):
    import protocol.artifact as artifact

    def no_load(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("tensors were loaded before the limits were checked")

    monkeypatch.setattr(artifact, "load_tensors", no_load)
    with pytest.raises(ArtifactError, match="holds 9 tensors, more than the limit of 8"):
        program_from_files(files, ArtifactLimits(max_tensors=8))
    with pytest.raises(ArtifactError, match=r"bytes of tensors, more than the limit of 1000 bytes"):
        program_from_files(files, ArtifactLimits(max_tensor_bytes=1000))
    constants = {**files, CONSTANTS_FILE: dump_tensors({"c": torch.zeros(300)})}
    with pytest.raises(ArtifactError, match="bytes of tensors, more than the limit"):  # constants count too
        check_program_files(constants, ArtifactLimits(max_tensor_bytes=len(files[WEIGHTS_FILE])))


def test_program_json_size_is_bounded(files):
    with pytest.raises(ArtifactError, match="exceeds the limit of 100 bytes"):
        program_from_files(files, ArtifactLimits(max_program_bytes=100))


def test_rebuilt_graph_check_refuses_what_the_json_check_would():
    class Prints(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            torch.ops.aten._print("x")
            return x.relu()

    with pytest.raises(ArtifactError, match=r"aten\._print\.default"):
        check_graph(torch.export.export(Prints(), (torch.zeros(1, 2),)))
    program = torch.export.export(torch.nn.ReLU(), (torch.zeros(1, 2),))
    check_graph(program)
    x = next(n for n in program.graph.nodes if n.op == "placeholder")
    with program.graph.inserting_after(x):
        program.graph.call_method("numpy", (x,))
    with pytest.raises(ArtifactError, match="is a call_method node"):
        check_graph(program)


def test_every_allowed_op_is_a_real_overload_that_computes_from_tensors():
    for name in ALLOWED_OPS:
        namespace, packet, overload = name.split(".")
        op = getattr(getattr(getattr(torch.ops, namespace), packet), overload)
        assert isinstance(op, torch._ops.OpOverload) and str(op) == name
        arguments = op._schema.arguments
        assert any("Tensor" in str(a.type) for a in arguments), f"{name} takes no tensor: it would be a factory"
        written = [a.name for a in arguments if a.alias_info is not None and a.alias_info.is_write]
        assert written in ([], ["self"]), f"{name} writes into {written}"
        assert not written or packet.endswith("_"), f"{name} mutates but is not an in-place activation"
    for refused in (
        "aten.from_file.default",
        "aten._print.default",
        "aten.full.default",
        "aten.copy_.default",
        "aten.empty.memory_format",
        "aten.ones.default",
        "aten.zeros.default",
        "aten.arange.default",
    ):
        assert refused not in ALLOWED_OPS


def test_torchvision_exports_pass_the_allow_list():
    """ResNet-18 and MobileNet v2, in the export IR and in core ATen after run_decompositions."""
    torchvision = pytest.importorskip("torchvision")
    for build in (torchvision.models.resnet18, torchvision.models.mobilenet_v2):
        exported = export_eval(build(num_classes=10), (3, 32, 32))
        for program in (exported, exported.run_decompositions()):
            artifact = program_to_files(program)
            check_program_files(artifact)
            ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
            assert ops - {"<built-in function getitem>"} <= ALLOWED_OPS


def test_input_spec_larger_than_the_limits_is_refused_before_anything_is_allocated():
    with pytest.raises(SpecError, match="exceeds the limit of 16 channels and 1024 pixels a side"):
        InputSpec((3, 100_000, 100_000), (0.5,) * 3, (0.25,) * 3, "RGB")
    with pytest.raises(SpecError, match="more than the limit of 1048576"):
        InputSpec((3, 1024, 1024), (0.5,) * 3, (0.25,) * 3, "RGB")
    with pytest.raises(SpecError, match="exceeds the limit"):
        InputSpec.from_json({"shape": [1, 4096, 4096], "channel_order": "L", "pixel_range": [0, 255], "mean": ["0.5"], "std": ["0.25"]})
    assert InputSpec((3, 512, 512), (0.5,) * 3, (0.25,) * 3, "RGB").shape == (3, 512, 512)
    assert InputSpec((1, 1024, 1024), (0.5,), (0.25,)).shape == (1, 1024, 1024)


def test_refusal_names_the_node_and_op_in_one_line(files):
    hostile = _edited(files, lambda program: _relu(program).update(target="torch.ops.aten.from_file.default"))
    with pytest.raises(ArtifactError) as info:
        check_program_files(hostile)
    text = str(info.value)
    assert "\n" not in text and "'relu'" in text and "aten.from_file.default" in text
    assert graph_ops.why_not("aten.from_file.default") in text
