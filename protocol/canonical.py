"""Canonical JSON, the one byte encoding of everything signed or hashed (see ``_wire.canonical``).

The encoding is part of the contract, so both parties (and their tests) write and read it through
this module; the parser and its depth scan live in the private wire package.
"""

from __future__ import annotations

from ._wire.canonical import MAX_DEPTH, CanonicalJSONError, JSONDepthError, check_depth, dumps, json_depth, loads

__all__ = ["MAX_DEPTH", "CanonicalJSONError", "JSONDepthError", "check_depth", "dumps", "json_depth", "loads"]
