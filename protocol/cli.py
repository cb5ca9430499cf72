"""The one boundary every blindprune command crosses on its way out: one error line, one exit code.

pip-audit's shape (``_fatal``): library code raises its own exceptions; only here do they become
``PROG: error: <one line>`` on stderr and exit status 1 (0 success, 2 bad usage, which argparse
owns). Every command calls ``run_cli`` around its body, so the same failures read the same
everywhere: a ``ProtocolError`` or another domain error by its own one-line message, an
``OSError`` as the path and the system's reason (a full disk, a missing folder), Ctrl-C as
"interrupted". The line goes through ``display.printable``: it may quote the other party's text.
No command reads another's error text; what one process must learn from another travels as files
or JSON on stdout.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn

from .display import printable
from .errors import ProtocolError

__all__ = ["ERROR_LIMIT", "EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "describe_os_error", "error_line", "fatal", "run_cli"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

# An error line is one line a person reads; it may quote the other party's text, so it is bounded.
ERROR_LIMIT = 600


def error_line(message: str) -> str:
    """A failure as the one line a person reads: white space folded, hidden characters escaped, bounded."""
    return printable(" ".join(str(message).split()), limit=ERROR_LIMIT)


def fatal(prog: str, message: str, on_error: Callable[[str], None] | None = None) -> NoReturn:
    """Print ``PROG: error: MESSAGE`` (escaped, one line) to stderr and exit 1.

    ``on_error`` receives the same line first, for a command that also records its failure where
    another program reads it (a file, never this stderr text).
    """
    line = error_line(message)
    if on_error is not None:
        try:
            on_error(line)
        except OSError:
            pass  # the record is a convenience; the error line below is the verdict
    print(f"{prog}: error: {line}", file=sys.stderr)
    raise SystemExit(EXIT_FAILED)


def describe_os_error(exc: OSError) -> str:
    """An ``OSError`` as one line naming the path and the reason, with a hint for the common ones."""
    reason = exc.strerror or type(exc).__name__
    where = f" {exc.filename}" if exc.filename else ""
    hint = {
        28: "free some space and run again",  # ENOSPC
        13: "check the folder's owner and permissions",  # EACCES
        30: "choose a writable folder",  # EROFS
    }.get(exc.errno or 0)
    return f"cannot use{where}: {reason}" + (f" ({hint})" if hint else "")


def run_cli(
    prog: str, body: Callable[[], int], *, errors: tuple[type[BaseException], ...] = (), on_error: Callable[[str], None] | None = None
) -> int:
    """Run a command's ``body``; turn its expected failures into the one error line and exit 1.

    ``errors`` are the command's own domain exceptions (their ``str()`` is the line);
    ``ProtocolError``, ``OSError`` and ``MemoryError`` are always expected. Anything else is a
    bug and keeps its traceback, for the bug report.
    """
    expected: tuple[type[BaseException], ...] = (ProtocolError, *errors)
    try:
        return body()
    except KeyboardInterrupt:
        fatal(prog, "interrupted", on_error)
    except expected as exc:
        fatal(prog, str(exc), on_error)
    except OSError as exc:
        fatal(prog, describe_os_error(exc), on_error)
    except MemoryError:
        fatal(prog, "out of memory; use a smaller model or batch, or a machine with more memory", on_error)
