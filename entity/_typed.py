"""One type check for settings that arrive as plain values (TOML, flags, JSON across a process).

The entity's settings (``entity.settings``) and each pruning recipe's options
(``entity.pruning.options``) are frozen dataclasses filled from values an operator typed or a
file another process wrote. Both check every value against the field's annotation here, so a
mistyped value is refused with one line naming the setting, instead of failing much later deep
inside a job (``"8"`` as a memory limit, ``true`` as an iteration count).

Only the types such settings use are understood: ``bool``, ``int``, ``float`` (an ``int`` is
accepted), ``str``, ``Path``, unions with ``None``, and ``dict``/``Mapping`` with ``str`` keys.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_args, get_origin

# A value that is one JSON scalar (what a recipe option may be: it crosses processes as JSON).
Scalar = bool | int | float | str

_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "text", Path: "a path"}


def describe(hint: Any) -> str:
    """How a type reads in an error message ("an integer or none")."""
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("none" if arg is type(None) else describe(arg) for arg in get_args(hint))
    if origin in (dict, Mapping):
        return "a table"
    return _KINDS.get(hint, getattr(hint, "__name__", str(hint)))


def check_value(where: str, value: Any, hint: Any) -> Any:
    """``value`` unchanged if it has the annotated type ``hint``; otherwise ``TypeError`` naming ``where``.

    ``bool`` is not accepted where a number is meant (Python counts it as an ``int``; an operator
    never means ``true`` as 1).
    """
    if not _fits(value, hint):
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise TypeError(f"{where} must be {describe(hint)}, got {shown}")
    return value


def _fits(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    if hint is None or hint is type(None):
        return value is None
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in get_args(hint))
    if origin in (dict, Mapping):
        key_hint, value_hint = get_args(hint) or (str, Any)
        return isinstance(value, Mapping) and all(_fits(k, key_hint) and _fits(v, value_hint) for k, v in value.items())
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    raise TypeError(f"settings of type {hint!r} are not supported")  # a programming error, not a user's


def is_path(hint: Any) -> bool:
    """Whether a setting of this type holds a path (``Path`` or ``Path | None``)."""
    if hint is Path:
        return True
    return get_origin(hint) in (typing.Union, types.UnionType) and Path in get_args(hint)
