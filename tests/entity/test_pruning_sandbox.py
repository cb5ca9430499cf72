"""Pruning runs in a child process with memory and time limits, and its failures say nothing.

Each test that starts a child pays its start-up (importing torch: a few seconds), so the models
are tiny and the recipe is one-shot.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import pytest
import torch

from entity import sandbox
from entity.jobs import EntityJobs, EntitySettings, EventLog, JobError
from entity.sandbox import GiB, PruningFailed, PruningRefused, SandboxLimits, child_environment, run_pruning
from protocol import canonical
from protocol.artifact import PROGRAM_FILE, dump_tensors, program_to_files
from protocol.audit import AuditLog
from protocol.errors import ArtifactError
from protocol.keys import init_identity
from protocol.replay import NonceStore
from protocol.spec import InputSpec, PruneRequest
from tests.helpers import export_eval, sealed_request

SPEC = InputSpec((1, 12, 12), (0.5,), (0.25,))
ONESHOT = {"rate": 4.0, "recipe": "oneshot"}


def _model(flat: bool = False) -> torch.nn.Module:
    """Two 3x3 convs (the second prunable) and a head: pooled, or flattened (fixes the input size)."""
    torch.manual_seed(0)
    head = (
        [torch.nn.Flatten(), torch.nn.Linear(8 * 12 * 12, 3)] if flat else [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3)]
    )
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.ReLU(),
        *head,
    ).eval()


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    return program_to_files(export_eval(_model(), (1, 12, 12)))


def _sandbox_children() -> list[int]:
    """Pids of this process's children running ``entity.sandbox``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == os.getpid() and b"entity.sandbox" in cmdline:
            found.append(int(entry.name))
    return found


def test_pruning_runs_in_a_child_process_and_its_progress_reaches_the_parent(files, monkeypatch):
    # The child that ran the job is the one the pool handed out (a /proc scan from the progress
    # callback races the child: a tiny job can finish, and exit, before its events are read).
    events, children = [], []
    take = sandbox.SPARES.take

    def recording_take(memory_bytes: int):
        process = take(memory_bytes)
        children.append((process.pid, list(process.args)))
        return process

    monkeypatch.setattr(sandbox.SPARES, "take", recording_take)
    result = run_pruning(files, SPEC.to_json(), ONESHOT, events.append)
    assert [e["event"] for e in events][0] == "start" and events[-1]["event"] == "done"
    assert any(e["event"] == "layer" for e in events)
    assert len(children) == 1
    pid, args = children[0]
    assert pid != os.getpid() and "entity.sandbox" in args
    assert result.report["achieved_rate"].startswith("4.0")
    assert set(result.state_dict) == set(torch.export.export(_model(), (torch.zeros(1, 1, 12, 12),)).state_dict)
    mask = result.masks["2.weight"]
    assert mask.dtype == torch.bool and torch.count_nonzero(result.state_dict["2.weight"][~mask]) == 0
    assert not _sandbox_children()


def test_a_spare_child_started_ahead_prunes_the_next_job_and_is_replaced(files):
    spares = sandbox.SpareChildren()
    spares.keep(1)
    limits = SandboxLimits()
    spares.refill(int(limits.memory_bytes))
    [(_, spare)] = spares._ready
    time.sleep(0.5)
    assert spare.poll() is None, "a spare waits for its job"
    original, sandbox.SPARES = sandbox.SPARES, spares
    try:
        first = run_pruning(files, SPEC.to_json(), ONESHOT)
        assert spares.taken == 1 and spare.poll() is not None, "the spare pruned the job, then exited"
        [(_, replacement)] = spares._ready
        assert replacement.pid != spare.pid
        second = run_pruning(files, SPEC.to_json(), ONESHOT)
        assert spares.taken == 2
    finally:
        sandbox.SPARES = original
        spares.close()
    assert all(torch.equal(first.state_dict[k], second.state_dict[k]) for k in first.state_dict)
    assert not _sandbox_children(), "closing kills the spares"


