"""The entity's ServerApp loop survives any message: every failure ends that job, never the service.

A fake Grid (the three calls the loop makes, over in-memory queues, failing on demand) carries
real flwr Messages between the loop and a scripted owner; the entity side is a real
``EntityJobs`` with keys from ``init_identity``, so requests are opened and checked for real.
"""

from __future__ import annotations

import io
import itertools
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from entity.job_loop import INTERNAL_REFUSAL, SERVICE_REFUSAL, UNDELIVERABLE_RESULT, JobLoop, LoopTiming
from entity.jobs import EntityJobs, EntitySettings, EventLog, JobError
from protocol import canonical
from protocol.artifact import dump_tensors
from protocol.contract import ADMITTED, FINISH, HELLO_KIND, OFFER, OFFER_KIND, REFUSED, REQUEST_KIND, RESULT, STATUS, Hello
from protocol.flower_records import RecordError, blob_of, facts_of, pack
from protocol.keys import Identity, init_identity
from protocol.replay import NonceStore
from protocol.sealing import seal_bundle
from protocol.signing import digest, sign_message, verify_message
from protocol.spec import InputSpec, PruneRequest

SPEC = InputSpec((1, 28, 28), (0.286,), (0.353,))
WEIGHTS = dump_tensors({"w": torch.zeros(2)})
FAST = LoopTiming(poll_seconds=0.01, max_backoff_seconds=0.08, push_attempts=3, offers_per_node=2)


class FakeGrid:
    """``get_node_ids``, ``push_messages`` and ``pull_messages`` over lists, failing on demand.

    Unlike a SuperLink, ``pull_messages`` hands back every queued reply, including ones to ids
    the loop did not ask for, so that stray replies reach the loop too.
    """

    def __init__(self, nodes: list[int]):
        self.nodes = list(nodes)
        self.sent: dict[str, Message] = {}
        self.answered: set[str] = set()
        self.inbox: list[Message] = []
        self.fail_push = self.fail_pull = self.fail_nodes = 0
        self.push_returns_none = False
        self._ids = itertools.count()

    def get_node_ids(self) -> list[int]:
        if self.fail_nodes:
            self.fail_nodes -= 1
            raise ConnectionError("SuperLink unreachable")
        return list(self.nodes)

    def push_messages(self, messages) -> list[str | None]:
        if self.fail_push:
            self.fail_push -= 1
            raise ConnectionError("SuperLink unreachable")
        if self.push_returns_none:
            return [None for _ in messages]
        ids = []
        for message in messages:
            message_id = f"msg-{next(self._ids)}"
            message.metadata.__dict__["_message_id"] = message_id  # as flwr's HTTP grid does
            self.sent[message_id] = message
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids) -> list[Message]:
        if self.fail_pull:
            self.fail_pull -= 1
            raise ConnectionError("SuperLink unreachable")
        list(message_ids)
        out, self.inbox = self.inbox, []
        return out

    def unanswered(self) -> list[tuple[str, Message]]:
        return [(mid, m) for mid, m in self.sent.items() if mid not in self.answered]

    def reply(self, message_id: str, reply: Message) -> None:
        self.answered.add(message_id)
        self.inbox.append(reply)

    def of_type(self, message_type: str) -> list[Message]:
        return [m for m in self.sent.values() if m.metadata.message_type == message_type]


