"""Canonical JSON: the one byte encoding for everything that is hashed or signed.

Sorted keys, no insignificant white space, UTF-8, and no floats: a float has more than one textual
form, so a signature over one could fail to verify over another. Fractions travel as strings
("0.125") or as integers in fixed units (parts per million).

Decoding refuses arrays and objects nested deeper than ``MAX_DEPTH`` before the parser runs:
``json`` recurses once per level and raises ``RecursionError`` on ``[[[[...`` (at a depth that
depends on the caller's stack), while no blindprune document comes near the limit (a signed
statement nests 6 levels, an audit record 5, an exported CNN's program 9).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from itertools import accumulate
from typing import Any

from ..errors import ProtocolError

__all__ = ["CanonicalJSONError", "JSONDepthError", "MAX_DEPTH", "check_depth", "dumps", "json_depth", "loads", "refuse_duplicate_keys"]

MAX_DEPTH = 64

# A JSON string: from a quote to the next unescaped quote. The closing quote is optional so that
# an unterminated string matches to the end in one linear pass instead of being retried at every
# later quote (quadratic); the parser then reports it as malformed.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_LEVEL_STEP = tuple(1 if b in b"[{" else -1 if b in b"]}" else 0 for b in range(256))


class CanonicalJSONError(ProtocolError, ValueError):
    """A value cannot be encoded canonically (a float, a non-string key, an unknown type)."""


class JSONDepthError(CanonicalJSONError):
    """JSON nests arrays and objects deeper than ``MAX_DEPTH`` levels."""


def json_depth(data: bytes) -> int:
    """How deeply ``data`` nests arrays and objects, counting brackets outside strings only.

    Runs at C speed (a split or one regex pass, one ``translate``, one ``accumulate``) so that it
    can sit in front of every parse of the other party's bytes. For malformed JSON the number is
    only an estimate; the parser refuses such input anyway.
    """
    if b'\\"' in data:
        outside = _STRING.sub(b"", data)  # escaped quotes: find where each string ends
    else:
        outside = b"".join(data.split(b'"')[::2])  # every quote opens or closes a string
    brackets = outside.translate(None, _NOT_BRACKET)
    return max(0, max(accumulate(map(_LEVEL_STEP.__getitem__, brackets)), default=0))


def check_depth(data: bytes, limit: int = MAX_DEPTH) -> None:
    """Raise ``JSONDepthError`` if ``data`` nests deeper than ``limit``; call before ``json.loads``.

    Counting opening brackets (strings included) bounds the depth from above, so most messages
    pass without the full scan.
    """
    if data.count(b"[") + data.count(b"{") <= limit:
        return
    if json_depth(data) > limit:
        raise JSONDepthError(f"JSON nests deeper than {limit} levels: flatten the document (blindprune refuses deeper nesting)")


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


def refuse_duplicate_keys(error: Callable[[str], Exception]) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    """An ``object_pairs_hook`` that raises ``error(key)`` on a repeated key (``json`` keeps the last
    one silently, so a reader and a signer could see different values)."""

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, item in pairs:
            if key in out:
                raise error(key)
            out[key] = item
        return out

    return hook


def loads(data: bytes) -> Any:
    """Decode JSON bytes, refusing floats, NaN/Infinity, duplicate keys and nesting deeper than
    ``MAX_DEPTH`` (``JSONDepthError``, raised before the parser runs)."""

    no_dupes = refuse_duplicate_keys(lambda key: CanonicalJSONError(f"duplicate key {key!r}"))

    def no_float(text: str) -> Any:
        raise CanonicalJSONError(f"float {text} in canonical JSON")

    def no_constant(text: str) -> Any:
        raise CanonicalJSONError(f"{text} in canonical JSON")

    if not isinstance(data, (bytes, bytearray)):
        raise CanonicalJSONError(f"canonical JSON must be bytes, got {type(data).__name__}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CanonicalJSONError("not UTF-8") from exc
    check_depth(data)
    try:
        return json.loads(text, object_pairs_hook=no_dupes, parse_float=no_float, parse_constant=no_constant)
    except json.JSONDecodeError as exc:
        raise CanonicalJSONError(f"malformed JSON: {exc.msg} at {exc.pos}") from exc
