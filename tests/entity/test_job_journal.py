"""The entity's journal: a job survives the service's death, and every queued job reaches its owner.

The loop runs over the fake Grid of the loop tests with a real ``EntityJobs``; pruning is replaced
by a function that seals a fixed result, so these tests check the bookkeeping (journal, workers,
resume), not the engine.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import pytest

from entity.job_loop import JobLoop
from entity.jobs import JobError
from entity.journal import DELIVERED, DONE, QUEUED, REFUSED, JobJournal
from entity.workers import WorkerPool
from protocol.audit import verify_log
from protocol.contract import ADMITTED, HELLO_KIND, OFFER, RESULT, STATUS, STATUS_KIND, Hello, JobStatus
from protocol.contract import REFUSED as REFUSED_MESSAGE
from protocol.flower_records import blob_of, facts_of, pack
from protocol.signing import sign_message, verify_message
from tests.entity import test_server_loop_fuzz as loop_tests
from tests.entity.test_server_loop_fuzz import FAST, FakeGrid, World, answer, answer_all, refusals

world = loop_tests.world  # the loop tests' fixtures: real keys, a fake Grid
task_identity = loop_tests.task_identity


def _loop(world: World, jobs, grid: FakeGrid, workers: int = 1, max_queued: int = 4) -> JobLoop:
    home = jobs.events.path.parent
    return JobLoop(
        grid, jobs, world.entity.card.to_bytes(), FAST, pool=WorkerPool(workers, max_queued), journal=JobJournal(home / "jobs.db", home / "jobs")
    )


def _blocking_prune(release: threading.Event):
    def prune(offer, opened, blob, progress=None, **kwargs):
        progress({"event": "refit", "layer": "features.3.weight", "percent": 40})
        release.wait(30)
        return b"sealed result for " + offer.job_id.encode(), {"job_id": offer.job_id}

    return prune


def _resume_hello(world: World, offer_message, job_id: str):
    offer_job, nonce, _ = world.offer_of(offer_message)
    blob = sign_message(Hello(offer_job, nonce, world.owner.fingerprint, "resume", 0, job_id).to_json(), kind=HELLO_KIND, signer=world.owner)
    return pack({"status": "hello", "owner": world.owner.fingerprint}, blob)


def _steps_until(loop: JobLoop, grid: FakeGrid, done, seconds: float = 20.0, reply=lambda m: pack({"status": "noted"})) -> None:
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:
        loop.step()
        for message_id, message in grid.unanswered():
            if message.metadata.message_type in (STATUS,):
                answer(grid, message_id, reply(message))
        time.sleep(0.01)
    assert done(), "timed out"


def _admit_request(world: World, loop: JobLoop, grid: FakeGrid) -> str:
    loop.step()
    answer_all(grid, world.hello)
    loop.step()
    [(message_id, admitted)] = [(i, m) for i, m in grid.unanswered() if m.metadata.message_type == ADMITTED]
    answer(grid, message_id, pack({"status": "request"}, world.sealed_request(admitted)))
    loop.step()
    return str(facts_of(admitted.content)["job_id"])


def test_every_owner_gets_its_offer_and_a_queue_position_while_another_job_prunes(world: World) -> None:
    jobs = world.jobs()
    release = threading.Event()
    jobs.prune = _blocking_prune(release)
    grid = FakeGrid([7])
    loop = _loop(world, jobs, grid, workers=1)
    first = _admit_request(world, loop, grid)
    grid.nodes.append(8)  # a second owner arrives while the first job prunes
    loop.step()
    offers = {m.metadata.dst_node_id for m in grid.of_type(OFFER)}
    assert offers == {7, 8}
    for message_id, message in grid.unanswered():
        if message.metadata.message_type == OFFER:
            answer(grid, message_id, world.hello(message))
    loop.step()
    for message_id, message in grid.unanswered():
        if message.metadata.message_type == ADMITTED:
            answer(grid, message_id, pack({"status": "request"}, world.sealed_request(message)))
    seen: dict[int, list[JobStatus]] = {7: [], 8: []}

    def record(message):
        status = JobStatus.from_json(verify_message(blob_of(message.content), kind=STATUS_KIND, signer=world.entity.card))
        seen[message.metadata.dst_node_id].append(status)
        return pack({"status": "noted"})

    _steps_until(loop, grid, lambda: seen[7] and seen[8], reply=record)
    assert seen[7][0].state == "pruning" and seen[7][0].layer == "features.3.weight" and seen[7][0].percent == 40
    assert seen[8][0].state == "queued" and seen[8][0].position == 1
    release.set()
    _steps_until(loop, grid, lambda: len(grid.of_type(RESULT)) == 2, reply=record)
    assert loop.journal.get(first).state == DONE
    loop.close()


def test_full_queue_and_per_owner_limit_are_refusals_before_the_model_is_sent(world: World) -> None:
    jobs = world.jobs()
    release = threading.Event()
    jobs.prune = _blocking_prune(release)
    grid = FakeGrid([7])
    loop = _loop(world, jobs, grid, workers=1, max_queued=0)
    _admit_request(world, loop, grid)
    grid.nodes.append(8)
    loop.step()
    answer_all(grid, lambda m: world.hello(m) if m.metadata.message_type == OFFER else pack({"status": "noted"}))
    loop.step()
    assert any("queue is full" in r for r in refusals(grid)), refusals(grid)
    assert len(grid.of_type(ADMITTED)) == 1  # the second owner never got to send its model
    release.set()
    loop.close()


def test_a_job_survives_the_entity_and_its_owner_collects_the_result_by_resuming(world: World) -> None:
    jobs = world.jobs()
    release = threading.Event()
    jobs.prune = _blocking_prune(release)
    grid = FakeGrid([7])
    loop = _loop(world, jobs, grid)
    job_id = _admit_request(world, loop, grid)
    assert loop.journal.get(job_id).state in (QUEUED, "pruning")
    loop.close()  # the entity dies mid-prune (its worker never returns)
    loop.journal.close()

    restarted_jobs = world.jobs()
    restarted_jobs.events = jobs.events
    restarted_jobs.nonces = jobs.nonces
    restarted_jobs.prune = lambda offer, opened, blob, progress=None, **kwargs: (b"sealed again " + offer.job_id.encode(), {"job_id": offer.job_id})
    grid2 = FakeGrid([21])  # the owner's new SuperNode
    restarted = _loop(world, restarted_jobs, grid2)
    assert restarted.recover() == [job_id]
    restarted.step()
    [(message_id, offer)] = grid2.unanswered()
    answer(grid2, message_id, _resume_hello(world, offer, job_id))
    _steps_until(restarted, grid2, lambda: grid2.of_type(RESULT))
    [result] = grid2.of_type(RESULT)
    assert facts_of(result.content)["job_id"] == job_id and blob_of(result.content) == b"sealed again " + job_id.encode()
    [(message_id, _)] = [(i, m) for i, m in grid2.unanswered() if m.metadata.message_type == RESULT]
    answer(grid2, message_id, pack({"status": "verified"}))
    _steps_until(restarted, grid2, lambda: restarted.journal.get(job_id).state == DELIVERED)
    logged = [e["event"] for e in map(json.loads, jobs.events.path.read_text().splitlines()) if e.get("job_id") == job_id]
    assert "recovered" in logged and "resumed" in logged and "delivered" in logged
    restarted.close()
    release.set()


def test_a_job_cut_short_by_restarts_too_often_is_refused_not_forgotten(world: World) -> None:
    jobs = world.jobs()
    home = jobs.events.path.parent
    journal = JobJournal(home / "jobs.db", home / "jobs")
    journal.add("job-1", owner=world.owner.fingerprint, nonce="n", offer=b"{}", checkpoint=None, request=b"sealed")
    for _ in range(3):
        journal.set_state("job-1", "pruning", attempt=True)
    loop = JobLoop(FakeGrid([]), jobs, world.entity.card.to_bytes(), FAST, pool=WorkerPool(1, 4), journal=journal)
    assert loop.recover() == []
    entry = journal.get("job-1")
    assert entry is not None and entry.state == REFUSED and "restarted" in entry.reason
    assert not (journal.blobs / "job-1").exists()
    loop.close()


def test_resume_of_an_unknown_job_is_a_clear_refusal(world: World) -> None:
    jobs = world.jobs()
    grid = FakeGrid([7])
    loop = _loop(world, jobs, grid)
    loop.step()
    answer_all(grid, lambda m: _resume_hello(world, m, "job-nobody-knows"))
    loop.step()
    assert [r for r in refusals(grid)] and "not known to this entity" in refusals(grid)[0]
    assert grid.of_type(REFUSED_MESSAGE)
    loop.close()


def test_a_model_over_the_size_limit_and_an_owner_over_its_job_limit_are_refused_at_the_hello(world: World) -> None:
    jobs = world.jobs()
    jobs.settings = type(jobs.settings)(recipe="oneshot", max_request_mib=0.001, max_jobs_per_owner=1)
    loop = _loop(world, jobs, FakeGrid([]))
    with pytest.raises(JobError, match="over this entity's limit.*--max-request-mib"):
        loop.check_limits(Hello("j", "n", world.owner.fingerprint, "request", 10_000))
    loop.check_limits(Hello("j", "n", world.owner.fingerprint, "request", 10))
    loop.journal.add("job-0", owner=world.owner.fingerprint, nonce="n", offer=b"{}", checkpoint=None, request=b"x")
    with pytest.raises(JobError, match="1 jobs queued or pruning already"):
        loop.check_limits(Hello("j", "n", world.owner.fingerprint, "request", 10))
    loop.close()


def test_an_owner_that_restarts_collects_its_verified_result_with_a_resume_hello(world: World, tmp_path) -> None:
    """The owner's side for real: the result of a job sent by an earlier run opens and verifies in a new one."""
    import torch

    from owner.session import OwnerSession, ResumeState
    from protocol.audit import AuditLog
    from protocol.spec import InputSpec, PruneRequest
    from tests.helpers import export_eval

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3),
    )  # fmt: skip
    spec = InputSpec((1, 12, 12), (0.5,), (0.25,))
    program = export_eval(model, (1, 12, 12))
    jobs = world.jobs()
    grid = FakeGrid([7])
    loop = _loop(world, jobs, grid)
    kept: list[ResumeState] = []
    log = tmp_path / "audit.jsonl"  # OUT/audit.jsonl: the resumed run appends to the same trail
    first = OwnerSession(world.owner, world.entity.card, program, spec, PruneRequest(4.0), AuditLog.open(log, world.owner))
    first.on_request_sealed = kept.append
    loop.step()
    [(message_id, offer)] = grid.unanswered()
    answer(grid, message_id, pack({"status": "hello", "owner": world.owner.fingerprint}, first.answer_offer(blob_of(offer.content), None)))
    loop.step()
    [(message_id, admitted)] = grid.unanswered()
    answer(
        grid, message_id, pack({"status": "request", "checkpoint": first.sent_checkpoint or b""}, first.answer_admission(blob_of(admitted.content)))
    )
    loop.step()
    [state] = kept
    first.audit.close()
    grid.nodes.remove(7)  # the owner's run ends here (Ctrl-C); its job goes on at the entity
    _steps_until(loop, grid, lambda: loop.journal.get(state.job_id).state == DONE, seconds=120)

    second = OwnerSession(world.owner, world.entity.card, program, spec, PruneRequest(4.0), AuditLog.open(log, world.owner), resume=state)
    grid.nodes.append(9)
    loop.step()
    [(message_id, offer)] = [(i, m) for i, m in grid.unanswered() if m.metadata.message_type == OFFER]
    answer(grid, message_id, pack({"status": "hello", "owner": world.owner.fingerprint}, second.answer_offer(blob_of(offer.content), None)))
    _steps_until(loop, grid, lambda: any(m.metadata.dst_node_id == 9 for m in grid.of_type(RESULT)))
    [(message_id, result)] = [(i, m) for i, m in grid.unanswered() if m.metadata.message_type == RESULT and m.metadata.dst_node_id == 9]
    answer(grid, message_id, pack(second.receive_result(blob_of(result.content))))
    assert second.outcome is not None and second.outcome.job_id == state.job_id
    _steps_until(loop, grid, lambda: loop.journal.get(state.job_id).state == DELIVERED)
    second.audit.close()
    assert verify_log(log, owner=world.owner.card, entity=world.entity.card).ok
    loop.close()