def test_a_spare_for_another_memory_limit_is_not_used(files):
    spares = sandbox.SpareChildren()
    spares.keep(1)
    spares.refill(3 * sandbox.GiB)
    original, sandbox.SPARES = sandbox.SPARES, spares
    try:
        run_pruning(files, SPEC.to_json(), ONESHOT, limits=SandboxLimits(memory_bytes=4 * sandbox.GiB))
        assert spares.taken == 0
        assert [memory for memory, _ in spares._ready] == [4 * sandbox.GiB]
    finally:
        sandbox.SPARES = original
        spares.close()
    assert not _sandbox_children()


def test_child_environment_carries_none_of_the_entitys_settings(monkeypatch):
    monkeypatch.setenv("BLINDPRUNE_ENTITY_KEYS", "/home/entity/keys")
    monkeypatch.setenv("FLWR_HOME", "/home/entity/.flwr")
    monkeypatch.setenv("PATH", "/usr/bin")
    env = child_environment()
    assert "BLINDPRUNE_ENTITY_KEYS" not in env and "FLWR_HOME" not in env
    assert env["PATH"] == "/usr/bin" and Path(env["PYTHONPATH"], "entity", "sandbox.py").is_file()
    assert set(env) <= set(sandbox._ENV_KEPT) | {"PYTHONPATH", "PYTHONDONTWRITEBYTECODE"}


def test_refusal_we_wrote_comes_back_as_is(files):
    with pytest.raises(PruningRefused, match="no prunable 3x3 convolution"):
        run_pruning(files, SPEC.to_json(), {**ONESHOT, "skip_layers": ["2"]})


def test_child_over_the_memory_limit_fails_with_a_generic_reason():
    # 64 evaluation images of 1x1024x1024 are 256 MiB; the first conv's output on them is 2 GiB.
    big = program_to_files(export_eval(_model(), (1, 1024, 1024)))
    spec = InputSpec((1, 1024, 1024), (0.5,), (0.25,))
    started = time.monotonic()
    with pytest.raises(PruningFailed, match=r"needed more memory than this entity allows \(2 GiB\)") as info:
        run_pruning(big, spec.to_json(), ONESHOT, limits=SandboxLimits(memory_bytes=2 * GiB))
    assert "allocate" in info.value.detail  # the allocator's text is kept for the event log
    assert time.monotonic() - started < 60


def test_child_past_the_time_limit_is_killed(files):
    started = time.monotonic()
    with pytest.raises(PruningFailed, match="ran past this entity's limit of 1 seconds"):
        run_pruning(files, SPEC.to_json(), ONESHOT, limits=SandboxLimits(seconds=1))
    assert time.monotonic() - started < 10
    assert not _sandbox_children()


def test_child_that_dies_becomes_a_generic_failure(files, monkeypatch):
    # The child is killed as the pool hands it out: killing it from the progress callback races
    # a tiny job, which can finish before its first event is read. The parent sees the same
    # thing either way: its output ends without a result, and the exit status says why.
    take = sandbox.SPARES.take

    def killed_take(memory_bytes: int):
        process = take(memory_bytes)
        process.kill()
        process.wait()
        return process

    monkeypatch.setattr(sandbox.SPARES, "take", killed_take)
    with pytest.raises(PruningFailed, match=r"ended without a result \(killed by SIGKILL\)"):
        run_pruning(files, SPEC.to_json(), ONESHOT)


def test_result_that_does_not_match_the_model_is_refused(files):
    from protocol._wire.safetensors import parse_header

    weights = parse_header(files["weights.safetensors"])
    wrong = dump_tensors({"other.weight": torch.zeros(2)})
    masks = dump_tensors({})
    meta = json.dumps({"report": {}, "weights": len(wrong), "masks": len(masks)}).encode()
    with pytest.raises(PruningFailed, match="does not match the model"):
        sandbox._parse_result(len(meta).to_bytes(8, "big") + meta + wrong + masks, weights)
    with pytest.raises(PruningFailed, match="malformed result"):
        sandbox._parse_result(b"\x00" * 8 + b"not json", weights)


