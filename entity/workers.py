"""The entity's pruning workers: jobs run beside the message loop, never inside it.

Each job is one call (``run(progress)`` -> sealed result and summary) that supervises a pruning
child process (``entity.sandbox``): the pruning itself runs in processes, ``workers`` of them at
a time, and a job's keys, signing and sealing stay in the ServerApp's process. The loop submits a
job and goes on moving messages; it polls for finished jobs and reads each job's place (queue
position with an estimate, or the engine's latest progress event) for the owners' status messages.
The queue is bounded: past ``max_queued`` waiting jobs a submission is refused at once.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

Progress = Callable[[dict], None]
JobRun = Callable[[Progress], Any]


class QueueFull(Exception):
    """Every worker is busy and the queue holds ``max_queued`` jobs already."""


def default_workers(cuda_devices: int = 0, cores: int | None = None) -> int:
    """One worker per GPU when CUDA is there, else one per core (each job then prunes on one thread)."""
    if cuda_devices > 0:
        return cuda_devices
    return max(1, cores if cores is not None else (os.cpu_count() or 1))


@dataclass(frozen=True)
class Place:
    """Where a job stands: queued (1-based position, estimated seconds to its start) or running."""

    state: str
    position: int | None = None
    estimate_s: int | None = None
    progress: dict = field(default_factory=dict)
    elapsed_s: int = 0


class WorkerPool:
    """A bounded queue in front of ``workers`` supervising threads, one pruning process each."""

    def __init__(self, workers: int, max_queued: int):
        if workers < 1 or max_queued < 0:
            raise ValueError("workers must be at least 1 and max_queued at least 0")
        self.workers = workers
        self.max_queued = max_queued
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prune-worker")
        self._lock = threading.Lock()
        self._queued: list[str] = []
        self._running: dict[str, float] = {}
        self._progress: dict[str, dict] = {}
        self._futures: dict[str, Future] = {}
        self._durations: deque[float] = deque(maxlen=16)

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._queued)

    def full(self) -> bool:
        """No idle worker and ``max_queued`` jobs waiting: the next submission would be refused."""
        with self._lock:
            return len(self._running) + len(self._queued) >= self.workers and len(self._queued) >= self.max_queued

    def submit(self, job_id: str, run: JobRun) -> int:
        """Queue a job; its 1-based queue position (0: it starts now). ``QueueFull`` past the bound."""
        with self._lock:
            idle = self.workers - len(self._running) - len(self._queued)
            if idle <= 0 and len(self._queued) >= self.max_queued:
                raise QueueFull(f"the entity's queue is full ({len(self._queued)} jobs waiting)")
            self._queued.append(job_id)
            position = 0 if idle > 0 else len(self._queued)
        self._futures[job_id] = self._executor.submit(self._work, job_id, run)
        return position

    def _work(self, job_id: str, run: JobRun) -> Any:
        with self._lock:
            self._queued.remove(job_id)
            self._running[job_id] = time.monotonic()

        def progress(event: dict) -> None:
            self._progress[job_id] = dict(event)

        try:
            return run(progress)
        finally:
            with self._lock:
                self._durations.append(time.monotonic() - self._running.pop(job_id))
                self._progress.pop(job_id, None)

    def finished(self) -> list[tuple[str, Future]]:
        """Jobs whose run has returned or raised since the last call (each returned once)."""
        done = [(job_id, future) for job_id, future in self._futures.items() if future.done()]
        for job_id, _ in done:
            del self._futures[job_id]
        return done

    def place(self, job_id: str) -> Place | None:
        with self._lock:
            if job_id in self._running:
                return Place("pruning", progress=dict(self._progress.get(job_id, {})), elapsed_s=int(time.monotonic() - self._running[job_id]))
            if job_id not in self._queued:
                return None
            position = self._queued.index(job_id) + 1
            estimate = None
            if self._durations:
                mean = sum(self._durations) / len(self._durations)
                estimate = int(math.ceil(position / self.workers) * mean)
            return Place("queued", position=position, estimate_s=estimate)

    def shutdown(self) -> None:
        """Stop taking jobs; running ones finish in their processes (the service is going down)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
