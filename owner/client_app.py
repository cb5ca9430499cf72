"""The owner's own Flower ClientApp: one thin handler per message type, all logic in the session.

``build_client_app(session)`` is what ``owner.run`` executes through its own executor. The
module-level ``app`` is what a stock SuperNode would load from the entity's app bundle; it serves
nothing and says why, because a stock SuperNode runs whatever bundle the server side sends.

Whatever the entity sends, a handler answers: a malformed record, a second offer or a message
type the owner does not serve is declined with a reason, never an exception that would end the
owner's run (an exception in a handler fails the task, and the executor with it).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from owner.session import OwnerSession, SessionError
from protocol.contract import MESSAGE_TYPES
from protocol.display import printable
from protocol.errors import ProtocolError
from protocol.flower_records import RecordError, blob_of, facts_of, pack

SERVED = MESSAGE_TYPES


def _decline(msg: Message, reason: str) -> Message:
    return Message(pack({"status": "declined", "reason": reason}), reply_to=msg)


def _text_fact(msg: Message, key: str, default: str) -> str:
    """One text fact of a message, or ``default`` when the record is missing, malformed or not text."""
    try:
        value = facts_of(msg.content).get(key, default)
    except RecordError:
        return default
    return value if isinstance(value, str) else default


class _OwnerClientApp(ClientApp):
    """A ClientApp that declines message types it does not serve instead of raising.

    A stock ``ClientApp`` raises ``ValueError`` for an unregistered type, which would fail the
    task and stop the owner's executor: one stray message from the entity would end the job.
    """

    def __call__(self, message: Message, context: Context) -> Message:
        kind = message.metadata.message_type
        if kind not in SERVED:
            return _decline(message, f"the owner serves only {', '.join(sorted(SERVED))}, not {printable(kind, 64)}")
        return super().__call__(message, context)


def build_client_app(session: OwnerSession) -> ClientApp:
    app = _OwnerClientApp()

    @app.query("offer")
    def offer(msg: Message, context: Context) -> Message:
        if session.offer_job is not None:
            # The job under way goes on; this offer neither starts another nor becomes its failure reason.
            return _decline(msg, f"job {session.offer_job} is under way; one offer per run")
        try:
            card = facts_of(msg.content).get("entity_card")
            offer_blob = blob_of(msg.content)
        except RecordError as exc:
            session.refusal = f"the entity's offer is malformed: {exc}"
            return _decline(msg, session.refusal)
        try:
            hello = session.answer_offer(offer_blob, card if isinstance(card, bytes) else None)
        except (SessionError, ProtocolError) as exc:
            session.refusal = printable(exc, 400)
            return _decline(msg, session.refusal)
        return Message(pack({"status": "hello", "owner": session.identity.card.fingerprint}, hello), reply_to=msg)

    @app.query("admitted")
    def admitted(msg: Message, context: Context) -> Message:
        try:
            sealed = session.answer_admission(blob_of(msg.content))
        except (SessionError, ProtocolError, RecordError) as exc:
            session.refusal = printable(exc, 400)
            return _decline(msg, session.refusal)
        if sealed is None:  # a check: the owner knows it is admitted, and nothing more leaves
            return Message(pack({"status": "noted"}), reply_to=msg)
        facts: dict[str, str | int | bytes | bool] = {
            "status": "request",
            "owner": session.identity.card.fingerprint,
            "checkpoint": session.sent_checkpoint or b"",
        }
        return Message(pack(facts, sealed), reply_to=msg)

    @app.query("status")
    def status(msg: Message, context: Context) -> Message:
        # A status that fails its checks is ignored, never the job's end: liveness is decided by time.
        try:
            session.receive_status(blob_of(msg.content))
        except (SessionError, ProtocolError, RecordError) as exc:
            return Message(pack({"status": "ignored", "reason": printable(exc, 200)}), reply_to=msg)
        return Message(pack({"status": "noted"}), reply_to=msg)

    @app.query("result")
    def result(msg: Message, context: Context) -> Message:
        try:
            ack = session.receive_result(blob_of(msg.content))
        except (SessionError, ProtocolError, RecordError) as exc:
            session.refusal = printable(exc, 400)
            return Message(pack({"status": "rejected", "reason": session.refusal}), reply_to=msg)
        return Message(pack(ack), reply_to=msg)

    @app.query("refused")
    def refused(msg: Message, context: Context) -> Message:
        session.refused(_text_fact(msg, "reason", "no reason given"))
        return Message(pack({"status": "noted"}), reply_to=msg)

    @app.query("finish")
    def finish(msg: Message, context: Context) -> Message:
        session.finish(_text_fact(msg, "outcome", ""))
        return Message(pack({"status": "bye"}), reply_to=msg)

    return app


app = ClientApp()


@app.query()
def _stock_supernode(msg: Message, context: Context) -> Message:
    return _decline(msg, "blindprune owners run `python -m owner.run`; this bundle's ClientApp serves nothing")
