"""Canonical JSON: the one byte encoding for everything that is hashed or signed.

Sorted keys, no insignificant white space, UTF-8, and no floats: a float has more than one textual
form, so a signature over one could fail to verify over another. Fractions travel as strings
("0.125") or as integers in fixed units (parts per million).
"""
from __future__ import annotations

import json
from typing import Any


class CanonicalJSONError(ValueError):
    """A value cannot be encoded canonically (a float, a non-string key, an unknown type)."""


def _check(value: Any, path: str) -> None:
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return
    if isinstance(value, float):
        raise CanonicalJSONError(f"float at {path or '<root>'}: encode it as a string or an integer")
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check(item, f"{path}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise CanonicalJSONError(f"non-string key {key!r} at {path or '<root>'}")
            _check(item, f"{path}.{key}" if path else key)
        return
    raise CanonicalJSONError(f"unsupported type {type(value).__name__} at {path or '<root>'}")


def dumps(value: Any) -> bytes:
    """Encode ``value`` as canonical JSON bytes."""
    _check(value, "")
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def loads(data: bytes) -> Any:
    """Decode JSON bytes, refusing floats, NaN/Infinity and duplicate keys."""

    def no_dupes(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, item in pairs:
            if key in out:
                raise CanonicalJSONError(f"duplicate key {key!r}")
            out[key] = item
        return out

    def no_float(text: str) -> Any:
        raise CanonicalJSONError(f"float {text} in canonical JSON")

    def no_constant(text: str) -> Any:
        raise CanonicalJSONError(f"{text} in canonical JSON")

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CanonicalJSONError("not UTF-8") from exc
    try:
        return json.loads(text, object_pairs_hook=no_dupes, parse_float=no_float, parse_constant=no_constant)
    except json.JSONDecodeError as exc:
        raise CanonicalJSONError(f"malformed JSON: {exc.msg} at {exc.pos}") from exc
