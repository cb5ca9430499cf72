"""Hardening for ``program.json`` (the torch.export graph) on the owner's way out.

``torch._export.serde.serialize`` records, for every graph node, the Python ``stack_trace`` of
the owner's forward pass (absolute file paths and source lines of the owner's code), the
``nn_module_stack`` (module classes, e.g. ``hospital_models.secret.Net``) and ``torch_fn``. None
of that is needed to rebuild the graph, and all of it describes the owner's machine and code,
so it must not cross by default. ``strip_program`` removes it (the owner calls it on its own
export before sending); ``check_program`` is the egress guard's check that nothing else rides
along: strict JSON (no duplicate keys, no NaN), bytes equal to the serializer's own encoding of
the parsed value (no white-space channel), and node metadata only from an allow-list.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from ._wire.canonical import JSONDepthError, check_depth, refuse_duplicate_keys
from .errors import EgressViolation

__all__ = ["MAX_PROGRAM_BYTES", "NODE_METADATA_ALLOWED", "check_program", "strip_program"]

NODE_METADATA_ALLOWED: frozenset[str] = frozenset()
MAX_PROGRAM_BYTES = 64 * 1024 * 1024


def _parse(data: bytes) -> Any:
    no_dupes = refuse_duplicate_keys(lambda key: EgressViolation(f"egress blocked: program.json has a duplicate key {key!r}"))

    def no_constant(text: str) -> Any:
        raise EgressViolation(f"egress blocked: program.json holds {text}")

    if len(data) > MAX_PROGRAM_BYTES:
        raise EgressViolation(f"egress blocked: program.json exceeds {MAX_PROGRAM_BYTES} bytes")
    try:
        check_depth(data)
        return json.loads(data.decode("utf-8"), object_pairs_hook=no_dupes, parse_constant=no_constant)
    except JSONDepthError as exc:
        raise EgressViolation(f"egress blocked: program.json: {exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise EgressViolation("egress blocked: program.json is not valid JSON") from exc


def _nodes(program: Any) -> Iterable[dict[str, Any]]:
    try:
        nodes = program["graph_module"]["graph"]["nodes"]
    except (KeyError, TypeError) as exc:
        raise EgressViolation("egress blocked: program.json is not a serialized exported program") from exc
    if not isinstance(nodes, list):
        raise EgressViolation("egress blocked: program.json graph nodes are not a list")
    for node in nodes:
        if not isinstance(node, dict):
            raise EgressViolation("egress blocked: program.json has a malformed node")
        yield node


def strip_program(data: bytes, *, keep: frozenset[str] = NODE_METADATA_ALLOWED) -> bytes:
    """``program.json`` without node metadata outside ``keep`` and without module metadata."""
    program = _parse(data)
    for node in _nodes(program):
        meta = node.get("metadata") or {}
        node["metadata"] = {k: v for k, v in meta.items() if k in keep}
    if isinstance(program.get("graph_module"), dict) and "metadata" in program["graph_module"]:
        program["graph_module"]["metadata"] = {}
    return json.dumps(program).encode("utf-8")


def check_program(data: bytes, *, keep: frozenset[str] = NODE_METADATA_ALLOWED) -> None:
    """Raise ``EgressViolation`` unless ``program.json`` carries nothing beyond the graph."""
    program = _parse(data)
    if json.dumps(program).encode("utf-8") != data:
        raise EgressViolation("egress blocked: program.json differs from a fresh encoding of its content (hidden bytes)")
    for node in _nodes(program):
        meta = node.get("metadata") or {}
        if not isinstance(meta, dict):
            raise EgressViolation("egress blocked: program.json node metadata is malformed")
        extra = sorted(set(meta) - keep)
        if extra:
            raise EgressViolation(
                f"egress blocked: program.json node {node.get('name')!r} carries {', '.join(extra)} "
                "(describes the owner's code; strip it with protocol.program_guard.strip_program)"
            )
    module_meta = program["graph_module"].get("metadata") if isinstance(program["graph_module"], dict) else None
    if module_meta:
        raise EgressViolation("egress blocked: program.json carries module metadata")
