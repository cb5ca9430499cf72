"""The entity's Flower ServerApp: a long-lived loop that gives every connecting owner its own job.

Thin by design: it builds the entity's job handler, journal and worker pool from the settings
``entity.serve`` wrote, recovers what the journal holds unfinished, and steps the message loop
(``entity.job_loop``) for ever; ``entity.serve`` stops it. The loop pushes messages and pulls
replies itself (rather than ``send_and_receive``, which polls every 3 s).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from entity.job_loop import JobLoop, LoopTiming, threads_per_job
from entity.jobs import EntityJobs, EventLog
from entity.journal import JobJournal
from entity.sandbox import keep_spares
from entity.settings import read_settings
from entity.workers import WorkerPool
from protocol.keys import load_identity, load_registry
from protocol.replay import NonceStore

app = ServerApp()


def entity_from_config(run_config: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> EntityJobs:
    """Build the entity's job handler from the settings file ``entity.serve`` names in the environment.

    The file is ``EntitySettings.to_json``, read back strictly (``entity.settings.read_settings``):
    every operator setting, the sandbox limits included, arrives as the same value ``entity.serve``
    checked.

    Not from ``run_config``: that is the FAB's configuration, which every owner receives, so it
    must carry nothing about the entity's host. One that carries anything is refused, so that a
    path can never slip back into the bundle unnoticed.
    """
    if run_config:
        raise ValueError(f"the entity FAB must carry no run configuration (it reaches every owner); got {sorted(run_config)}")
    settings = read_settings(os.environ if environ is None else environ)
    owners = settings.owners_dir
    return EntityJobs(
        identity=load_identity(settings.home / "keys"),
        registry=lambda: load_registry(owners),
        nonces=NonceStore(settings.home / "nonces.jsonl"),
        events=EventLog(settings.home / "events.jsonl"),
        settings=settings,
    )


def _cuda_devices(device: str) -> int:
    """GPUs pruning may use: none for ``cpu``; for ``auto`` and ``cuda``, the ones torch sees."""
    if device == "cpu":
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _ray_has_gpus(address: str) -> bool:
    """Whether the Ray cluster at ``address`` has GPUs (``--device auto`` then asks one per job)."""
    from entity.ray_runner import RayRunner

    return RayRunner(address).cluster_resources().get("GPU", 0) > 0


@app.main()
def main(grid: Grid, context: Context) -> None:
    jobs = entity_from_config(dict(context.run_config))
    settings = jobs.settings
    workers = settings.worker_count(_cuda_devices(settings.device))
    if settings.ray:
        from entity.ray_runner import RayRunner

        cuda = settings.device.startswith("cuda") or (settings.device == "auto" and _ray_has_gpus(settings.ray))
        runner = RayRunner(settings.ray, gpus_per_job=1.0 if cuda else 0.0)
        jobs.runner = runner
        if not settings.workers:  # as many jobs at once as the cluster has GPUs (with CUDA) or CPUs
            resources = runner.cluster_resources()
            workers = max(1, int(resources.get("GPU" if cuda else "CPU", 1)))
    if not settings.ray:  # Ray tasks start their own children, on the cluster's machines
        keep_spares(workers, settings.sandbox)
    loop = JobLoop(
        grid,
        jobs,
        jobs.identity.card.to_bytes(),
        LoopTiming(status_seconds=settings.status_interval),
        pool=WorkerPool(workers, settings.max_queued),
        journal=JobJournal(settings.home / "jobs.db", settings.home / "jobs"),
        threads_per_job=threads_per_job(workers),
    )
    try:
        owners: int | str = len(jobs.registry())
    except Exception as exc:  # read afresh for every request: the operator can still fix it
        owners = f"unreadable ({type(exc).__name__})"
    loop.log("service-started", entity=jobs.identity.card.fingerprint, owners=owners, workers=workers, max_queued=settings.max_queued)
    recovered = loop.recover()
    try:
        jobs.events.close_abandoned(keep=recovered)
    except OSError as exc:  # the log is for the operator: the service still serves
        print(f"entity: cannot close the jobs an earlier run left open: {exc}", file=sys.stderr)
    while True:
        loop.step()
        time.sleep(loop.delay())
