"""Model artifacts: a torch.export graph as JSON plus tensors in safetensors, never a pickle.

Why not ``torch.export.save``/``load``: the pt2 archive carries pickled sample inputs and may flag
weights ``use_pickle``; ``torch.export.load`` unpickles both, with ``weights_only=False`` as a
fallback, so opening a received archive can run the sender's code. Here the graph travels as the
serializer's JSON (``program.json``) and every tensor as safetensors, whose header is parsed and
bounds-checked by us before any tensor is built. The graph is rebuilt with the deserializer given
plain tensor dicts, so torch never unpickles anything.

A received graph is data, not code: before the deserializer sees it, the parsed JSON must call only
the compute ops on ``protocol.graph_ops.ALLOWED_OPS`` (an op's ``aten`` namespace proves nothing:
``aten.from_file`` reads files) and every size is bounded before anything is allocated
(``ArtifactLimits``: graph bytes and nodes, tensor count and bytes read from the safetensors
headers). ``check_program_files`` runs all of that without building a tensor or a graph, which is
what the entity does before it hands the files to its pruning sandbox.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from protocol._wire.safetensors import MAX_HEADER_BYTES, TensorInfo, parse_header
from protocol.errors import ArtifactError
from protocol.graph_ops import check_graph, check_serialized_program

__all__ = [
    "ArtifactLimits",
    "CONSTANTS_FILE",
    "DEFAULT_LIMITS",
    "MASKS_FILE",
    "MAX_PROGRAM_BYTES",
    "PROGRAM_FILE",
    "WEIGHTS_FILE",
    "check_program_files",
    "dtype_name",
    "dump_tensors",
    "load_model_dir",
    "load_tensors",
    "program_from_files",
    "program_to_files",
    "save_model_dir",
    "with_state_dict",
    "write_files_atomically",
]

PROGRAM_FILE = "program.json"
WEIGHTS_FILE = "weights.safetensors"
CONSTANTS_FILE = "constants.safetensors"
MASKS_FILE = "masks.safetensors"

MAX_PROGRAM_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class ArtifactLimits:
    """Sizes a received model artifact may have, all checked before anything is allocated.

    The defaults leave room for the usual vision models (a torchvision ResNet-152 has ~1,000 graph
    nodes and 230 MB of float32 weights; VGG-16 has 530 MB) while keeping a hostile artifact from
    making the entity hold more than a few GiB: the pruning engine keeps a dense and a working
    copy of the weights next to the received bytes.
    """

    max_program_bytes: int = MAX_PROGRAM_BYTES
    max_nodes: int = 20_000
    max_tensors: int = 20_000  # weights and constants together
    max_tensor_bytes: int = 2 * 1024**3  # weights and constants together


DEFAULT_LIMITS = ArtifactLimits()

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``F32``...), the one spelling used in schemas."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError as exc:
        raise ArtifactError(f"unsupported tensor dtype {dtype}") from exc


def dump_tensors(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Serialise tensors to safetensors bytes (deterministic: sorted names, no metadata)."""
    plain: dict[str, torch.Tensor] = {}
    for name in sorted(tensors):
        tensor = tensors[name]
        if not isinstance(tensor, torch.Tensor):
            raise ArtifactError(f"{name}: not a tensor ({type(tensor).__name__})")
        dtype_name(tensor.dtype)
        plain[name] = tensor.detach().to("cpu").contiguous().clone()
    return _st_save(plain)


