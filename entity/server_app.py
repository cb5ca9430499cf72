"""The entity's Flower ServerApp: a long-lived loop that gives every connecting owner its own job.

Thin by design: it turns Flower messages into calls on :class:`entity.jobs.EntityJobs` and back.
One job is a fixed exchange (offer -> request, result -> ack, finish -> bye); a refused or failed
request is answered with ``query.refused`` and its reason, so the owner never waits on silence.
The loop pushes messages and pulls replies itself (rather than ``send_and_receive``, which polls
every 3 s) and never ends on its own: ``entity.serve`` stops it.
"""
from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from entity.jobs import EntityJobs, EntitySettings, EventLog, JobError, Offer
from protocol.errors import ProtocolError
from protocol.flower_records import FINISH, OFFER, REFUSED, RESULT, RecordError, blob_of, facts_of, pack
from protocol.keys import load_identity, load_registry
from protocol.replay import NonceStore

app = ServerApp()

POLL_SECONDS = 0.25


@dataclass
class Pending:
    node_id: int
    stage: str
    offer: Offer


def entity_from_config(run_config: dict) -> EntityJobs:
    """Build the entity's job handler from the run configuration written by ``entity.serve``."""
    home = Path(str(run_config["home"]))
    epochs = int(run_config.get("epochs", -1))
    options = {key: int(run_config[key]) for key in ("synthetic_images", "synthetic_steps") if int(run_config.get(key, 0)) > 0}
    settings = EntitySettings(
        recipe=str(run_config.get("recipe", "")) or None,
        device=str(run_config.get("device", "cpu")),
        epochs=None if epochs < 0 else epochs,
        options=options,
    )
    return EntityJobs(
        identity=load_identity(home / "keys"),
        registry=lambda: load_registry(Path(str(run_config["owners"]))),
        nonces=NonceStore(home / "nonces.jsonl"),
        events=EventLog(home / "events.jsonl"),
        settings=settings,
    )


class JobLoop:
    """The message state machine over all owners' jobs."""

    def __init__(self, grid: Grid, jobs: EntityJobs, card: bytes):
        self.grid = grid
        self.jobs = jobs
        self.card = card
        self.pending: dict[str, Pending] = {}
        self.seen_nodes: set[int] = set()

    def send(self, node_id: int, message_type: str, facts: dict, blob: bytes | None, stage: str, offer: Offer) -> None:
        message = Message(pack(facts, blob), dst_node_id=node_id, message_type=message_type)
        for message_id in self.grid.push_messages([message]):
            self.pending[message_id] = Pending(node_id, stage, offer)

    def admit_new_nodes(self) -> None:
        for node_id in self.grid.get_node_ids():
            if node_id in self.seen_nodes:
                continue
            self.seen_nodes.add(node_id)
            offer = self.jobs.make_offer(node_id)
            self.send(node_id, OFFER, {"job_id": offer.job_id, "entity_card": self.card}, offer.blob, "offer", offer)

    def refuse(self, pending: Pending, reason: str) -> None:
        self.jobs.events.write("refused", job_id=pending.offer.job_id, node_id=pending.node_id, reason=reason)
        self.send(pending.node_id, REFUSED, {"job_id": pending.offer.job_id, "reason": reason}, None, "refused", pending.offer)

    def finish(self, pending: Pending, outcome: str) -> None:
        self.send(pending.node_id, FINISH, {"job_id": pending.offer.job_id, "outcome": outcome}, None, "finish", pending.offer)

    def on_request(self, pending: Pending, reply: Message) -> None:
        job_id, events = pending.offer.job_id, self.jobs.events
        facts = facts_of(reply.content)
        if facts.get("status") == "declined":
            events.write("declined", job_id=job_id, node_id=pending.node_id, reason=str(facts.get("reason", "")))
            self.finish(pending, "declined")
            return
        try:
            blob = blob_of(reply.content)
            opened = self.jobs.open_request(pending.offer, blob)
        except (ProtocolError, JobError, RecordError) as exc:
            self.refuse(pending, str(exc))
            return
        events.write("admitted", job_id=job_id, node_id=pending.node_id, owner=opened.sender.fingerprint,
                     owner_name=opened.sender.name, bytes=len(blob))

        def progress(event: dict) -> None:
            events.write("pruning", {**event, "phase": event.get("event"), "job_id": job_id})

        try:
            checkpoint = facts.get("checkpoint")
            result, summary = self.jobs.prune(pending.offer, opened, blob, progress,
                                              checkpoint=checkpoint if isinstance(checkpoint, bytes) else None)
        except (ProtocolError, JobError, ValueError) as exc:
            self.refuse(pending, f"pruning failed: {exc}")
            return
        except Exception as exc:  # an engine bug must not take the service down
            events.write("error", job_id=job_id, trace=traceback.format_exc(limit=5))
            self.refuse(pending, f"pruning failed: {type(exc).__name__}: {exc}")
            return
        events.write("pruned", **summary)
        self.send(pending.node_id, RESULT, {"job_id": job_id}, result, "result", pending.offer)

    def on_reply(self, reply: Message) -> None:
        pending = self.pending.pop(reply.metadata.reply_to_message_id, None)
        if pending is None:
            return
        job_id = pending.offer.job_id
        if reply.has_error():
            if pending.stage == "finish":
                # The owner got the finish message and disconnected before its goodbye was pulled.
                self.jobs.events.write("finished", job_id=job_id, node_id=pending.node_id, note="owner left before its goodbye")
                return
            self.jobs.events.write("owner-error", job_id=job_id, node_id=pending.node_id, reason=reply.error.reason)
            self.finish(pending, "error")
            return
        if pending.stage == "offer":
            self.on_request(pending, reply)
        elif pending.stage == "result":
            facts = facts_of(reply.content)
            self.jobs.events.write("delivered", job_id=job_id, node_id=pending.node_id, owner_status=str(facts.get("status", "")))
            self.finish(pending, "delivered")
        elif pending.stage == "refused":
            self.finish(pending, "refused")
        elif pending.stage == "finish":
            self.jobs.events.write("finished", job_id=job_id, node_id=pending.node_id)

    def step(self) -> None:
        self.admit_new_nodes()
        if self.pending:
            for reply in self.grid.pull_messages(list(self.pending)):
                self.on_reply(reply)


@app.main()
def main(grid: Grid, context: Context) -> None:
    jobs = entity_from_config(dict(context.run_config))
    jobs.events.write("service-started", entity=jobs.identity.card.fingerprint, owners=len(jobs.registry()))
    loop = JobLoop(grid, jobs, jobs.identity.card.to_bytes())
    while True:
        loop.step()
        time.sleep(POLL_SECONDS)