@dataclass
class World:
    root: Path
    entity: Identity
    owner: Identity
    offers: dict = field(default_factory=dict)

    def jobs(self) -> EntityJobs:
        home = Path(tempfile.mkdtemp(dir=self.root))
        registry = {self.owner.card.fingerprint: self.owner.card}
        return EntityJobs(
            self.entity, lambda: registry, NonceStore(home / "nonces.jsonl"), EventLog(home / "events.jsonl"), EntitySettings(recipe="oneshot")
        )

    def loop(self, nodes: list[int], jobs: EntityJobs | None = None) -> tuple[JobLoop, FakeGrid]:
        grid = FakeGrid(nodes)
        jobs = jobs or self.jobs()
        return JobLoop(grid, jobs, self.entity.card.to_bytes(), FAST), grid

    def offer_of(self, offer: Message) -> tuple[str, str, bytes]:
        blob = blob_of(offer.content)
        body = verify_message(blob, kind=OFFER_KIND, signer=self.entity.card)
        self.offers[body["job_id"]] = (body["job_id"], body["nonce"], blob)
        return body["job_id"], body["nonce"], blob

    def hello(self, offer: Message, intent: str = "request") -> RecordDict:
        """The registered owner's signed hello for ``offer``."""
        job_id, nonce, _ = self.offer_of(offer)
        resume = "job-from-an-earlier-run" if intent == "resume" else None
        hello = Hello(job_id, nonce, self.owner.fingerprint, intent, 1000, resume)
        blob = sign_message(hello.to_json(), kind=HELLO_KIND, signer=self.owner)
        return pack({"status": "hello", "owner": self.owner.fingerprint}, blob)

    def sealed_request(self, admitted: Message, request_json: bytes | None = None, files: dict | None = None) -> bytes:
        """A request sealed by the registered owner, as a real owner would, around any request.json."""
        job_id, nonce, blob = self.offers[str(facts_of(admitted.content)["job_id"])]
        if request_json is None:
            request_json = canonical.dumps(valid_request(job_id, nonce))
        bundle = {"request.json": request_json, "program.json": b"{}", "weights.safetensors": WEIGHTS, **(files or {})}
        return seal_bundle(bundle, kind=REQUEST_KIND, job_id=job_id, request_hash=digest(blob), sender=self.owner, recipient=self.entity.card)


def valid_request(job_id: str, nonce: str) -> dict:
    return {"job_id": job_id, "nonce": nonce, "prune": PruneRequest(8.0).to_json(), "input_spec": SPEC.to_json()}


@pytest.fixture(scope="module", autouse=True)
def task_identity():
    """What flwr sets before it runs a ServerApp's main: messages are stamped with the run's ids."""
    from flwr.supercore.task_identity import TaskIdentity

    before = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = before


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("loop")
    return World(root, init_identity(root / "entity", "entity", name="entity"), init_identity(root / "owner", "owner", name="owner"))


def events(loop: JobLoop) -> list[dict]:
    return [json.loads(line) for line in loop.jobs.events.path.read_text().splitlines()]


def answer(grid: FakeGrid, message_id: str, content: RecordDict) -> None:
    grid.reply(message_id, Message(content, reply_to=grid.sent[message_id]))


def answer_all(grid: FakeGrid, content_for) -> None:
    for message_id, message in grid.unanswered():
        answer(grid, message_id, content_for(message))


def drain(loop: JobLoop, grid: FakeGrid, seconds: float = 60) -> None:
    """Acknowledge everything the loop sends until no job is open (bounded; workers run meanwhile)."""
    grid.fail_push = grid.fail_pull = grid.fail_nodes = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        loop.step()
        answer_all(grid, lambda m: pack({"status": "bye"}))
        if not grid.unanswered() and loop.idle() and not grid.inbox:
            return
        time.sleep(0.01)
    raise AssertionError(f"loop did not drain: pending {loop.pending}, outbox {loop.outbox}, active {list(loop.active)}")


def refusals(grid: FakeGrid) -> list[str]:
    return [str(facts_of(m.content)["reason"]) for m in grid.of_type(REFUSED)]


def offer_and_answer(world: World, content_for, nodes: list[int] | None = None) -> tuple[JobLoop, FakeGrid]:
    """One step (offers go out), the owner's answer to each offer, one more step."""
    loop, grid = world.loop(nodes or [7])
    loop.step()
    answer_all(grid, content_for)
    loop.step()
    return loop, grid


def admit_and_answer(world: World, content_for, jobs: EntityJobs | None = None) -> tuple[JobLoop, FakeGrid]:
    """Offers out, the owner's hello, admissions out, the owner's answer to each admission, one more step."""
    loop, grid = world.loop([7], jobs)
    loop.step()
    answer_all(grid, world.hello)
    loop.step()
    assert grid.of_type(ADMITTED), refusals(grid)
    answer_all(grid, content_for)
    loop.step()
    return loop, grid


