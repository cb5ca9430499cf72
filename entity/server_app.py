"""The entity's Flower ServerApp: a long-lived loop that gives every connecting owner its own job.

Thin by design: it turns Flower messages into calls on :class:`entity.jobs.EntityJobs` and back.
One job is a fixed exchange (offer -> request, result -> ack, finish -> bye); a refused or failed
request is answered with ``query.refused`` and its reason, so the owner never waits on silence.
The loop pushes messages and pulls replies itself (rather than ``send_and_receive``, which polls
every 3 s) and never ends on its own: ``entity.serve`` stops it.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from entity.jobs import EntityJobs, EventLog, JobError, Offer, ServiceFault
from entity.settings import read_settings
from protocol.canonical import CanonicalJSONError
from protocol.contract import FINISH, OFFER, REFUSED, RESULT
from protocol.errors import AdmissionError, ArtifactError, ReplayError, SealError, SignatureError
from protocol.flower_records import RecordError, blob_of, facts_of, pack
from protocol.keys import load_identity, load_registry
from protocol.replay import NonceStore
from protocol.spec import SpecError

app = ServerApp()

MAX_REASON_CHARS = 300

# Refusal texts for causes that are not the owner's: fixed, because exception text of unknown
# origin may carry data read from the host (DESIGN.md, threat model).
INTERNAL_REFUSAL = "the entity failed while serving this request; its operator has the details in the event log"
SERVICE_REFUSAL = "the entity could not serve this request (its own storage failed); try again later"
UNDELIVERABLE_RESULT = "the entity could not deliver the pruned result (the SuperLink did not accept it)"

# Refusals about what the owner sent, in this project's own words: their text may go back as is.
OWNER_FAULTS = (JobError, RecordError, SpecError, SealError, SignatureError, AdmissionError, ReplayError, ArtifactError, CanonicalJSONError)


@dataclass(frozen=True)
class LoopTiming:
    """How the loop paces itself: polling, backing off while the SuperLink fails, retrying pushes."""

    poll_seconds: float = 0.25
    max_backoff_seconds: float = 8.0
    push_attempts: int = 5
    offers_per_node: int = 3


@dataclass
class Pending:
    node_id: int
    stage: str
    offer: Offer


@dataclass
class Outgoing:
    message: Message
    pending: Pending
    attempts: int = 0


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


class JobLoop:
    """The message state machine over all owners' jobs; no message, and no SuperLink hiccup, ends it.

    Every pulled reply goes through one guarded dispatch (:meth:`dispatch`): whatever its handler
    raises is written to the event log with its traceback and turns into a refusal (or a finish)
    to that owner, never into an exit that would stop the service for everyone. What goes back
    is one of our own texts (:func:`owner_reason`): exception text of unknown origin may carry
    data read from the host. Pushes that fail stay in an outbox and are retried at the next
    steps a bounded number of times; when the SuperLink fails, :meth:`delay` backs off.
    """

    def __init__(self, grid: Grid, jobs: EntityJobs, card: bytes, timing: LoopTiming = LoopTiming()):
        self.grid = grid
        self.jobs = jobs
        self.card = card
        self.timing = timing
        self.pending: dict[str, Pending] = {}
        self.outbox: list[Outgoing] = []
        self.seen_nodes: set[int] = set()
        self.offers_made: dict[int, int] = {}
        self.failures = 0

    # ------------------------------------------------------------------ events, sending, pacing

    def log(self, event: str, **fields: Any) -> None:
        """Write one event; a failing event log is reported on stderr and never stops the loop."""
        try:
            self.jobs.events.write(event, **fields)
        except Exception as exc:  # the log is the operator's record, not a reason to stop serving
            print(f"entity event log failed ({type(exc).__name__}); event {event!r} not recorded", file=sys.stderr)

    def log_error(self, where: str, pending: Pending | None) -> None:
        """The current exception's full traceback, for the operator's eyes only."""
        job = {"job_id": pending.offer.job_id, "node_id": pending.node_id, "stage": pending.stage} if pending else {}
        self.log("error", where=where, **job, trace=traceback.format_exc())

    def send(self, node_id: int, message_type: str, facts: dict, blob: bytes | None, stage: str, offer: Offer) -> None:
        """Queue a message; :meth:`flush` pushes it (and retries it if the push fails)."""
        message = Message(pack(facts, blob), dst_node_id=node_id, message_type=message_type)
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
        self.send(pending.node_id, REFUSED, {"job_id": pending.offer.job_id, "reason": reason}, None, "refused", pending.offer)

    def finish(self, pending: Pending, outcome: str) -> None:
        self.send(pending.node_id, FINISH, {"job_id": pending.offer.job_id, "outcome": outcome}, None, "finish", pending.offer)

    def on_request(self, pending: Pending, reply: Message) -> None:
        job_id, events = pending.offer.job_id, self.jobs.events
        facts = facts_of(reply.content)
        if facts.get("status") == "declined":
            self.log("declined", job_id=job_id, node_id=pending.node_id, reason=_owner_text(facts.get("reason", "")))
            self.finish(pending, "declined")
            return
        try:
            blob = blob_of(reply.content)
            opened = self.jobs.open_request(pending.offer, blob)
        except OWNER_FAULTS as exc:
            self.refuse(pending, owner_reason(exc))
            return
        self.log("admitted", job_id=job_id, node_id=pending.node_id, owner=opened.sender.fingerprint, owner_name=opened.sender.name, bytes=len(blob))

        def progress(event: dict) -> None:
            events.write("pruning", {**event, "phase": event.get("event"), "job_id": job_id})

        checkpoint = facts.get("checkpoint")
        try:
            result, summary = self.jobs.prune(pending.offer, opened, blob, progress, checkpoint=checkpoint if isinstance(checkpoint, bytes) else None)
        except OWNER_FAULTS as exc:  # our words about what was sent; a sandbox failure's JobError is generic + error id
            self.refuse(pending, f"pruning failed: {owner_reason(exc)}")
            return
        except Exception:  # an engine bug must not take the service down; its text stays in the event log
            try:
                reason = self.jobs.record_failure(job_id, "pruning failed: internal error", traceback.format_exc())
            except Exception:  # the event log itself failed: still answer, with the fixed text
                reason = INTERNAL_REFUSAL
            self.refuse(pending, reason)
            return
        self.log("pruned", **summary)
        self.send(pending.node_id, RESULT, {"job_id": job_id}, result, "result", pending.offer)

    def on_reply(self, pending: Pending, reply: Message) -> None:
        job_id = pending.offer.job_id
        if reply.has_error():
            if pending.stage == "finish":
                # The owner got the finish message and disconnected before its goodbye was pulled.
                self.log("finished", job_id=job_id, node_id=pending.node_id, note="owner left before its goodbye")
                return
            self.log("owner-error", job_id=job_id, node_id=pending.node_id, reason=_owner_text(reply.error.reason))
            self.finish(pending, "error")
            return
        if pending.stage == "offer":
            self.on_request(pending, reply)
        elif pending.stage == "result":
            facts = facts_of(reply.content)
            self.log("delivered", job_id=job_id, node_id=pending.node_id, owner_status=_owner_text(facts.get("status", "")))
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
            self.log_error("reply", pending)
            if pending is not None:
                self.close_after_failure(pending, exc)

    def close_after_failure(self, pending: Pending, exc: Exception) -> None:
        """End a job whose reply could not be handled, with a message the owner is waiting for."""
        try:
            if pending.stage == "offer":
                self.refuse(pending, owner_reason(exc))
            elif pending.stage == "result":
                self.finish(pending, "error")
            elif pending.stage == "refused":
                self.finish(pending, "refused")
        except Exception:
            self.log_error("close", pending)

    def pull(self) -> list[Message] | None:
        """Replies to what is pending; None if the SuperLink failed us (logged)."""
        if not self.pending:
            return []
        try:
            return list(self.grid.pull_messages(list(self.pending)))
        except Exception:
            self.log_error("pull", None)
            return None

    def step(self) -> bool:
        """One pass: admit new nodes, push, pull, dispatch every reply, push. False if the grid failed.

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

    def _step(self) -> bool:
        healthy = True
        try:
            self.admit_new_nodes()
        except Exception:
            self.log_error("admit", None)
            healthy = False
        healthy = self.flush() and healthy
        replies = self.pull()
        if replies is None:
            healthy, replies = False, []
        for reply in replies:
            self.dispatch(reply)
        return self.flush() and healthy


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


@app.main()
def main(grid: Grid, context: Context) -> None:
    jobs = entity_from_config(dict(context.run_config))
    loop = JobLoop(grid, jobs, jobs.identity.card.to_bytes())
    try:
        owners: int | str = len(jobs.registry())
    except Exception as exc:  # read afresh for every request: the operator can still fix it
        owners = f"unreadable ({type(exc).__name__})"
    loop.log("service-started", entity=jobs.identity.card.fingerprint, owners=owners)
    try:
        jobs.events.close_abandoned()
    except OSError as exc:  # the log is for the operator: the service still serves
        print(f"entity: cannot close the jobs an earlier run left open: {exc}", file=sys.stderr)
    while True:
        loop.step()
        time.sleep(loop.delay())
