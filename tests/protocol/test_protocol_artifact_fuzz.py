"""Hardening tests for ``protocol.artifact`` (the lead's module): a received graph whose JSON is
altered must give ``ArtifactError``, never another exception. Structured mutations replace one
leaf of the serialized program with a value of another type, which is what a hostile owner would
try against the entity's ``program_from_files``.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.artifact import program_from_files, program_to_files
from protocol.errors import ProtocolError
from protocol.program_guard import strip_program


def _files() -> dict[str, bytes]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 26 * 26, 10)
    ).eval()
    files = program_to_files(torch.export.export(model, (torch.zeros(1, 1, 28, 28),)))
    files["program.json"] = strip_program(files["program.json"])
    return files


FILES = _files()
PROGRAM = json.loads(FILES["program.json"])


def _leaves(obj: Any, path: tuple = ()) -> list[tuple]:
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _leaves(v, path + (k,))]
    if isinstance(obj, list):
        return [p for i, v in enumerate(obj) for p in _leaves(v, path + (i,))]
    return [path]


LEAVES = _leaves(PROGRAM)
ODD_VALUES = [None, 0, -1, 10**12, "", "x" * 5, [], {}, True, "torch.ops.aten.add.Tensor"]


def _mutated(index: int, value: Any) -> dict[str, bytes]:
    program = copy.deepcopy(PROGRAM)
    path = LEAVES[index % len(LEAVES)]
    node = program
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return {**FILES, "program.json": json.dumps(program).encode()}


def test_signature_names_of_the_wrong_type_give_the_clean_error_specific_cases() -> None:
    """The cases the fuzzer below found (kept as plain regression tests)."""
    specs = PROGRAM["graph_module"]["signature"]["input_specs"]
    parameter = next(i for i, s in enumerate(specs) if "parameter" in s)
    for path, value in (
        (("graph_module", "signature", "input_specs", parameter, "parameter", "parameter_name"), 7),
        (("graph_module", "signature", "input_specs", parameter, "parameter", "arg", "name"), []),
    ):
        program = copy.deepcopy(PROGRAM)
        node = program
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        try:
            program_from_files({**FILES, "program.json": json.dumps(program).encode()})
        except ProtocolError:
            continue
        except Exception as exc:
            pytest.fail(f"{'.'.join(map(str, path))} = {value!r}: {type(exc).__name__}: {exc}")


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(index=st.integers(min_value=0), value=st.sampled_from(ODD_VALUES))
def test_mutated_program_json_gives_only_the_clean_error(index: int, value: Any) -> None:
    try:
        program_from_files(_mutated(index, value))
    except ProtocolError:
        pass
