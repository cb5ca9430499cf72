"""Pruning jobs as Ray tasks: a local Ray head on 127.0.0.1, two jobs through the entity's worker pool.

The entity side is real (keys, journal-free ``EntityJobs.prune``, sealing); each job's pruning runs
as a task on the Ray cluster, which starts the same sandboxed child a local worker would. The
owner's session opens and checks both results, so what came back through Ray is a valid result.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch

from entity.jobs import EntityJobs, EntitySettings, EventLog
from entity.workers import WorkerPool
from owner.session import OwnerSession
from protocol.audit import AuditLog
from protocol.flower_processes import free_port
from protocol.keys import init_identity
from protocol.replay import NonceStore
from protocol.spec import InputSpec, PruneRequest
from tests.helpers import export_eval, sealed_request

pytestmark = pytest.mark.integration
ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install '.[ray]')")

SPEC = InputSpec((1, 12, 12), (0.5,), (0.25,))


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 3),
    )


@pytest.fixture()
def ray_head(tmp_path):
    binary = shutil.which("ray", path=os.path.dirname(os.sys.executable)) or shutil.which("ray")
    if binary is None:
        pytest.skip("the ray command is not installed")
    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_DISABLE_DOCKER_CPU_WARNING": "1"}
    temp = Path(tempfile.mkdtemp(prefix="bpray-", dir="/tmp"))  # Ray's socket paths must stay under 107 bytes
    start = [binary, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2"]
    start += ["--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", str(temp)]
    done = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"a local Ray head would not start: {done.stderr[-2000:]}"
    try:
        yield f"127.0.0.1:{port}"
    finally:
        ray.shutdown()
        subprocess.run([binary, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def test_two_jobs_run_as_ray_tasks_and_come_back_as_valid_results(tmp_path, ray_head):
    from entity.ray_runner import RayRunner

    entity = init_identity(tmp_path / "entity", "entity", name="entity")
    owner = init_identity(tmp_path / "owner", "owner", name="owner")
    registry = {owner.card.fingerprint: owner.card}
    jobs = EntityJobs(entity, lambda: registry, NonceStore(tmp_path / "n.jsonl"), EventLog(tmp_path / "e.jsonl"), EntitySettings(recipe="oneshot"))
    jobs.runner = RayRunner(ray_head)
    program = export_eval(_model(), (1, 12, 12))
    pool = WorkerPool(2, 4)
    sessions = {}
    places: dict[str, list[dict]] = {}
    for index in range(2):
        session = OwnerSession(owner, entity.card, program, SPEC, PruneRequest(4.0), AuditLog.open(tmp_path / f"audit{index}.jsonl", owner))
        offer = jobs.make_offer(node_id=index)
        request = sealed_request(session, jobs, offer)
        opened = jobs.open_request(offer, request)
        seen: list[dict] = []
        places[offer.job_id] = seen

        def run(progress, offer=offer, opened=opened, request=request, seen=seen):
            return jobs.prune(offer, opened, request, lambda event: (seen.append(event), progress(event)))

        pool.submit(offer.job_id, run)
        sessions[offer.job_id] = session
    finished = []
    deadline = time.monotonic() + 240
    while len(finished) < 2 and time.monotonic() < deadline:
        finished += pool.finished()
        time.sleep(0.2)
    assert len(finished) == 2, "the Ray tasks did not finish in time"
    for job_id, future in finished:
        blob, summary = future.result()
        assert summary["job_id"] == job_id
        session = sessions[job_id]
        session.receive_result(blob)
        assert session.outcome is not None and session.outcome.achieved_rate.startswith("4.0")
    # The engine's progress came back from the cluster while each task ran, as it does locally.
    for job_id, events in places.items():
        assert any(event.get("event") == "layer" for event in events), (job_id, events)
    # The tasks ran on the cluster, not in this process: Ray saw two finished tasks.
    assert ray.is_initialized()
    pool.shutdown()