# ------------------------------------------------------------------- the campaign's exact cases


def test_reply_whose_facts_are_not_a_config_record_is_refused_and_the_loop_goes_on(world: World) -> None:
    loop, grid = offer_and_answer(world, lambda m: RecordDict({"facts": MetricRecord({"status": 1})}))
    assert len(refusals(grid)) == 1
    assert "facts" in refusals(grid)[0]
    grid.nodes.append(8)
    loop.step()
    assert len(grid.of_type(OFFER)) == 2  # still serving: the next owner gets its offer
    drain(loop, grid)
    assert {e["event"] for e in events(loop)} >= {"refused", "finished"}


HOSTILE_REQUESTS = {
    "a list": lambda job, nonce: canonical.dumps([job, nonce]),
    "a float": lambda job, nonce: canonical.dumps(valid_request(job, nonce))[:-1] + b',"rate":8.5}',
    "nested 10000 deep": lambda job, nonce: b"[" * 10000 + b"]" * 10000,
    "nested 10000 deep in a field": lambda job, nonce: canonical.dumps(valid_request(job, nonce)).replace(
        b'"prune":', b'"prune":' + b'{"a":' * 10000 + b"1" + b"}" * 10000 + b',"x":'
    ),
    "a string job id of the wrong type": lambda job, nonce: canonical.dumps({**valid_request(job, nonce), "job_id": 7}),
    "prune as a list": lambda job, nonce: canonical.dumps({**valid_request(job, nonce), "prune": ["8"]}),
    "a missing input spec": lambda job, nonce: canonical.dumps({k: v for k, v in valid_request(job, nonce).items() if k != "input_spec"}),
    "an extra field": lambda job, nonce: canonical.dumps({**valid_request(job, nonce), "extra": "x"}),
    "a malformed input spec": lambda job, nonce: canonical.dumps({**valid_request(job, nonce), "input_spec": {"shape": "big"}}),
    "not JSON": lambda job, nonce: b"\xff\xfe",
}


@pytest.mark.parametrize("name", sorted(HOSTILE_REQUESTS))
def test_registered_owners_malformed_request_json_is_refused_and_the_loop_goes_on(world: World, name: str) -> None:
    def reply(admitted: Message) -> RecordDict:
        job_id, nonce, _ = world.offers[str(facts_of(admitted.content)["job_id"])]
        return pack({"status": "request"}, world.sealed_request(admitted, HOSTILE_REQUESTS[name](job_id, nonce)))

    loop, grid = admit_and_answer(world, reply)
    [reason] = refusals(grid)
    assert reason.startswith("request.json"), reason
    assert "Traceback" not in reason and "\n" not in reason
    drain(loop, grid)
    logged = events(loop)
    assert [e["event"] for e in logged].count("finished") == 1
    assert not any(e["event"] == "admitted" for e in logged)


@pytest.mark.parametrize("name", sorted(HOSTILE_REQUESTS))
def test_open_request_refuses_a_malformed_request_json_with_a_job_error(world: World, name: str) -> None:
    jobs = world.jobs()
    offer = jobs.make_offer(node_id=1)
    job_id, nonce = offer.job_id, offer.nonce
    message = Message(pack({"job_id": job_id}, offer.blob), dst_node_id=1, message_type=OFFER)
    world.offer_of(message)
    with pytest.raises(JobError, match=r"^request\.json"):
        jobs.open_request(offer, world.sealed_request(message, HOSTILE_REQUESTS[name](job_id, nonce)))


def test_open_request_without_a_program_is_a_job_error(world: World) -> None:
    jobs = world.jobs()
    offer = jobs.make_offer(node_id=1)
    message = Message(pack({"job_id": offer.job_id}, offer.blob), dst_node_id=1, message_type=OFFER)
    job_id, nonce, blob = world.offer_of(message)
    sealed = seal_bundle(
        {"request.json": canonical.dumps(valid_request(job_id, nonce))},
        kind=REQUEST_KIND,
        job_id=job_id,
        request_hash=digest(blob),
        sender=world.owner,
        recipient=world.entity.card,
    )
    with pytest.raises(JobError, match="lacks program.json, weights.safetensors"):
        jobs.open_request(offer, sealed)


