"""The entity's message loop over all owners' jobs: it only moves messages, it never prunes.

One job, message by message (``protocol.contract``): offer -> the owner's signed hello; admission
(or a refusal, before any model crosses) -> the sealed request; the request is stored in the
journal and queued for the worker pool (``entity.workers``); while it waits and runs the owner
gets signed status messages; then the sealed result -> ack; finish -> goodbye. A ``check`` hello
ends after the admission; a ``resume`` hello hands an earlier job (from this run or, through the
journal, from one before a restart) to the owner's new connection.

Every pulled reply goes through one guarded dispatch: whatever a handler raises is written to the
event log with its traceback and turns into a refusal (or a finish) to that owner, never an exit
that would stop the service. What goes back is one of our own texts (:func:`owner_reason`).
Every wait is bounded: pushes are retried a bounded number of times, pulls never block a step
(``entity.pulls``), and a message nobody answers is dropped after its own bound (a lost goodbye
is logged, not waited on).
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message

from entity.jobs import EntityJobs, JobError, Offer, ServiceFault
from entity.journal import DELIVERED, DONE, PRUNING, QUEUED, REFUSED, JobJournal, JournalEntry
from entity.pulls import Puller
from entity.settings import STOP_FILE
from entity.workers import QueueFull, WorkerPool
from protocol.canonical import CanonicalJSONError
from protocol.contract import ADMITTED, FINISH, OFFER, RESULT, STATUS, Admission, Hello, JobStatus
from protocol.contract import REFUSED as REFUSED_MESSAGE
from protocol.errors import AdmissionError, ArtifactError, ReplayError, SealError, SignatureError
from protocol.flower_records import RecordError, blob_of, facts_of, pack
from protocol.spec import SpecError

MAX_REASON_CHARS = 300
MAX_ATTEMPTS = 3  # prunes of one job cut short by entity restarts before it is refused

# Refusal texts for causes that are not the owner's: fixed, because exception text of unknown
# origin may carry data read from the host (DESIGN.md, threat model).
INTERNAL_REFUSAL = "the entity failed while serving this request; its operator has the details in the event log"
SERVICE_REFUSAL = "the entity could not serve this request (its own storage failed); try again later"
UNDELIVERABLE_RESULT = "the entity could not deliver the pruned result (the SuperLink did not accept it)"

# Refusals about what the owner sent, in this project's own words: their text may go back as is.
OWNER_FAULTS = (JobError, RecordError, SpecError, SealError, SignatureError, AdmissionError, ReplayError, ArtifactError, CanonicalJSONError)


@dataclass(frozen=True)
class LoopTiming:
    """How the loop paces itself, and how long it waits for anything before giving up on it."""

    poll_seconds: float = 0.25
    max_backoff_seconds: float = 8.0
    push_attempts: int = 5
    offers_per_node: int = 3
    status_seconds: float = 5.0  # between two status messages to one waiting owner
    pull_wait_seconds: float = 0.2  # how long one step waits for its pull
    pull_stall_seconds: float = 10.0  # a pull running longer is left behind (entity.pulls)
    goodbye_seconds: float = 30.0  # a goodbye not pulled by then is logged as lost
    answer_seconds: float = 600.0  # an offer, admission or result nobody answered is dropped then
    stop_notice_seconds: float = 5.0  # how long a stopping loop waits for owners to take its notice


@dataclass
class Pending:
    node_id: int
    stage: str
    offer: Offer
    sent_at: float = 0.0


@dataclass
class Outgoing:
    message: Message
    pending: Pending
    attempts: int = 0


@dataclass
class Job:
    """An admitted job the loop follows: which node hears of it, and its status messages."""

    offer: Offer
    owner: str
    node_id: int | None
    seq: int = 0
    last_status: float = 0.0
    status_out: bool = False
    state: str = QUEUED
    checkpoint: bytes | None = field(default=None, repr=False)


class JobLoop:
    """The message state machine over all owners' jobs; no message, and no SuperLink hiccup, ends it."""

    def __init__(
        self,
        grid: Any,
        jobs: EntityJobs,
        card: bytes,
        timing: LoopTiming = LoopTiming(),
        *,
        pool: WorkerPool | None = None,
        journal: JobJournal | None = None,
        threads_per_job: int | None = None,
    ):
        self.grid = grid
        self.jobs = jobs
        self.card = card
        self.timing = timing
        home = jobs.events.path.parent
        self.pool = pool or WorkerPool(jobs.settings.worker_count(), jobs.settings.max_queued)
        self.journal = journal or JobJournal(home / "jobs.db", home / "jobs")
        self.threads_per_job = threads_per_job
        self.puller = Puller(self._pull_batch, wait_seconds=timing.pull_wait_seconds, stall_seconds=timing.pull_stall_seconds)
        self.pending: dict[str, Pending] = {}
        self.outbox: list[Outgoing] = []
        self.seen_nodes: set[int] = set()
        self.offers_made: dict[int, int] = {}
        self.active: dict[str, Job] = {}
        self.failures = 0
        self.stop_file = home / STOP_FILE
        self.stopping_since: float | None = None
        self.stop_notices: set[str] = set()  # jobs whose owners have not yet taken the stopping notice
        self.told: list[str] = []
        self.stop_logged = False

    # ------------------------------------------------------------------ events, sending, pacing

    def log(self, event: str, **fields: Any) -> None:
        """Write one event; a failing event log is reported on stderr and never stops the loop."""
        try:
            self.jobs.events.write(event, **fields)
        except Exception as exc:  # the log is the operator's record, not a reason to stop serving
            print(f"entity event log failed ({type(exc).__name__}); event {event!r} not recorded", file=sys.stderr)

    def log_error(self, where: str, pending: Pending | None, job_id: str | None = None) -> None:
        """The current exception's full traceback, for the operator's eyes only."""
        job: dict[str, Any] = {"job_id": pending.offer.job_id, "node_id": pending.node_id, "stage": pending.stage} if pending else {}
        if job_id is not None:
            job["job_id"] = job_id
        self.log("error", where=where, **job, trace=traceback.format_exc())

    def send(self, node_id: int, message_type: str, facts: dict, blob: bytes | None, stage: str, offer: Offer, ttl: float | None = None) -> None:
        """Queue a message; :meth:`flush` pushes it (and retries it if the push fails)."""
        message = Message(pack(facts, blob), dst_node_id=node_id, message_type=message_type, ttl=ttl)
        self.outbox.append(Outgoing(message, Pending(node_id, stage, offer)))

    def flush(self) -> bool:
        """Push every queued message once; False if any push failed (the SuperLink is struggling)."""
        healthy = True
        waiting, self.outbox = self.outbox, []
        for item in waiting:
            item.attempts += 1
            try:
                ids = list(self.grid.push_messages([item.message]))
            except Exception:
                self.log_error("push", item.pending)
                ids = []
            message_id = ids[0] if len(ids) == 1 else None
            if isinstance(message_id, str) and message_id:
                item.pending.sent_at = time.monotonic()
                self.pending[message_id] = item.pending
                continue
            healthy = False
            if item.attempts < self.timing.push_attempts:
                self.outbox.append(item)
                continue
            try:
                self.undeliverable(item.pending)
            except Exception:  # keep flushing the rest of the outbox
                self.log_error("undeliverable", item.pending)
        return healthy

    def undeliverable(self, pending: Pending) -> None:
        """A message the SuperLink would not take after every attempt: tell the owner if we still can."""
        self.log("undeliverable", job_id=pending.offer.job_id, node_id=pending.node_id, stage=pending.stage, attempts=self.timing.push_attempts)
        if pending.stage == "offer":
            self.retry_offer_later(pending.node_id)
        elif pending.stage == "result":
            self.refuse(pending, UNDELIVERABLE_RESULT)
        elif pending.stage == "status":
            self._status_answered(pending.offer.job_id)
        elif pending.stage == "stopping":
            self.stop_notices.discard(pending.offer.job_id)

    def retry_offer_later(self, node_id: int) -> None:
        """Let :meth:`admit_new_nodes` offer this node a job again, a bounded number of times."""
        if self.offers_made.get(node_id, 0) < self.timing.offers_per_node:
            self.seen_nodes.discard(node_id)
        else:
            self.log("node-abandoned", node_id=node_id, offers=self.offers_made.get(node_id, 0))

    def delay(self) -> float:
        """Seconds to wait before the next step: the poll interval, doubled per failed step, capped."""
        return min(self.timing.max_backoff_seconds, self.timing.poll_seconds * 2 ** min(self.failures, 32))

    # ------------------------------------------------------------------------------ the exchange

    def admit_new_nodes(self) -> None:
        for node_id in list(self.grid.get_node_ids()):
            if node_id in self.seen_nodes:
                continue
            self.seen_nodes.add(node_id)
            self.offers_made[node_id] = self.offers_made.get(node_id, 0) + 1
            try:
                offer = self.jobs.make_offer(node_id)
                self.send(node_id, OFFER, {"job_id": offer.job_id, "entity_card": self.card}, offer.blob, "offer", offer)
            except Exception:
                self.log("error", where="offer", node_id=node_id, trace=traceback.format_exc())
                self.retry_offer_later(node_id)

    def refuse(self, pending: Pending, reason: str) -> None:
        self.log("refused", job_id=pending.offer.job_id, node_id=pending.node_id, reason=reason)
        self.send(pending.node_id, REFUSED_MESSAGE, {"job_id": pending.offer.job_id, "reason": reason}, None, "refused", pending.offer)

    def finish(self, pending: Pending, outcome: str) -> None:
        self.send(pending.node_id, FINISH, {"job_id": pending.offer.job_id, "outcome": outcome}, None, "finish", pending.offer)

    def declined(self, pending: Pending, facts: dict) -> bool:
        """An owner may decline at any of its answers (a second offer, a bad admission): end the job."""
        if facts.get("status") != "declined":
            return False
        self.log("declined", job_id=pending.offer.job_id, node_id=pending.node_id, reason=_owner_text(facts.get("reason", "")))
        self.finish(pending, "declined")
        return True

    def on_hello(self, pending: Pending, reply: Message) -> None:
        """The owner's first answer: refuse it here, cheaply, or admit it before its model crosses."""
        job_id = pending.offer.job_id
        facts = facts_of(reply.content)
        if self.declined(pending, facts):
            return
        if facts.get("status") != "hello":
            raise JobError("the owner must answer an offer with its signed hello (status 'hello') before it sends anything else")
        hello, card = self.jobs.check_hello(pending.offer, blob_of(reply.content), facts.get("owner", ""))
        self.log("hello", job_id=job_id, node_id=pending.node_id, owner=card.fingerprint, owner_name=card.name, intent=hello.intent)
        if hello.intent == "resume":
            self.on_resume(pending, hello)
            return
        if hello.intent == "request":
            self.check_limits(hello)
        admission = Admission(job_id, card.fingerprint, hello.intent, self.pool.waiting, self.pool.workers, self.jobs.settings.max_request_bytes)
        self.send(pending.node_id, ADMITTED, {"job_id": job_id}, self.jobs.sign_admission(admission), "admitted", pending.offer)

    def check_limits(self, hello: Hello) -> None:
        """The refusals that need no model: too large, too many jobs of this owner, a full queue."""
        limit = self.jobs.settings.max_request_bytes
        if hello.request_bytes > limit:
            raise JobError(
                f"the model request is {hello.request_bytes / 2**20:.1f} MiB, over this entity's limit of {limit / 2**20:.0f} MiB;"
                " ask its operator to raise --max-request-mib"
            )
        most = self.jobs.settings.max_jobs_per_owner
        if self.journal.in_flight(hello.owner) >= most:
            raise JobError(f"this owner has {most} jobs queued or pruning already (the entity's limit); wait until one ends")
        if self.pool.full():
            raise JobError(f"the entity's queue is full ({self.pool.waiting} jobs waiting); try again in a few minutes")

    def on_resume(self, pending: Pending, hello: Hello) -> None:
        """Hand an earlier job of this owner to its new connection: its status now, its result when ready."""
        wanted = str(hello.resume_job)
        entry = self.journal.get(wanted)
        if entry is None or entry.owner != hello.owner:
            raise JobError(f"job {_owner_text(wanted)} is not known to this entity for this owner; start a new job with a fresh --out")
        if entry.state == REFUSED:
            self.refuse(pending, f"job {wanted} was refused: {entry.reason}")
            return
        if entry.state == DELIVERED:
            raise JobError(f"job {wanted} was delivered already; its verified result is in the owner's OUT/received/")
        # In the journal but not followed (its recovery at start-up failed): recover it now.
        job = self.active.get(wanted) or self._recover(entry)
        if job is None:
            refused = self.journal.get(wanted)
            self.refuse(pending, f"job {wanted} was refused: {refused.reason if refused else ''}")
            return
        job.node_id = pending.node_id
        self.log("resumed", job_id=wanted, node_id=pending.node_id, offer=pending.offer.job_id, state=entry.state)
        self.log("finished", job_id=pending.offer.job_id, node_id=pending.node_id, note=f"the owner resumed job {wanted}")
        if entry.state == DONE:
            self.deliver(job)
        else:
            job.status_out = False
            job.last_status = 0.0

    def on_request(self, pending: Pending, reply: Message) -> None:
        """The sealed request: opened and checked, stored in the journal, queued for a worker."""
        job_id = pending.offer.job_id
        facts = facts_of(reply.content)
        if self.declined(pending, facts):
            return
        if facts.get("status") == "noted":  # a check: the owner has its admission, and nothing crosses
            self.log("checked", job_id=job_id, node_id=pending.node_id)
            self.finish(pending, "checked")
            return
        blob = blob_of(reply.content)
        if len(blob) > self.jobs.settings.max_request_bytes:
            raise JobError(f"the model request is {len(blob) / 2**20:.1f} MiB, over this entity's limit; ask its operator to raise --max-request-mib")
        opened = self.jobs.open_request(pending.offer, blob)
        owner = opened.sender.fingerprint
        most = self.jobs.settings.max_jobs_per_owner
        if self.journal.in_flight(owner) >= most:  # checked at the hello too; several hellos may race
            raise JobError(f"this owner has {most} jobs queued or pruning already (the entity's limit); wait until one ends")
        checkpoint = facts.get("checkpoint")
        job = Job(pending.offer, owner, pending.node_id, checkpoint=checkpoint if isinstance(checkpoint, bytes) and checkpoint else None)
        try:
            self.journal.add(job_id, owner=owner, nonce=pending.offer.nonce, offer=pending.offer.blob, checkpoint=job.checkpoint, request=blob)
        except Exception as exc:
            raise ServiceFault("the entity could not store this request") from exc
        self.log("admitted", job_id=job_id, node_id=pending.node_id, owner=owner, owner_name=opened.sender.name, bytes=len(blob))
        self.enqueue(job)

    def enqueue(self, job: Job) -> None:
        """Give the job to the worker pool; a full queue is a refusal now, not a wait."""
        job_id = job.offer.job_id
        try:
            position = self.pool.submit(job_id, self._prune_call(job))
        except QueueFull as exc:
            self.journal.finish(job_id, REFUSED, f"{exc}; try again in a few minutes")
            if job.node_id is not None:
                self.refuse(Pending(job.node_id, "queued", job.offer), f"{exc}; try again in a few minutes")
            return
        self.active[job_id] = job
        self.log("queued", job_id=job_id, position=position, waiting=self.pool.waiting)

    def _prune_call(self, job: Job) -> Callable[[Callable[[dict], None]], tuple[bytes, dict]]:
        """What a worker runs: reopen the stored request (nothing big waits in memory), prune, seal."""
        jobs, journal, offer, threads = self.jobs, self.journal, job.offer, self.threads_per_job

        def run(progress: Callable[[dict], None]) -> tuple[bytes, dict]:
            blob = journal.request(offer.job_id)
            opened = jobs.open_request(offer, blob, redeem=False)

            def report(event: dict) -> None:
                progress(event)
                jobs.events.write("pruning", {**event, "phase": event.get("event"), "job_id": offer.job_id})

            return jobs.prune(offer, opened, blob, report, checkpoint=job.checkpoint, threads=threads)

        return run

    def collect(self) -> None:
        """Jobs the workers finished: store and send each result, or refuse with our reason."""
        for job_id, future in self.pool.finished():
            job = self.active.get(job_id)
            if job is None:
                continue
            try:
                blob, summary = future.result()
            except OWNER_FAULTS as exc:  # our words about what was sent; a sandbox failure's JobError is generic + error id
                self.fail(job, f"pruning failed: {owner_reason(exc)}")
                continue
            except Exception:  # an engine bug must not take the service down; its text stays in the event log
                try:
                    reason = self.jobs.record_failure(job_id, "pruning failed: internal error", traceback.format_exc())
                except Exception:  # the event log itself failed: still answer, with the fixed text
                    reason = INTERNAL_REFUSAL
                self.fail(job, reason)
                continue
            try:
                self.journal.store_result(job_id, blob)
            except Exception:
                self.log_error("store-result", None, job_id)
                self.fail(job, SERVICE_REFUSAL)
                continue
            job.state = DONE
            self.log("pruned", **summary)
            self.send_status(job, JobStatus(job_id, job.seq + 1, DONE))  # the result follows at once
            self.deliver(job, blob)

    def fail(self, job: Job, reason: str) -> None:
        job_id = job.offer.job_id
        self.active.pop(job_id, None)
        try:
            self.journal.finish(job_id, REFUSED, reason)
        except Exception:
            self.log_error("journal", None, job_id)
        if job.node_id is not None:
            self.refuse(Pending(job.node_id, "pruning", job.offer), reason)
        else:
            self.log("refused", job_id=job_id, reason=reason, note="the owner is not connected; it hears this when it resumes")

    def deliver(self, job: Job, blob: bytes | None = None) -> None:
        """Send the stored result to the job's node (a detached job waits for its owner to resume)."""
        if job.node_id is None:
            return
        if blob is None:
            blob = self.journal.result(job.offer.job_id)
        self.send(job.node_id, RESULT, {"job_id": job.offer.job_id}, blob, "result", job.offer)

    def send_statuses(self) -> None:
        """A signed status to every connected owner whose job waits or runs, one outstanding at a time."""
        now = time.monotonic()
        for job_id, job in self.active.items():
            if job.node_id is None or job.state == DONE or job.status_out:
                continue
            place = self.pool.place(job_id)
            if place is None:
                continue
            changed = place.state != job.state
            if not changed and now - job.last_status < self.timing.status_seconds:
                continue
            if changed and place.state == PRUNING:
                job.state = PRUNING
                self.journal.set_state(job_id, PRUNING, attempt=True)
            progress = place.progress
            percent = progress.get("percent")
            index, total = progress.get("index"), progress.get("total")
            if percent is None and isinstance(index, int) and isinstance(total, int) and total > 0:
                percent = 100 * index / total  # the engine's layer events: layer ``index`` of ``total``
            status = JobStatus(
                job_id,
                job.seq + 1,
                place.state,
                position=place.position,
                estimate_s=place.estimate_s,
                phase=str(progress.get("event", ""))[:64],
                layer=str(progress.get("layer", ""))[:200],
                percent=int(percent) if isinstance(percent, (int, float)) and 0 <= percent <= 100 else None,
                elapsed_s=place.elapsed_s,
            )
            job.last_status = now
            self.send_status(job, status)

    def send_status(self, job: Job, status: JobStatus, stage: str = "status") -> None:
        """One signed status to the job's node; the next waits until this one is answered or expires."""
        if job.node_id is None:
            return
        job.seq, job.status_out = status.seq, True
        ttl = max(10.0, 4 * self.timing.status_seconds)
        self.send(job.node_id, STATUS, {"job_id": status.job_id}, self.jobs.sign_status(status), stage, job.offer, ttl=ttl)

    def _status_answered(self, job_id: str) -> None:
        job = self.active.get(job_id)
        if job is not None:
            job.status_out = False

    def on_reply(self, pending: Pending, reply: Message) -> None:
        job_id = pending.offer.job_id
        if pending.stage == "status":
            self._status_answered(job_id)
            return
        if pending.stage == "stopping":
            self.stop_notices.discard(job_id)
            return
        if reply.has_error():
            if pending.stage == "finish":
                # The owner got the finish message and disconnected before its goodbye was pulled.
                self.log("finished", job_id=job_id, node_id=pending.node_id, note="owner left before its goodbye")
                return
            self.log("owner-error", job_id=job_id, node_id=pending.node_id, reason=_owner_text(reply.error.reason))
            if pending.stage == "result":
                return  # the result stays in the journal: the owner collects it when it resumes
            self.finish(pending, "error")
            return
        if pending.stage == "offer":
            self.on_hello(pending, reply)
        elif pending.stage == "admitted":
            self.on_request(pending, reply)
        elif pending.stage == "result":
            facts = facts_of(reply.content)
            self.log("delivered", job_id=job_id, node_id=pending.node_id, owner_status=_owner_text(facts.get("status", "")))
            self.active.pop(job_id, None)
            self.journal.finish(job_id, DELIVERED)
            self.finish(pending, "delivered")
        elif pending.stage == "refused":
            self.finish(pending, "refused")
        elif pending.stage == "finish":
            self.log("finished", job_id=job_id, node_id=pending.node_id)

    def dispatch(self, reply: Message) -> None:
        """Handle one pulled reply; whatever goes wrong ends that job cleanly, never the loop."""
        pending = None
        try:
            pending = self.pending.pop(reply.metadata.reply_to_message_id, None)
            if pending is None:
                self.log("stray-reply", node_id=reply.metadata.src_node_id, reply_to=_owner_text(reply.metadata.reply_to_message_id))
                return
            self.on_reply(pending, reply)
        except Exception as exc:
            if not isinstance(exc, OWNER_FAULTS):
                self.log_error("reply", pending)
            if pending is not None:
                self.close_after_failure(pending, exc)

    def close_after_failure(self, pending: Pending, exc: Exception) -> None:
        """End a job whose reply could not be handled, with a message the owner is waiting for."""
        try:
            if pending.stage in ("offer", "admitted"):
                self.refuse(pending, owner_reason(exc))
            elif pending.stage == "result":
                self.finish(pending, "error")
            elif pending.stage == "refused":
                self.finish(pending, "refused")
        except Exception:
            self.log_error("close", pending)

    def expire(self) -> None:
        """Drop what nobody answered in time, so that no wait is for ever (each is logged)."""
        now = time.monotonic()
        for message_id, pending in list(self.pending.items()):
            age = now - pending.sent_at
            job_id = pending.offer.job_id
            if pending.stage == "status" and age > max(10.0, 4 * self.timing.status_seconds):
                del self.pending[message_id]
                self._status_answered(job_id)
            elif pending.stage == "finish" and age > self.timing.goodbye_seconds:
                del self.pending[message_id]
                self.log(
                    "finished", job_id=job_id, node_id=pending.node_id, note=f"goodbye lost (not pulled within {self.timing.goodbye_seconds:g} s)"
                )
            elif age > self.timing.answer_seconds:
                del self.pending[message_id]
                self.log("unanswered", job_id=job_id, node_id=pending.node_id, stage=pending.stage, seconds=round(age))
                job = self.active.get(job_id)
                if job is not None and job.node_id == pending.node_id:
                    job.node_id = None  # the owner is gone; its job goes on and waits for it to resume
                if pending.stage in ("offer", "admitted", "refused"):
                    self.log("finished", job_id=job_id, node_id=pending.node_id, note="the owner never answered")

    # ------------------------------------------------------------------------- restart recovery

    def recover(self) -> list[str]:
        """After a restart: queue every job the journal holds unfinished again, or refuse it (none is forgotten)."""
        recovered = []
        for entry in list(self.journal.open_jobs()):
            try:
                if self._recover(entry) is not None and entry.job_id in self.active:
                    recovered.append(entry.job_id)
            except Exception:
                self.log_error("recover", None, entry.job_id)
        return recovered

    def _recover(self, entry: JournalEntry) -> Job | None:
        """Follow a journaled job again (queued anew, or waiting with its result); None: refused instead."""
        job = Job(Offer(entry.job_id, entry.nonce, entry.offer), entry.owner, None, state=entry.state, checkpoint=entry.checkpoint)
        if entry.state == DONE:
            self.active[entry.job_id] = job
            self.log("recovered", job_id=entry.job_id, state=DONE)
            return job
        if entry.attempts >= MAX_ATTEMPTS:
            reason = f"the entity restarted during this job {entry.attempts} times; start a new job"
            self.journal.finish(entry.job_id, REFUSED, reason)
            self.log("refused", job_id=entry.job_id, reason=reason)
            return None
        job.state = QUEUED
        self.journal.set_state(entry.job_id, QUEUED)
        self.log("recovered", job_id=entry.job_id, state=entry.state, attempts=entry.attempts)
        self.enqueue(job)
        return job

    # ------------------------------------------------------------------------------ the steps

    def _pull_batch(self, ids: list[str]) -> list[Message]:
        return list(self.grid.pull_messages(ids))

    def pull(self) -> list[Message] | None:
        """Replies that arrived; None if the SuperLink failed us (logged)."""
        if not self.pending and not self.puller.in_flight():
            return []

        def stalled(count: int, seconds: float) -> None:
            self.log("pull-stalled", messages=count, seconds=round(seconds, 1), note="left to finish on its own; the rest are pulled anew")

        replies, errors = self.puller.step(list(self.pending), on_stall=stalled)
        for error in errors:
            self.log("error", where="pull", trace="".join(traceback.format_exception(error)))
        return None if errors and not replies else replies

    def step(self) -> bool:
        """One pass: admit, collect finished jobs, statuses, push, pull, dispatch, push. False if the grid failed.

        Each part guards itself; this last guard keeps a bug in the loop's own bookkeeping from
        ending the service (it is logged, and the next step backs off).
        """
        try:
            healthy = self._step()
        except Exception:
            self.log_error("step", None)
            healthy = False
        self.failures = 0 if healthy else self.failures + 1
        return healthy

    def check_stop(self) -> bool:
        """Whether the operator is stopping the entity; the first time, tell each connected owner.

        ``entity.serve`` writes the stop file on SIGTERM or Ctrl-C and waits (briefly) for the
        ``stopped`` event before it ends the processes. Each owner gets a signed ``stopping``
        status, so it stops waiting at once, knowing its job is kept in the journal and resumes
        when the entity is back. New owners get no offer meanwhile.
        """
        if self.stopping_since is None:
            try:
                if not self.stop_file.exists():
                    return False
            except OSError:
                return False
            self.stopping_since = time.monotonic()
            for job_id, job in self.active.items():
                if job.node_id is not None:
                    self.send_status(job, JobStatus(job_id, job.seq + 1, "stopping", phase="the entity is shutting down"), stage="stopping")
                    self.stop_notices.add(job_id)
            self.told = sorted(self.stop_notices)
            self.log("stopping", jobs=len(self.active), told=len(self.told))
        elif not self.stop_logged and (not self.stop_notices or time.monotonic() - self.stopping_since >= self.timing.stop_notice_seconds):
            self.stop_logged = True
            self.log("stopped", told=len(self.told), unanswered=sorted(self.stop_notices))
        return True

    def _step(self) -> bool:
        healthy = True
        stopping = self.check_stop()
        parts = (self.collect, self.expire) if stopping else (self.admit_new_nodes, self.collect, self.send_statuses, self.expire)
        for part in parts:
            try:
                part()
            except Exception:
                self.log_error(part.__name__.replace("admit_new_nodes", "admit"), None)
                healthy = False
        healthy = self.flush() and healthy
        replies = self.pull()
        if replies is None:
            healthy, replies = False, []
        for reply in replies:
            self.dispatch(reply)
        return self.flush() and healthy

    def idle(self) -> bool:
        """Nothing pending, queued, running or unsent (for tests and an orderly stop)."""
        return not self.pending and not self.outbox and not self.active and not self.puller.in_flight()

    def close(self) -> None:
        self.pool.shutdown()
        self.puller.shutdown()


def owner_reason(exc: BaseException) -> str:
    """The refusal text an owner may see for ``exc``: ours, never text of unknown origin.

    The owner-fault exceptions carry texts written in this project about what the owner sent;
    anything else (an OS error, a library's message, a broken registry) may quote the host's
    paths or data, so it gets a fixed text and the operator reads the cause in the event log.
    """
    if isinstance(exc, OWNER_FAULTS):
        return _owner_text(str(exc))
    if isinstance(exc, ServiceFault):
        return SERVICE_REFUSAL
    return INTERNAL_REFUSAL


def _owner_text(value: Any) -> str:
    """One bounded line: for texts that go back to an owner or come from one into the event log."""
    text = " ".join(str(value).split())
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."


def threads_per_job(workers: int, cores: int | None = None) -> int:
    """Torch threads for each pruning process, so that the workers together fill the cores once."""
    return max(1, (cores or os.cpu_count() or 1) // max(1, workers))
