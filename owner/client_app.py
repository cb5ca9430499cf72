"""The owner's own Flower ClientApp: one thin handler per message type, all logic in the session.

``build_client_app(session)`` is what ``owner.run`` executes through its own executor. The
module-level ``app`` is what a stock SuperNode would load from the entity's app bundle; it serves
nothing and says why, because a stock SuperNode runs whatever bundle the server side sends.
"""
from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from owner.session import OwnerSession, SessionError
from protocol.errors import ProtocolError
from protocol.flower_records import RecordError, blob_of, facts_of, pack


def _decline(msg: Message, reason: str) -> Message:
    return Message(pack({"status": "declined", "reason": reason}), reply_to=msg)


def build_client_app(session: OwnerSession) -> ClientApp:
    app = ClientApp()

    @app.query("offer")
    def offer(msg: Message, context: Context) -> Message:
        facts = facts_of(msg.content)
        card = facts.get("entity_card")
        try:
            offer_blob = blob_of(msg.content)
        except RecordError as exc:
            session.refusal = f"the entity's offer is malformed: {exc}"
            return _decline(msg, session.refusal)
        try:
            sealed = session.answer_offer(offer_blob, card if isinstance(card, bytes) else None)
        except (SessionError, ProtocolError) as exc:
            session.refusal = str(exc)
            return _decline(msg, str(exc))
        facts = {"status": "request", "owner": session.identity.card.fingerprint, "checkpoint": session.sent_checkpoint or b""}
        return Message(pack(facts, sealed), reply_to=msg)

    @app.query("result")
    def result(msg: Message, context: Context) -> Message:
        try:
            ack = session.receive_result(blob_of(msg.content))
        except (SessionError, ProtocolError, RecordError) as exc:
            session.refusal = str(exc)
            return Message(pack({"status": "rejected", "reason": str(exc)}), reply_to=msg)
        return Message(pack(ack), reply_to=msg)

    @app.query("refused")
    def refused(msg: Message, context: Context) -> Message:
        session.refused(str(facts_of(msg.content).get("reason", "no reason given")))
        return Message(pack({"status": "noted"}), reply_to=msg)

    @app.query("finish")
    def finish(msg: Message, context: Context) -> Message:
        session.finish(str(facts_of(msg.content).get("outcome", "")))
        return Message(pack({"status": "bye"}), reply_to=msg)

    return app


app = ClientApp()


@app.query()
def _stock_supernode(msg: Message, context: Context) -> Message:
    return _decline(msg, "blindprune owners run `python -m owner.run`; this bundle's ClientApp serves nothing")