def _statuses(world: World, grid: FakeGrid) -> list[JobStatus]:
    return [JobStatus.from_json(verify_message(blob_of(m.content), kind=STATUS_KIND, signer=world.entity.card)) for m in grid.of_type(STATUS)]


def test_a_stopping_entity_tells_each_connected_owner_that_its_job_is_kept(world: World) -> None:
    from entity.settings import STOP_FILE

    jobs = world.jobs()
    release = threading.Event()
    jobs.prune = _blocking_prune(release)
    grid = FakeGrid([7])
    loop = _loop(world, jobs, grid, workers=1)
    job_id = _admit_request(world, loop, grid)
    _steps_until(loop, grid, lambda: any(s.state == "pruning" for s in _statuses(world, grid)))
    (jobs.events.path.parent / STOP_FILE).write_text("now\n")
    grid.nodes.append(8)  # arrives while the entity stops: no offer
    _steps_until(loop, grid, lambda: loop.stop_logged)
    stopping = [s for s in _statuses(world, grid) if s.state == "stopping"]
    assert [s.job_id for s in stopping] == [job_id]
    assert stopping[0].seq > max(s.seq for s in _statuses(world, grid) if s.state != "stopping")
    assert {m.metadata.dst_node_id for m in grid.of_type(OFFER)} == {7}
    events = [e for e in map(json.loads, jobs.events.path.read_text().splitlines()) if e["event"] in ("stopping", "stopped")]
    assert [e["event"] for e in events] == ["stopping", "stopped"] and events[1]["unanswered"] == []
    assert loop.journal.get(job_id).state != REFUSED  # kept for the restart
    release.set()
    loop.close()