def load_tensors(data: bytes, *, max_header: int = MAX_HEADER_BYTES) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes after validating the header; metadata is refused (nothing rides along).

    The header is checked by :func:`protocol._wire.safetensors.parse_header` (bounded length, no
    duplicate keys, byte ranges that tile the data exactly) before safetensors builds any tensor.
    """
    header = parse_header(data, max_header=max_header)
    if header.metadata is not None:
        raise ArtifactError("safetensors: metadata is not accepted in a model artifact")
    for info in header.tensors.values():
        if info.dtype not in _DTYPES:
            raise ArtifactError(f"safetensors: tensor {info.name!r} has unsupported dtype {info.dtype}")
    try:
        return dict(_st_load(data))
    except Exception as exc:  # safetensors raises its own error types
        raise ArtifactError(f"safetensors: cannot parse ({exc})") from exc


def program_to_files(program: torch.export.ExportedProgram, *, strip: bool = True) -> dict[str, bytes]:
    """The artifact files for an exported program: graph JSON, weights, and constants if any.

    With ``strip`` (the default) the graph loses its per-node metadata (stack traces with the
    owner's file paths and source lines, module class names): none of it is needed to rebuild the
    graph, and all of it describes the owner's code.
    """
    from torch._export.serde.serialize import serialize

    from protocol.program_guard import strip_program

    for name, value in program.constants.items():
        if not isinstance(value, torch.Tensor):
            raise ArtifactError(f"constant {name!r} is a {type(value).__name__}, only tensors can travel")
    serialized = serialize(program)
    graph = strip_program(serialized.exported_program) if strip else serialized.exported_program
    files = {PROGRAM_FILE: graph, WEIGHTS_FILE: dump_tensors(program.state_dict)}
    if program.constants:
        files[CONSTANTS_FILE] = dump_tensors(program.constants)
    return files


def _check_ops(program: torch.export.ExportedProgram) -> None:
    """The rebuilt graph calls only allowed ops (the JSON was checked before; this is the backstop)."""
    check_graph(program)


def _tensor_headers(files: Mapping[str, bytes], limits: ArtifactLimits) -> tuple[dict[str, TensorInfo], dict[str, TensorInfo]]:
    """Parse the weights and constants headers and bound their tensor count and bytes together."""
    headers: dict[str, dict[str, TensorInfo]] = {}
    for name in (WEIGHTS_FILE, CONSTANTS_FILE):
        if name not in files:
            headers[name] = {}
            continue
        header = parse_header(files[name], what=name)
        if header.metadata is not None:
            raise ArtifactError(f"{name}: safetensors metadata is not accepted in a model artifact")
        for info in header.tensors.values():
            if info.dtype not in _DTYPES:
                raise ArtifactError(f"{name}: tensor {info.name!r} has unsupported dtype {info.dtype}")
        headers[name] = header.tensors
    count = sum(len(h) for h in headers.values())
    if count > limits.max_tensors:
        raise ArtifactError(f"model artifact holds {count} tensors, more than the limit of {limits.max_tensors}")
    total = sum(info.nbytes for h in headers.values() for info in h.values())
    if total > limits.max_tensor_bytes:
        raise ArtifactError(
            f"model artifact holds {total} bytes of tensors, more than the limit of {limits.max_tensor_bytes} bytes; send a smaller model"
        )
    return headers[WEIGHTS_FILE], headers[CONSTANTS_FILE]


def _prechecked(files: Mapping[str, bytes], limits: ArtifactLimits) -> tuple[Any, set[str]]:
    """Every check that needs no tensor and no graph: (serialized program, parameter names)."""
    from torch._export.serde import schema
    from torch._export.serde.serialize import _dict_to_dataclass

    allowed = {PROGRAM_FILE, WEIGHTS_FILE, CONSTANTS_FILE}
    extra = sorted(set(files) - allowed)
    if extra:
        raise ArtifactError(f"unexpected file(s) in model artifact: {', '.join(extra)}")
    for required in (PROGRAM_FILE, WEIGHTS_FILE):
        if required not in files:
            raise ArtifactError(f"model artifact lacks {required}")
    graph_bytes = files[PROGRAM_FILE]
    if len(graph_bytes) > limits.max_program_bytes:
        raise ArtifactError(f"{PROGRAM_FILE} exceeds the limit of {limits.max_program_bytes} bytes")
    weights, constants = _tensor_headers(files, limits)
    try:
        document = json.loads(bytes(graph_bytes).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ArtifactError(f"{PROGRAM_FILE} is not valid JSON") from exc
    check_serialized_program(document, max_nodes=limits.max_nodes)
    try:
        serialized = _dict_to_dataclass(schema.ExportedProgram, document)
    except Exception as exc:
        raise ArtifactError(f"{PROGRAM_FILE} is not a serialized exported program ({type(exc).__name__})") from exc
    try:
        parameters = _check_signature_tensors(serialized, weights, constants)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{PROGRAM_FILE} has a malformed signature ({type(exc).__name__}: {exc})") from exc
    return serialized, parameters


def check_program_files(files: Mapping[str, bytes], limits: ArtifactLimits = DEFAULT_LIMITS) -> None:
    """Refuse an artifact that :func:`program_from_files` would refuse, without building anything.

    File set, sizes, safetensors headers, the op allow-list, symbolic expressions and the graph
    signature against the tensors' names and shapes: all from bytes and JSON, so the entity can
    refuse a hostile graph before any torch code runs on it.
    """
    _prechecked(files, limits)


def program_from_files(files: Mapping[str, bytes], limits: ArtifactLimits = DEFAULT_LIMITS) -> torch.export.ExportedProgram:
    """Rebuild an exported program from artifact files without unpickling anything.

    Extra or missing files, sizes over ``limits``, malformed safetensors, tensors that do not match
    the graph's inputs exactly (names, dtypes, shapes) and ops off the allow-list are refused with
    :class:`ArtifactError`, all before the deserializer runs.
    """
    from torch._export.serde.serialize import ExportedProgramDeserializer

    serialized, parameters = _prechecked(files, limits)
    state = load_tensors(files[WEIGHTS_FILE])
    constants = load_tensors(files[CONSTANTS_FILE]) if CONSTANTS_FILE in files else {}
    state = {k: torch.nn.Parameter(v, requires_grad=v.is_floating_point()) if k in parameters else v for k, v in state.items()}
    try:
        program = ExportedProgramDeserializer().deserialize(serialized, state, constants, None)
    except ArtifactError:
        raise
    except Exception as exc:  # the deserializer's text quotes its own traceback; keep it out of refusals
        raise ArtifactError(f"{PROGRAM_FILE} could not be rebuilt ({type(exc).__name__})") from exc
    _check_ops(program)
    return program


def _check_signature_tensors(serialized: Any, state: Mapping[str, Any], constants: Mapping[str, Any]) -> set[str]:
    """The graph's parameter/buffer/constant inputs must be exactly the tensors supplied.

    ``state`` and ``constants`` map names to anything with a ``shape`` (tensors, or the
    safetensors headers' ``TensorInfo`` before any tensor is built). Returns the names that are
    parameters (the deserializer wants those as ``nn.Parameter``).
    """
    parameters: set[str] = set()
    wanted_state: set[str] = set()
    wanted_constants: set[str] = set()
    for spec in serialized.graph_module.signature.input_specs:
        kind = spec.type
        value = getattr(spec, kind)
        if kind == "parameter":
            wanted_state.add(value.parameter_name)
            parameters.add(value.parameter_name)
        elif kind == "buffer":
            (wanted_state if value.persistent else wanted_constants).add(value.buffer_name)
        elif kind == "tensor_constant":
            wanted_constants.add(value.tensor_constant_name)
        elif kind in ("custom_obj", "token", "constant_input"):
            if kind == "custom_obj":
                raise ArtifactError("graph takes a custom object input; only tensors can travel")
    for label, wanted, got in (("weights", wanted_state, state), ("constants", wanted_constants, constants)):
        missing, extra = sorted(wanted - set(got)), sorted(set(got) - wanted)
        if missing:
            raise ArtifactError(f"{label} lack tensor(s) the graph needs: {', '.join(missing[:5])}")
        if extra:
            raise ArtifactError(f"{label} hold tensor(s) the graph does not use: {', '.join(extra[:5])}")
    metas = serialized.graph_module.graph.tensor_values
    for spec in serialized.graph_module.signature.input_specs:
        kind = spec.type
        if kind not in ("parameter", "buffer", "tensor_constant"):
            continue
        value = getattr(spec, kind)
        name = {"parameter": "parameter_name", "buffer": "buffer_name", "tensor_constant": "tensor_constant_name"}[kind]
        target = getattr(value, name)
        tensor = state.get(target, constants.get(target))
        meta = metas.get(value.arg.name)
        if meta is None or tensor is None:
            continue
        shape = tuple(s.as_int if s.type == "as_int" else -1 for s in meta.sizes)
        if -1 not in shape and tuple(tensor.shape) != shape:
            raise ArtifactError(f"tensor {target!r} has shape {tuple(tensor.shape)}, the graph expects {shape}")
    return parameters


def with_state_dict(program: torch.export.ExportedProgram, state_dict: Mapping[str, torch.Tensor]) -> torch.export.ExportedProgram:
    """The same graph with new weights (names, dtypes and shapes must match exactly)."""
    current = program.state_dict
    if set(current) != set(state_dict):
        missing, extra = sorted(set(current) - set(state_dict)), sorted(set(state_dict) - set(current))
        raise ArtifactError(f"state dict mismatch: missing {missing[:5]}, extra {extra[:5]}")
    for name, tensor in state_dict.items():
        if tensor.shape != current[name].shape or tensor.dtype != current[name].dtype:
            raise ArtifactError(f"tensor {name!r}: {tuple(tensor.shape)} {tensor.dtype}, expected {tuple(current[name].shape)} {current[name].dtype}")
    files = program_to_files(program)
    files[WEIGHTS_FILE] = dump_tensors(state_dict)
    return program_from_files(files)


def write_files_atomically(directory: Path, files: Mapping[str, bytes]) -> None:
    """Write a directory of files so that it appears whole or not at all (replacing an old one)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        for name, data in files.items():
            if "/" in name or name.startswith("."):
                raise ArtifactError(f"refusing to write file name {name!r}")
            with open(staging / name, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(staging, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_model_dir(directory: Path, program: torch.export.ExportedProgram, masks: Mapping[str, torch.Tensor] | None = None) -> None:
    """Write a final model: graph JSON, weights, constants and (bool) masks, atomically."""
    files = program_to_files(program)
    if masks:
        files[MASKS_FILE] = dump_tensors({k: v.to(torch.bool) for k, v in masks.items()})
    write_files_atomically(Path(directory), files)


def load_model_dir(directory: Path) -> tuple[torch.export.ExportedProgram, dict[str, torch.Tensor]]:
    """Read a model directory written by :func:`save_model_dir`: (program, masks)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"model directory {directory} does not exist")
    names = {PROGRAM_FILE, WEIGHTS_FILE, CONSTANTS_FILE}
    files = {name: (directory / name).read_bytes() for name in names if (directory / name).is_file()}
    program = program_from_files(files)
    masks: dict[str, torch.Tensor] = {}
    if (directory / MASKS_FILE).is_file():
        masks = load_tensors((directory / MASKS_FILE).read_bytes())
        state = program.state_dict
        for name, mask in masks.items():
            if name not in state or tuple(state[name].shape) != tuple(mask.shape) or mask.dtype != torch.bool:
                raise ArtifactError(f"mask {name!r} does not match a weight of the model")
    return program, masks