@pytest.fixture()
def job(tmp_path):
    from owner.session import OwnerSession

    entity = init_identity(tmp_path / "entity", "entity", name="entity")
    owner = init_identity(tmp_path / "owner", "owner", name="owner")
    registry = {owner.card.fingerprint: owner.card}
    jobs = EntityJobs(
        entity, lambda: registry, NonceStore(tmp_path / "nonces.jsonl"), EventLog(tmp_path / "events.jsonl"), EntitySettings(recipe="oneshot")
    )
    session = OwnerSession(
        owner, entity.card, export_eval(_model(flat=True), (1, 12, 12)), SPEC, PruneRequest(4.0), AuditLog.open(tmp_path / "audit.jsonl", owner)
    )
    offer = jobs.make_offer(node_id=1)
    request = sealed_request(session, jobs, offer)
    return jobs, offer, jobs.open_request(offer, request), request, tmp_path


def _events(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]


def test_engine_error_reaches_the_owner_only_as_a_generic_reason_with_an_error_id(job):
    jobs, offer, opened, request, tmp_path = job
    body = canonical.loads(opened.files["request.json"])
    body["input_spec"] = InputSpec((1, 16, 16), (0.5,), (0.25,)).to_json()  # the model's head takes 12x12
    opened = dataclasses.replace(opened, files={**opened.files, "request.json": canonical.dumps(body)})
    with pytest.raises(JobError) as info:
        jobs.prune(offer, opened, request)
    reason, _, rest = str(info.value).partition(" (error id ")
    assert reason == "pruning failed inside the engine"  # not torch's text, which quotes shapes and values
    error_id = rest.split(";")[0]
    logged = [e for e in _events(tmp_path) if e["event"] == "error"]
    assert logged and logged[-1]["error_id"] == error_id and logged[-1]["job_id"] == offer.job_id
    assert "1152" in logged[-1]["detail"]  # torch's text (8*12*12 features expected) is in the operator's log


def test_hostile_graph_is_refused_before_a_pruning_process_starts(job, monkeypatch):
    jobs, offer, opened, request, _ = job

    def no_child(*args, **kwargs):
        raise AssertionError("a pruning process was started for a graph that should have been refused")

    monkeypatch.setattr(sandbox.subprocess, "Popen", no_child)
    program = json.loads(opened.files[PROGRAM_FILE])
    relu = next(n for n in program["graph_module"]["graph"]["nodes"] if n["target"] == "torch.ops.aten.relu.default")
    relu["target"] = "torch.ops.aten.from_file.default"
    opened = dataclasses.replace(opened, files={**opened.files, PROGRAM_FILE: json.dumps(program).encode()})
    with pytest.raises(ArtifactError, match="from_file"):
        jobs.prune(offer, opened, request)


def test_limits_are_entity_settings():
    assert EntitySettings().sandbox == SandboxLimits(memory_bytes=8 * GiB, seconds=30 * 60)
    with pytest.raises(ValueError, match="positive"):
        SandboxLimits(seconds=0)


@pytest.fixture()
def flower_task():
    """What flwr sets before it runs a ServerApp's main: messages are stamped with the run's ids."""
    from flwr.supercore.task_identity import TaskIdentity

    before = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = before


def test_service_answers_an_unexpected_pruning_error_with_an_error_id_not_its_text(job, flower_task):
    from entity.job_loop import Job, JobLoop
    from entity.workers import WorkerPool
    from protocol.flower_records import facts_of

    jobs, offer, opened, request, tmp_path = job

    def prune(*args, **kwargs):
        raise RuntimeError("bytes of /home/entity/keys/signing.key: 9f8e7d6c")

    jobs.open_request = lambda offer_, blob, redeem=True: opened
    jobs.prune = prune
    loop = JobLoop(None, jobs, b"card", pool=WorkerPool(1, 4))
    loop.journal.add(offer.job_id, owner="owner", nonce=offer.nonce, offer=offer.blob, checkpoint=None, request=request)
    loop.enqueue(Job(offer, "owner", 7))
    deadline = time.monotonic() + 30
    while not loop.outbox and time.monotonic() < deadline:
        loop.collect()
        time.sleep(0.05)
    reason = str(facts_of(loop.outbox[-1].message.content)["reason"])
    assert reason.startswith("pruning failed: internal error (error id ")
    assert "signing.key" not in reason and "9f8e7d6c" not in reason and "RuntimeError" not in reason
    error_id = reason.split("error id ")[1].split(";")[0]
    logged = [e for e in _events(tmp_path) if e["event"] == "error" and e.get("error_id") == error_id]
    assert logged and "signing.key: 9f8e7d6c" in logged[0]["detail"]
