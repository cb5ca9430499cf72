"""Model artifacts: graph JSON + safetensors round-trip, and refusal of anything unexpected."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from protocol.artifact import (
    CONSTANTS_FILE,
    PROGRAM_FILE,
    WEIGHTS_FILE,
    ArtifactError,
    dump_tensors,
    load_model_dir,
    load_tensors,
    program_from_files,
    program_to_files,
    save_model_dir,
    with_state_dict,
)


def test_round_trip_gives_the_same_function(small_vgg_program):
    model, program = small_vgg_program
    rebuilt = program_from_files(program_to_files(program))
    x = torch.randn(5, 1, 28, 28)
    assert torch.equal(rebuilt.module()(x), model(x))


def test_serialisation_is_deterministic(small_vgg_program):
    _, program = small_vgg_program
    assert program_to_files(program) == program_to_files(program)


def test_extra_file_is_refused(small_vgg_program):
    files = program_to_files(small_vgg_program[1]) | {"sample_inputs.pkl": b"\x80\x04N."}
    with pytest.raises(ArtifactError, match="unexpected file"):
        program_from_files(files)


def test_extra_tensor_is_refused(small_vgg_program):
    _, program = small_vgg_program
    files = program_to_files(program)
    state = dict(program.state_dict) | {"smuggled": torch.zeros(3)}
    files[WEIGHTS_FILE] = dump_tensors(state)
    with pytest.raises(ArtifactError, match="does not use: smuggled"):
        program_from_files(files)


def test_wrong_shape_is_refused(small_vgg_program):
    _, program = small_vgg_program
    files = program_to_files(program)
    state = dict(program.state_dict)
    state["features.0.weight"] = torch.zeros(16, 1, 5, 5)
    files[WEIGHTS_FILE] = dump_tensors(state)
    with pytest.raises(ArtifactError, match="features.0.weight"):
        program_from_files(files)


def test_oversized_header_is_refused_before_parsing():
    data = struct.pack("<Q", 1 << 40) + b"{}"
    with pytest.raises(ArtifactError, match="exceeds"):
        load_tensors(data)


def test_metadata_and_trailing_bytes_are_refused():
    header = json.dumps({"__metadata__": {"secret": "x"}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    data = struct.pack("<Q", len(header)) + header + b"\0" * 4
    with pytest.raises(ArtifactError, match="metadata"):
        load_tensors(data)
    good = dump_tensors({"a": torch.ones(1)})
    with pytest.raises(ArtifactError, match="trailing"):
        load_tensors(good + b"hidden")


def test_non_aten_graph_is_refused(small_vgg_program):
    _, program = small_vgg_program
    files = program_to_files(program)
    text = files[PROGRAM_FILE].decode()
    assert "torch.ops.aten.conv2d.default" in text
    files[PROGRAM_FILE] = text.replace("torch.ops.aten.conv2d.default", "torch.ops.os.system.default", 1).encode()
    with pytest.raises(ArtifactError):
        program_from_files(files)


def test_model_dir_round_trip_with_masks(tmp_path, small_vgg_program):
    model, program = small_vgg_program
    mask = torch.zeros_like(program.state_dict["features.3.weight"], dtype=torch.bool)
    save_model_dir(tmp_path / "final", program, {"features.3.weight": mask})
    loaded, masks = load_model_dir(tmp_path / "final")
    assert torch.equal(masks["features.3.weight"], mask)
    assert not (tmp_path / "final" / CONSTANTS_FILE).exists()
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(loaded.module()(x), model(x))


def test_with_state_dict_swaps_weights(small_vgg_program):
    _, program = small_vgg_program
    state = {k: (torch.zeros_like(v) if k == "classifier.bias" else v) for k, v in program.state_dict.items()}
    swapped = with_state_dict(program, state)
    assert torch.count_nonzero(swapped.state_dict["classifier.bias"]) == 0
