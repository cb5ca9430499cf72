"""Bounded pulls: the loop asks the SuperLink for replies without ever waiting on one owner.

flwr's ``Grid.pull_messages`` fetches each reply's objects with retries for minutes when a
SuperNode stopped halfway through pushing one (a goodbye cut short, say), and the call blocks
for all that time. Here each pull runs on a small thread pool; a step waits for it only briefly.
A pull still running past ``stall_seconds`` is left to finish on its own thread, its message ids
are kept out of new pulls until it does, and the rest are pulled anew, so one owner's broken
upload delays that owner's replies only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

PullFn = Callable[[list[str]], Iterable[Any]]


@dataclass
class _Batch:
    ids: frozenset[str]
    future: Future
    started: float = field(default_factory=time.monotonic)
    reported: bool = False


class Puller:
    """Pulls replies for pending message ids on up to ``threads`` threads, one batch each."""

    def __init__(self, pull: PullFn, *, threads: int = 3, wait_seconds: float = 0.2, stall_seconds: float = 10.0):
        self._pull = pull
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pull")
        self._threads = threads
        self.wait_seconds = wait_seconds
        self.stall_seconds = stall_seconds
        self._batches: list[_Batch] = []

    def _fetch(self, ids: list[str]) -> list[Any]:
        return list(self._pull(ids))

    def in_flight(self) -> frozenset[str]:
        return frozenset().union(*(b.ids for b in self._batches)) if self._batches else frozenset()

    def step(self, pending: Iterable[str], on_stall: Callable[[int, float], None] | None = None) -> tuple[list[Any], list[BaseException]]:
        """Replies that have arrived, and the errors of pulls that failed (the SuperLink is struggling).

        Starts one pull of the ``pending`` ids no running pull covers (unless every thread is held
        by a stalled pull), waits at most ``wait_seconds`` for the running ones, and collects those
        that finished. ``on_stall(count, seconds)`` hears of each pull that runs past the bound.
        """
        fresh = sorted(set(pending) - self.in_flight())
        now = time.monotonic()
        running = [b for b in self._batches if not b.future.done() and now - b.started < self.stall_seconds]
        if fresh and not running and len(self._batches) < self._threads:
            self._batches.append(_Batch(frozenset(fresh), self._pool.submit(self._fetch, fresh)))
        deadline = time.monotonic() + self.wait_seconds
        for batch in self._batches:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.future.exception(timeout=remaining)
            except TimeoutError:
                pass
        replies: list[Any] = []
        errors: list[BaseException] = []
        for batch in list(self._batches):
            if batch.future.done():
                self._batches.remove(batch)
                error = batch.future.exception()
                if error is not None:
                    errors.append(error)
                else:
                    replies.extend(batch.future.result())
            elif not batch.reported and time.monotonic() - batch.started >= self.stall_seconds:
                batch.reported = True
                if on_stall is not None:
                    on_stall(len(batch.ids), time.monotonic() - batch.started)
        return replies, errors

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
