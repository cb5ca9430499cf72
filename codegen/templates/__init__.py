"""The fixed text of a generated library (C, Makefile, README) as template files, and their renderer.

Why files rather than Python strings: the C and Make text then reads, diffs and greps as C and
Make, and a new vector flavour is one more prelude file next to ``gnu_vector.c.in`` (like
XNNPACK's one ``.c.in`` per ISA). Placeholders are ``@NAME@`` (autoconf style, so neither C's
braces nor Make's ``$(CC)`` need escaping; ``string.Template`` would trip over both). A line that
holds only a placeholder takes a multi-line value and disappears when the value is empty.
Rendering is strict: a placeholder without a value, or a value without a placeholder, is an error,
so a renamed placeholder cannot silently leave ``@X@`` in the C.

The files ship as package data (this folder is a package, so ``"*.in"`` in pyproject's
``[tool.setuptools.package-data]`` covers it).
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

_PLACEHOLDER = re.compile(r"@([A-Z][A-Z0-9_]*)@")


@cache
def template(name: str) -> str:
    """The text of one template file of this package (read once per process)."""
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


def render(name: str, **values: object) -> str:
    """Template ``name`` with every ``@KEY@`` replaced by ``str(values[KEY])``."""
    text = template(name)
    wanted = set(_PLACEHOLDER.findall(text))
    given = set(values)
    if wanted != given:
        missing, unused = sorted(wanted - given), sorted(given - wanted)
        raise KeyError(f"template {name}: missing {missing}, unused {unused}")
    out: list[str] = []
    for line in text.splitlines(keepends=True):
        whole = _PLACEHOLDER.fullmatch(line.rstrip("\n"))
        if whole:  # a block: its own lines, none when empty
            value = str(values[whole[1]])
            if value:
                out.append(value if value.endswith("\n") else value + "\n")
            continue
        out.append(_PLACEHOLDER.sub(lambda m: str(values[m[1]]), line))
    return "".join(out)
