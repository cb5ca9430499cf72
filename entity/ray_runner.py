"""Pruning jobs as tasks on an existing Ray cluster (``entity.serve --ray ADDRESS``): scale-out on an
engine built for it, not a scheduler of our own.

A task gets only what pruning needs: the model artifact's files, the input specification, the
engine configuration and the sandbox limits. It runs the same sandboxed child process a local
worker runs (``entity.sandbox.run_pruning``: memory and time limits, filesystem confinement) on
whichever node Ray picks, one GPU per task when pruning runs on CUDA. The keys never leave the
entity's process: the result comes back as plain tensors, and the entity signs and seals it.
The nodes need this project importable at the entity's path (``PYTHONPATH`` is passed to tasks).
The engine's progress events come back while the task runs, through a small Ray queue the
entity drains, so an owner whose job prunes on the cluster sees its phase, layer and percent as
it would locally; a full queue drops events rather than slow the job.

The ``ray`` package is an optional extra (``pip install '.[ray]'``); without it ``--ray`` is a
one-line refusal at start.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from entity.sandbox import PruningFailed, PruningRefused, SandboxLimits

REPO = str(Path(__file__).resolve().parents[1])


def _drain(events: Any, progress: Callable[[dict], None]) -> None:
    try:
        batch = events.get_nowait_batch(events.qsize())
    except Exception:  # empty, or the queue's actor is gone: nothing to pass on
        return
    for event in batch:
        if isinstance(event, dict):
            progress(event)


class RayUnavailable(RuntimeError):
    """Ray is not installed, or its cluster cannot be reached (one line naming the fix)."""


PROGRESS_QUEUE = 256  # events held for the entity at most; more are dropped until it drains them
POLL_SECONDS = 0.5


def _prune_task(
    files: Mapping[str, bytes],
    spec_json: Mapping[str, Any],
    config: Mapping[str, Any],
    limits: SandboxLimits,
    threads: int | None,
    events: Any = None,
) -> tuple:
    """What runs on a Ray worker: the sandboxed pruning child; its failures come back as values."""
    from entity.sandbox import run_pruning

    def progress(event: dict) -> None:
        try:
            events.put_nowait(event)
        except Exception:  # full (the entity is behind) or gone: progress is best effort
            pass

    try:
        return ("ok", run_pruning(files, spec_json, config, progress if events is not None else None, limits, torch_threads=threads))
    except PruningRefused as exc:
        return ("refused", str(exc))
    except PruningFailed as exc:
        return ("failed", exc.reason, exc.detail)


def check_ray() -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        raise RayUnavailable("--ray needs the ray package: pip install '.[ray]' (or pip install 'ray>=2.60')") from None


class RayRunner:
    """A drop-in for ``run_pruning`` that runs each job as a Ray task on the cluster at ``address``."""

    def __init__(self, address: str, *, gpus_per_job: float = 0.0, cpus_per_job: float = 1.0):
        check_ray()
        import ray

        try:
            ray.init(
                address=address,
                ignore_reinit_error=True,
                log_to_driver=False,
                runtime_env={"env_vars": {"PYTHONPATH": REPO, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}},
            )
        except Exception as exc:
            raise RayUnavailable(f"cannot join the Ray cluster at {address} ({type(exc).__name__}); is `ray start --head` running there?") from None
        self._ray = ray
        self._task = ray.remote(_prune_task).options(num_gpus=gpus_per_job, num_cpus=cpus_per_job, max_retries=0)

    def __call__(
        self,
        files: Mapping[str, bytes],
        spec_json: Mapping[str, Any],
        config: Mapping[str, Any],
        progress: Callable[[dict], None] | None = None,
        limits: SandboxLimits = SandboxLimits(),
        on_confined: Callable[[str], None] | None = None,
        torch_threads: int | None = None,
    ) -> Any:
        events = None
        if progress is not None:
            from ray.util.queue import Queue

            progress({"event": "ray-task", "percent": 0})
            events = Queue(maxsize=PROGRESS_QUEUE, actor_options={"num_cpus": 0})
        ref = self._task.remote(dict(files), dict(spec_json), dict(config), limits, torch_threads, events)
        try:
            outcome = self._wait(ref, limits.seconds + 120, events, progress)
        except TimeoutError:
            self._ray.cancel(ref, force=True)
            raise PruningFailed(f"pruning ran past this entity's limit of {limits.seconds:g} seconds", "the Ray task did not return") from None
        except Exception as exc:  # a lost node, a worker killed by Ray's memory monitor...
            raise PruningFailed("the Ray task running this job failed", f"{type(exc).__name__}: {exc}") from None
        finally:
            if events is not None:
                events.shutdown(force=True)
        if outcome[0] == "refused":
            raise PruningRefused(outcome[1])
        if outcome[0] == "failed":
            raise PruningFailed(outcome[1], outcome[2])
        return outcome[1]

    def _wait(self, ref: Any, seconds: float, events: Any, progress: Callable[[dict], None] | None) -> tuple:
        """The task's outcome, passing its progress events on while it runs; TimeoutError past ``seconds``."""
        deadline = time.monotonic() + seconds
        while True:
            ready, _ = self._ray.wait([ref], timeout=POLL_SECONDS)
            if events is not None and progress is not None:
                _drain(events, progress)
            if ready:
                return tuple(self._ray.get(ref))
            if time.monotonic() > deadline:
                raise TimeoutError

    def cluster_resources(self) -> dict[str, float]:
        return dict(self._ray.cluster_resources())

    def close(self) -> None:
        self._ray.shutdown()
