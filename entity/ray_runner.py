"""Pruning jobs as tasks on an existing Ray cluster (``entity.serve --ray ADDRESS``): scale-out on an
engine built for it, not a scheduler of our own.

A task gets only what pruning needs: the model artifact's files, the input specification, the
engine configuration and the sandbox limits. It runs the same sandboxed child process a local
worker runs (``entity.sandbox.run_pruning``: memory and time limits, filesystem confinement) on
whichever node Ray picks, one GPU per task when pruning runs on CUDA. The keys never leave the
entity's process: the result comes back as plain tensors, and the entity signs and seals it.
The nodes need this project importable at the entity's path (``PYTHONPATH`` is passed to tasks).

The ``ray`` package is an optional extra (``pip install '.[ray]'``); without it ``--ray`` is a
one-line refusal at start.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from entity.sandbox import PruningFailed, PruningRefused, SandboxLimits

REPO = str(Path(__file__).resolve().parents[1])


class RayUnavailable(RuntimeError):
    """Ray is not installed, or its cluster cannot be reached (one line naming the fix)."""


def _prune_task(
    files: Mapping[str, bytes], spec_json: Mapping[str, Any], config: Mapping[str, Any], limits: SandboxLimits, threads: int | None
) -> tuple:
    """What runs on a Ray worker: the sandboxed pruning child; its failures come back as values."""
    from entity.sandbox import run_pruning

    try:
        return ("ok", run_pruning(files, spec_json, config, None, limits, torch_threads=threads))
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
        if progress is not None:
            progress({"event": "ray-task", "percent": 0})
        ref = self._task.remote(dict(files), dict(spec_json), dict(config), limits, torch_threads)
        try:
            outcome = self._ray.get(ref, timeout=limits.seconds + 120)
        except self._ray.exceptions.GetTimeoutError:
            self._ray.cancel(ref, force=True)
            raise PruningFailed(f"pruning ran past this entity's limit of {limits.seconds:g} seconds", "the Ray task did not return") from None
        except Exception as exc:  # a lost node, a worker killed by Ray's memory monitor...
            raise PruningFailed("the Ray task running this job failed", f"{type(exc).__name__}: {exc}") from None
        if outcome[0] == "refused":
            raise PruningRefused(outcome[1])
        if outcome[0] == "failed":
            raise PruningFailed(outcome[1], outcome[2])
        return outcome[1]

    def cluster_resources(self) -> dict[str, float]:
        return dict(self._ray.cluster_resources())

    def close(self) -> None:
        self._ray.shutdown()
