"""Showing the other party's text: every control or format character made visible, length bounded.

A refusal reason, a report field or an error message built from what the entity sent is text the
entity chose. Printed raw, ``"\\x1b[2J"`` clears the owner's terminal, an OSC sequence retitles it
or plants a link, a bidi override (U+202E) makes ``"...rate 8x"`` read as something else, and a
megabyte of it buries the line that matters. ``printable`` turns every such character into a
visible escape (``\\x1b``, ``\\u202e``) and cuts the text at ``limit`` characters, so what reaches
a terminal, a log line or a table cell is one bounded line that says exactly what was sent.

It does not neutralise rich markup (``[red]``): that belongs to the CLI layer, which prints
through ``rich.markup.escape`` or a ``rich.text.Text`` (no markup interpretation).
"""

from __future__ import annotations

import unicodedata

__all__ = ["TRUNCATED", "printable"]

TRUNCATED = "… (truncated)"

# Control (C0, DEL, C1), format (bidi overrides and isolates, zero-width characters, soft
# hyphen...), surrogates, private use, unassigned, and the line/paragraph separators.
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
_SHORT = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(char: str) -> str:
    if char in _SHORT:
        return _SHORT[char]
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text: object, limit: int = 200) -> str:
    """``text`` (any object, via ``str``) with hidden characters escaped, at most ``limit`` characters.

    Longer output is cut at an escape boundary and ends with ``TRUNCATED`` (so the result holds at
    most ``limit + len(TRUNCATED)`` characters). Applying it twice with the same limit changes
    nothing (backslashes are left as they are), so a message escaped where it was built can be
    escaped again where it is printed.
    """
    raw = text if isinstance(text, str) else str(text)
    marked = raw.endswith(TRUNCATED)
    if marked:  # already cut once: keep the one marker, so that escaping twice changes nothing
        raw = raw[: -len(TRUNCATED)]
    out: list[str] = []
    length = 0
    for char in raw:
        piece = _escape(char) if unicodedata.category(char) in _HIDDEN_CATEGORIES else char
        if length + len(piece) > limit:
            out.append(TRUNCATED)
            return "".join(out)
        out.append(piece)
        length += len(piece)
    if marked:
        out.append(TRUNCATED)
    return "".join(out)