def test_a_stopping_notice_nobody_takes_is_given_up_on_within_its_bound(world: World) -> None:
    from entity.settings import STOP_FILE

    jobs = world.jobs()
    release = threading.Event()
    jobs.prune = _blocking_prune(release)
    grid = FakeGrid([7])
    loop = _loop(world, jobs, grid, workers=1)
    loop.timing = dataclasses.replace(loop.timing, stop_notice_seconds=0.3)
    job_id = _admit_request(world, loop, grid)
    (jobs.events.path.parent / STOP_FILE).write_text("now\n")
    started = time.monotonic()
    while not loop.stop_logged and time.monotonic() - started < 10:
        loop.step()  # nobody answers the notice
        time.sleep(0.01)
    assert loop.stop_logged and 0.3 <= time.monotonic() - started < 5
    assert loop.stop_notices == {job_id}
    release.set()
    loop.close()


def test_an_owner_hears_that_its_job_is_pruned_before_the_result_arrives(world: World) -> None:
    jobs = world.jobs()
    release = threading.Event()
    release.set()
    jobs.prune = _blocking_prune(release)
    grid = FakeGrid([7])
    loop = _loop(world, jobs, grid, workers=1)
    _admit_request(world, loop, grid)
    _steps_until(loop, grid, lambda: grid.of_type(RESULT))
    kinds = [m.metadata.message_type for m in grid.sent.values() if m.metadata.message_type in (STATUS, RESULT)]
    states = [s.state for s in _statuses(world, grid)]
    assert states[-1] == "done" and kinds[-1] == RESULT and kinds[-2] == STATUS
    loop.close()