def test_broken_owner_registry_is_refused_with_our_text_and_its_cause_stays_in_the_event_log(world: World) -> None:
    jobs = world.jobs()

    def registry():
        raise OSError("cannot read /srv/entity-secret/owners")

    jobs.registry = registry
    loop, grid = world.loop([7], jobs)
    loop.step()
    answer_all(grid, world.hello)  # the registry is read at the hello, before any model crosses
    loop.step()
    assert refusals(grid) == [SERVICE_REFUSAL]
    assert "entity-secret" in loop.jobs.events.path.read_text()  # the operator sees the cause
    drain(loop, grid)
    assert not any("entity-secret" in str(facts_of(m.content)) for m in grid.sent.values())


def test_unexpected_exception_is_refused_with_a_fixed_text_not_its_message(world: World) -> None:
    jobs = world.jobs()

    def open_request(offer, blob, redeem=True):
        raise KeyError("/home/entity/keys/sealing.key")

    jobs.open_request = open_request
    loop, grid = admit_and_answer(world, lambda m: pack({"status": "request"}, b"x"), jobs)
    assert refusals(grid) == [INTERNAL_REFUSAL]
    assert any(e["event"] == "error" and "sealing.key" in e["trace"] for e in events(loop))


def test_reply_with_error_to_an_offer_finishes_the_job(world: World) -> None:
    loop, grid = world.loop([7])
    loop.step()
    for message_id, message in grid.unanswered():
        grid.reply(message_id, Message(Error(code=1, reason="owner crashed\n" * 50), reply_to=message))
    loop.step()
    assert [facts_of(m.content)["outcome"] for m in grid.of_type(FINISH)] == ["error"]
    logged = [e for e in events(loop) if e["event"] == "owner-error"]
    assert logged and "\n" not in logged[0]["reason"] and len(logged[0]["reason"]) <= 300


def test_reply_to_an_unknown_message_id_is_logged_as_stray_and_the_job_stays_open(world: World) -> None:
    loop, grid = world.loop([7])
    loop.step()
    metadata = Metadata(
        run_id=0,
        message_id="",
        src_node_id=7,
        dst_node_id=0,
        reply_to_message_id="msg-unknown",
        group_id="",
        created_at=time.time(),
        ttl=60.0,
        message_type=OFFER,
    )
    grid.inbox.append(Message(metadata=metadata, content=pack({"status": "declined"})))
    loop.step()
    assert any(e["event"] == "stray-reply" for e in events(loop))
    assert len(loop.pending) == 1 and not grid.of_type(FINISH)


def test_pull_failures_are_logged_and_back_off_then_recover(world: World) -> None:
    loop, grid = world.loop([7])
    loop.step()
    grid.fail_pull = 5
    delays = []
    for _ in range(5):
        assert loop.step() is False
        delays.append(loop.delay())
    assert delays == sorted(delays) and delays[-1] == FAST.max_backoff_seconds
    assert loop.step() is True and loop.delay() == FAST.poll_seconds
    assert sum(e["event"] == "error" and e["where"] == "pull" for e in events(loop)) == 5


def test_node_listing_failure_is_logged_and_the_loop_goes_on(world: World) -> None:
    loop, grid = world.loop([7])
    grid.fail_nodes = 1
    assert loop.step() is False
    assert loop.step() is True and len(grid.of_type(OFFER)) == 1


def test_failed_push_is_retried_at_the_next_step(world: World) -> None:
    loop, grid = world.loop([7])
    grid.fail_push = 2  # both pushes of the first step fail
    assert loop.step() is False
    assert not grid.sent and len(loop.outbox) == 1
    loop.step()
    assert len(grid.of_type(OFFER)) == 1 and len(loop.pending) == 1 and not loop.outbox
    assert sum(e["event"] == "error" and e["where"] == "push" for e in events(loop)) == 2


