"""Each side's settings: a TOML file (``owner.toml`` / ``entity.toml``) merged under its flags.

One reader for both CLIs, so they agree on the rules: the file is ``--config PATH`` or the
default name in the working directory if present; settings live under a ``[owner]`` /
``[entity]`` table (or at top level); relative paths in the file are relative to the file; a flag
given on the command line wins; an unknown key is an error, not silently ignored.
"""

from __future__ import annotations

import argparse
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["SettingsError", "merge_settings"]


class SettingsError(ValueError):
    """A settings file is missing, malformed, or names an unknown setting."""


def merge_settings(args: argparse.Namespace, *, section: str, default_file: str, known: Iterable[str], path_keys: Iterable[str]) -> dict[str, Any]:
    """The file's settings under ``section`` overridden by every flag in ``args`` that was given."""
    known = set(known)
    path_keys = tuple(path_keys)
    config = getattr(args, "config", None)
    path = config or (Path(default_file) if Path(default_file).is_file() else None)
    data: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise SettingsError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"config file {path}: {exc}") from None
        data = dict(raw.get(section, raw))
        base = Path(path).resolve().parent
        for key in path_keys:
            if data.get(key) is not None:
                data[key] = base / str(data[key])
    for key in known:
        value = getattr(args, key, None)
        if value is not None:
            data[key] = value
    unknown = sorted(set(data) - known)
    if unknown:
        raise SettingsError(f"unknown setting(s) in {path or 'flags'}: {', '.join(unknown)}")
    for key in path_keys:
        if data.get(key) is not None:
            data[key] = Path(data[key])
    return data
