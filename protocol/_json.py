"""JSON read from the other party, or from a file someone may have edited: bounded before parsing.

``loads`` (``canonical.loads``) is the one decoder for such bytes inside ``protocol``: canonical
(no floats, NaN or duplicate keys) and at most ``MAX_DEPTH`` levels deep, refused with
``JSONDepthError`` by a scan that runs before the parser, so ``[[[[...`` is a clean one-line
refusal and never a ``RecursionError``. Every parser in ``protocol`` catches
``CanonicalJSONError``, of which ``JSONDepthError`` is a kind. Parsers of non-canonical JSON (a
safetensors header, an exported program, the audit log's fast path) call ``check_depth`` before
``json.loads``.
"""
from __future__ import annotations

from .canonical import MAX_DEPTH, CanonicalJSONError, JSONDepthError, check_depth, json_depth, loads

__all__ = ["MAX_DEPTH", "CanonicalJSONError", "JSONDepthError", "check_depth", "json_depth", "loads"]