def test_offer_the_superlink_never_takes_is_offered_again_then_the_node_is_given_up(world: World) -> None:
    loop, grid = world.loop([7])
    grid.push_returns_none = True
    for _ in range(FAST.push_attempts * FAST.offers_per_node + 2):
        loop.step()
    logged = [e["event"] for e in events(loop)]
    assert logged.count("offered") == FAST.offers_per_node
    assert logged.count("undeliverable") == FAST.offers_per_node
    assert logged.count("node-abandoned") == 1


def test_result_the_superlink_never_takes_becomes_a_refusal(world: World) -> None:
    jobs = world.jobs()
    jobs.prune = lambda *args, **kwargs: (b"sealed result", {"job_id": "x"})
    loop, grid = world.loop([7], jobs)
    real_push = grid.push_messages

    def push(messages):
        if any(m.metadata.message_type == RESULT for m in messages):
            raise ConnectionError("payload too large")
        return real_push(messages)

    grid.push_messages = push
    loop.step()
    answer_all(grid, world.hello)
    loop.step()
    answer_all(grid, lambda m: pack({"status": "request"}, world.sealed_request(m)))
    deadline = time.monotonic() + 30
    while not refusals(grid) and time.monotonic() < deadline:
        loop.step()
        answer_all(grid, lambda m: pack({"status": "noted"}))
    assert refusals(grid) == [UNDELIVERABLE_RESULT]


def test_broken_event_log_does_not_stop_the_loop(world: World, capsys) -> None:
    loop, grid = world.loop([7])
    loop.step()
    loop.jobs.events.path = loop.jobs.events.path.parent / "gone" / "events.jsonl"
    answer_all(grid, lambda m: RecordDict({"facts": MetricRecord({"status": 1})}))
    loop.step()
    assert len(refusals(grid)) == 1
    assert "event log failed" in capsys.readouterr().err


def test_bug_in_the_loops_own_bookkeeping_is_logged_and_the_next_step_runs(world: World) -> None:
    loop, grid = world.loop([7])
    real_flush = loop.flush

    def broken_flush() -> bool:
        loop.flush = real_flush
        raise RuntimeError("bookkeeping bug")

    loop.flush = broken_flush
    assert loop.step() is False and loop.delay() > FAST.poll_seconds
    assert any(e["event"] == "error" and e["where"] == "step" for e in events(loop))
    assert loop.step() is True and len(grid.of_type(OFFER)) == 1


def _npy(shape: tuple[int, ...], data: bytes, descr: str = "|u1") -> bytes:
    """A ``.npy`` image whose header says ``shape`` whatever ``data`` holds."""
    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(stream, {"descr": descr, "fortran_order": False, "shape": shape})
    return stream.getvalue() + data


def test_payload_array_image_round_trips_as_flower_writes_it() -> None:
    content = pack({}, b"0123456789")
    assert content["payload"]["sealed"].data == _npy((10,), b"0123456789")
    assert blob_of(content) == b"0123456789"


@pytest.mark.parametrize(
    ("claim", "error"), [(10**9, "length does not match"), (9, "length does not match"), (11, "length does not match"), (10**13, "exceeds the")]
)
def test_payload_whose_array_header_lies_about_its_length_is_a_record_error(claim: int, error: str) -> None:
    lying = Array(dtype="uint8", shape=(10,), stype="numpy.ndarray", data=_npy((claim,), b"0123456789"))
    with pytest.raises(RecordError, match=error):
        blob_of(RecordDict({"payload": ArrayRecord({"sealed": lying})}))


@pytest.mark.parametrize("data", [b"abc", _npy((10,), b"0123456789", descr="<f8"), _npy((2, 5), b"0123456789"), b"\x93NUMPY\x03\x00" + b"\x00" * 20])
def test_payload_that_is_not_a_flat_byte_array_image_is_a_record_error(data: bytes) -> None:
    array = Array(dtype="uint8", shape=(10,), stype="numpy.ndarray", data=data)
    with pytest.raises(RecordError, match="sealed payload is not"):
        blob_of(RecordDict({"payload": ArrayRecord({"sealed": array})}))


