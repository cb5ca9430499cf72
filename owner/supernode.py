"""``python -m owner.supernode``: flwr 1.41's SuperNode, polling an idle SuperLink every half second.

Why this exists: the stock ``flower-supernode`` sleeps 3 s after every poll that finds no
message (``flwr.supernode.start_client_internal``, its only idle wait). Every message of a job
(the offer, the admission, each status, the result, the finish) waits for the owner's next poll,
so the owner hears of the entity's offer up to 3 s late, and a job of six exchanges spends the
better part of 20 s asleep. This launcher runs the very same SuperNode (flwr's own argument
parsing and loop, every flag as ``flower-supernode`` takes it) with that module's clock
replaced by one whose sleeps last at most :data:`IDLE_POLL_SECONDS`. The SuperNode's other
waits in that module are already half a second, so they are unchanged.

A poll is one small HTTP request to the entity's SuperLink; two a second per owner is nothing
next to the model it sends. flwr is pinned, and ``tests/owner/test_owner_supernode.py`` checks
that the module still sleeps through its clock (a new flwr that did not would make this a
silent no-op, not a failure).
"""

from __future__ import annotations

import sys
import time
from types import ModuleType
from typing import Any

IDLE_POLL_SECONDS = 0.5


class _BriefClock:
    """``time`` as ``start_client_internal`` uses it, with every sleep cut to the idle poll."""

    def __init__(self, real: ModuleType, most: float) -> None:
        self._real = real
        self._most = most

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def sleep(self, seconds: float) -> None:
        self._real.sleep(min(seconds, self._most))


def install(most: float = IDLE_POLL_SECONDS) -> ModuleType:
    """Give the SuperNode loop the brief clock; returns the patched module (for the tests)."""
    from flwr.supernode import start_client_internal as loop

    if getattr(loop, "time", None) is not time and not isinstance(getattr(loop, "time", None), _BriefClock):
        raise RuntimeError("flwr.supernode.start_client_internal no longer sleeps through the time module: check the flwr pin")
    loop.time = _BriefClock(time, most)  # type: ignore[assignment]
    return loop


def main() -> int:
    from flwr.supernode.cli import flower_supernode

    install()
    sys.argv[0] = "flower-supernode"
    flower_supernode()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
