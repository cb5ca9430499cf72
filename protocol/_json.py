"""``canonical.loads`` for untrusted bytes: deep nesting becomes the clean error, not a crash.

``json`` raises ``RecursionError`` on input like ``[[[[...`` nested deeper than the interpreter's
recursion limit; every parser in ``protocol`` catches ``CanonicalJSONError``, so the one is
turned into the other here.
"""
from __future__ import annotations

from typing import Any

from .canonical import CanonicalJSONError
from .canonical import loads as _loads


def loads(data: bytes) -> Any:
    try:
        return _loads(data)
    except RecursionError as exc:
        raise CanonicalJSONError("JSON nested too deeply") from exc