def test_honest_job_through_the_loop_is_delivered_and_finished(world: World, small_vgg_program, one_thread) -> None:
    from owner.session import OwnerSession
    from protocol.audit import AuditLog

    _, program = small_vgg_program
    audit = AuditLog.open(Path(tempfile.mkdtemp(dir=world.root)) / "audit.jsonl", world.owner)
    session = OwnerSession(world.owner, world.entity.card, program, SPEC, PruneRequest(8.0), audit)
    loop, grid = world.loop([7])
    loop.step()
    [(message_id, offer)] = grid.unanswered()
    hello = session.answer_offer(blob_of(offer.content), facts_of(offer.content)["entity_card"])
    answer(grid, message_id, pack({"status": "hello", "owner": world.owner.fingerprint}, hello))
    loop.step()
    [(message_id, admitted)] = grid.unanswered()
    sealed = session.answer_admission(blob_of(admitted.content))
    answer(grid, message_id, pack({"status": "request", "checkpoint": session.sent_checkpoint or b""}, sealed))
    statuses = []
    deadline = time.monotonic() + 120
    while session.outcome is None and time.monotonic() < deadline:
        loop.step()
        for message_id, message in grid.unanswered():
            if message.metadata.message_type == STATUS:
                statuses.append(session.receive_status(blob_of(message.content)))
                answer(grid, message_id, pack({"status": "noted"}))
            elif message.metadata.message_type == RESULT:
                answer(grid, message_id, pack(session.receive_result(blob_of(message.content))))
    drain(loop, grid)
    audit.close()
    assert statuses and statuses[0] is not None and statuses[0].state in ("queued", "pruning")
    assert [facts_of(m.content)["outcome"] for m in grid.of_type(FINISH)] == ["delivered"]
    assert [e["event"] for e in events(loop) if e["event"] in {"hello", "admitted", "queued", "pruned", "delivered", "finished"}] == [
        "hello",
        "admitted",
        "queued",
        "pruned",
        "delivered",
        "finished",
    ]
    assert loop.journal.get(session.job_id).state == "delivered"
    assert not (loop.journal.blobs / session.job_id).exists()  # the owner's model is not kept after delivery


# ------------------------------------------------------------------------------------- the fuzz

_CONFIG_VALUES = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),
    st.text(max_size=12),
    st.binary(max_size=48),
    st.booleans(),
    st.lists(st.integers(-3, 3), max_size=3),
    st.lists(st.floats(), max_size=3),
    st.lists(st.text(max_size=4), max_size=3),
    st.lists(st.binary(max_size=8), max_size=3),
    st.lists(st.booleans(), max_size=3),
)
_FACT_KEYS = st.one_of(st.sampled_from(["status", "reason", "checkpoint", "job_id", "owner"]), st.text(min_size=1, max_size=6))
_CONFIGS = st.dictionaries(_FACT_KEYS, _CONFIG_VALUES, max_size=4).map(ConfigRecord)
_ARRAYS = st.one_of(
    st.binary(max_size=256).map(lambda b: ArrayRecord({"sealed": Array(np.frombuffer(b, dtype=np.uint8).copy())})),
    st.binary(max_size=64).map(lambda b: ArrayRecord({"sealed": Array(dtype="uint8", shape=(len(b),), stype="numpy.ndarray", data=b)})),
    st.integers(1, 8).map(lambda n: ArrayRecord({"sealed": Array(np.ones((n, 2), dtype=np.float32))})),
    st.binary(max_size=16).map(lambda b: ArrayRecord({"other": Array(np.frombuffer(b, dtype=np.uint8).copy())})),
)
_METRICS = st.dictionaries(st.text(min_size=1, max_size=4), st.integers(-5, 5), max_size=2).map(MetricRecord)
_RECORDS = st.dictionaries(st.sampled_from(["facts", "payload", "extra"]), st.one_of(_CONFIGS, _ARRAYS, _METRICS), max_size=3).map(RecordDict)
_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=6)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=8,
)


def _request_json(draw, job_id: str, nonce: str) -> bytes:
    good = valid_request(job_id, nonce)
    kind = draw(st.sampled_from(["valid", "hostile", "edited", "random"]))
    if kind == "valid":
        return canonical.dumps(good)
    if kind == "hostile":
        return HOSTILE_REQUESTS[draw(st.sampled_from(sorted(HOSTILE_REQUESTS)))](job_id, nonce)
    if kind == "edited":
        return canonical.dumps({**good, draw(st.sampled_from(sorted(good))): draw(_JSON)})
    return canonical.dumps(draw(_JSON))


def _owner_reply(draw, world: World, grid: FakeGrid, message_id: str, message: Message) -> None:
    """What a hostile or broken owner might answer to ``message`` (or nothing, yet)."""
    choice = draw(st.sampled_from(["wait", "error", "records", "hello", "hello", "sealed", "tampered", "stray", "twice", "bye", "declined"]))
    if choice == "wait":
        return
    if choice == "error":
        grid.reply(message_id, Message(Error(code=draw(st.integers(0, 5)), reason=draw(st.text(max_size=40))), reply_to=message))
        return
    if choice == "stray":
        reply_to = draw(st.one_of(st.text(max_size=12), st.sampled_from(sorted(grid.sent))))
        metadata = Metadata(
            run_id=0,
            message_id="",
            src_node_id=message.metadata.dst_node_id,
            dst_node_id=0,
            reply_to_message_id=reply_to,
            group_id="",
            created_at=time.time(),
            ttl=60.0,
            message_type=message.metadata.message_type,
        )
        grid.inbox.append(Message(metadata=metadata, content=draw(_RECORDS)))
        return
    if choice == "hello" and message.metadata.message_type == OFFER:
        answer(grid, message_id, world.hello(message, draw(st.sampled_from(["request", "request", "check", "resume"]))))
        return
    if choice in ("sealed", "tampered") and message.metadata.message_type == ADMITTED:
        job_id, nonce, _ = world.offers[str(facts_of(message.content)["job_id"])]
        sealed = bytearray(world.sealed_request(message, _request_json(draw, job_id, nonce)))
        if choice == "tampered":
            sealed[draw(st.integers(0, len(sealed) - 1))] ^= 1 << draw(st.integers(0, 7))
        facts = {"status": "request", "checkpoint": draw(st.binary(max_size=32))}
        answer(grid, message_id, pack(facts, bytes(sealed)))
        return
    if choice == "bye":
        answer(grid, message_id, pack({"status": "bye"}))
    elif choice == "declined":
        answer(grid, message_id, pack({"status": "declined", "reason": draw(st.text(max_size=20))}))
    else:
        answer(grid, message_id, draw(_RECORDS))
    if choice == "twice":
        grid.inbox.append(Message(draw(_RECORDS), reply_to=message))


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_loop_never_raises_and_every_job_is_finished_whatever_the_owners_send(world: World, data) -> None:
    draw = data.draw
    loop, grid = world.loop(draw(st.lists(st.integers(1, 2**40), min_size=1, max_size=3, unique=True)))
    for _ in range(draw(st.integers(1, 6))):
        grid.fail_push, grid.fail_pull, grid.fail_nodes = (draw(st.integers(0, 1)) for _ in range(3))
        if draw(st.booleans()):
            grid.nodes.append(draw(st.integers(2**41, 2**42)))
        loop.step()
        assert loop.delay() <= FAST.max_backoff_seconds
        for message_id, message in grid.unanswered():
            _owner_reply(draw, world, grid, message_id, message)
    drain(loop, grid)

    jobs = {str(facts_of(m.content)["job_id"]) for m in grid.of_type(OFFER)}
    finished = {str(facts_of(m.content)["job_id"]) for m in grid.of_type(FINISH)}
    assert jobs and jobs == finished
    logged = events(loop)
    assert {e["job_id"] for e in logged if e["event"] == "finished"} == jobs
    assert {e["job_id"] for e in logged if e["event"] == "offered"} >= jobs
    for reason in refusals(grid):
        assert "\n" not in reason and str(world.root) not in reason
