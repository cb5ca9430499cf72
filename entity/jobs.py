"""One pruning job on the entity side, Flower-free: offer, admit and open the request, prune, seal.

The entity learns exactly what the owner's request bundle holds (graph, weights, input spec,
pruning request) and nothing else; it prunes on synthetic inputs only. Every step is written to an
append-only event log that ``entity.serve`` renders and operators can keep.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from entity.sandbox import PruningFailed, PruningRefused, run_pruning
from entity.settings import EntitySettings
from protocol.artifact import check_program_files
from protocol.audit import countersign_checkpoint, make_receipt
from protocol.contract import (
    ADMISSION_KIND,
    HELLO_KIND,
    OFFER_KIND,
    REQUEST_KIND,
    RESULT_KIND,
    STATUS_KIND,
    Admission,
    Hello,
    JobStatus,
    ModelRequest,
    PruneResult,
)
from protocol.errors import ProtocolError, ReplayError, RequestError
from protocol.keys import Identity, IdentityCard, admit
from protocol.replay import NonceStore
from protocol.sealing import OpenedBundle, open_bundle, seal_bundle
from protocol.signing import digest, sign_message, verify_message
from protocol.spec import RetrainRecipe


class JobError(RuntimeError):
    """A request cannot be served (its one-line reason goes back to the owner)."""


def _request_of(opened: OpenedBundle) -> ModelRequest:
    """The opened bundle's request (``contract.ModelRequest``); its refusals are ``JobError``s."""
    try:
        return ModelRequest.from_files(opened.files)
    except RequestError as exc:
        raise JobError(str(exc)) from None


class ServiceFault(RuntimeError):
    """The entity itself failed while serving a request (its registry, nonce store or disk).

    Its text is fixed and says only that; the cause, which may name host paths, is chained for
    the event log and never goes back to the owner.
    """


class EventLog:
    """Append-only JSONL of service events; each line is flushed and fsynced before returning."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, event: str, fields: Mapping[str, Any] | None = None, **more: Any) -> None:
        """Append one event; ``fields`` may hold any keys (a pruning progress event's, say)."""
        record = {**(fields or {}), **more, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "event": event}
        line = json.dumps(record, sort_keys=True, default=str) + "\n"
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            size = os.fstat(fd).st_size
            # A writer killed mid-line left a torn last line: start on a fresh one, so this event
            # is not glued to it (and lost with it).
            torn = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
            os.write(fd, (b"\n" if torn else b"") + line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def open_jobs(self) -> list[str]:
        """Job ids this log shows offered but never finished (or closed as abandoned), oldest first."""
        open_ids: dict[str, None] = {}
        try:
            with open(self.path, "rb") as handle:
                for line in handle:
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue  # a torn last line from a killed writer
                    job = record.get("job_id") if isinstance(record, dict) else None
                    if not isinstance(job, str):
                        continue
                    if record.get("event") == "offered":
                        open_ids[job] = None
                    elif record.get("event") in ("finished", "abandoned"):
                        open_ids.pop(job, None)
        except FileNotFoundError:
            return []
        return list(open_ids)

    def close_abandoned(self, keep: Collection[str] = ()) -> list[str]:
        """At start-up: close every job a previous run of the service left open (killed mid-job),
        so that none stays open in the log for ever; ``keep`` are the jobs the journal resumes.
        Returns the ids closed."""
        abandoned = [job for job in self.open_jobs() if job not in keep]
        for job in abandoned:
            self.write("abandoned", job_id=job, reason="the entity stopped before this job ended; the owner must start a new job")
        return abandoned


@dataclass
class Offer:
    job_id: str
    nonce: str
    blob: bytes


class EntityJobs:
    """The entity's side of every job: state that outlives one owner (keys, registry, nonces).

    ``registry`` is read afresh for every request, so owners registered (or removed) while the
    service runs take effect at their next job.
    """

    def __init__(
        self,
        identity: Identity,
        registry: Callable[[], Mapping[str, IdentityCard]],
        nonces: NonceStore,
        events: EventLog,
        settings: EntitySettings | None = None,
    ):
        self.identity = identity
        self.registry = registry
        self.nonces = nonces
        self.events = events
        self.settings = settings if settings is not None else EntitySettings()
        # Where the pruning child runs: here (``run_pruning``), or a Ray task (``entity.ray_runner``).
        self.runner: Callable[..., Any] | None = None

    def make_offer(self, node_id: int) -> Offer:
        """A signed offer: job id, nonce, the entity's card fingerprint and what it supports."""
        from entity.pruning import DEFAULT_RECIPE, RECIPES

        job_id, nonce = self.nonces.issue()
        payload = {
            "job_id": job_id,
            "nonce": nonce,
            "entity": self.identity.card.fingerprint,
            "recipes": sorted(RECIPES),
            "default_recipe": self.settings.recipe or DEFAULT_RECIPE,
            "asks_for": ["model graph", "model weights", "input specification", "pruning request"],
        }
        blob = sign_message(payload, kind=OFFER_KIND, signer=self.identity)
        self.events.write("offered", job_id=job_id, node_id=node_id)
        return Offer(job_id, nonce, blob)

    def check_hello(self, offer: Offer, blob: bytes, claimed_owner: str) -> tuple[Hello, IdentityCard]:
        """The owner's signed hello for ``offer``: a registered owner, its signature, this offer.

        Cheap and before any model crosses: an owner that is not registered learns it here, with
        the fix, instead of after sending its whole model.
        """
        if not isinstance(claimed_owner, str) or not claimed_owner.isprintable() or len(claimed_owner) > 128:
            raise JobError("the hello names no owner fingerprint")
        card = admit(claimed_owner, dict(self._senders()))
        try:
            hello = Hello.from_json(verify_message(blob, kind=HELLO_KIND, signer=card))
        except RequestError as exc:
            raise JobError(str(exc)) from None
        if hello.job_id != offer.job_id or hello.nonce != offer.nonce or hello.owner != card.fingerprint:
            raise JobError("the hello does not answer the offer it was sent for (job id, nonce or owner differ)")
        return hello, card

    def sign_admission(self, admission: Admission) -> bytes:
        return sign_message(admission.to_json(), kind=ADMISSION_KIND, signer=self.identity)

    def sign_status(self, status: JobStatus) -> bytes:
        return sign_message(status.to_json(), kind=STATUS_KIND, signer=self.identity)

    def open_request(self, offer: Offer, blob: bytes, *, redeem: bool = True) -> OpenedBundle:
        """Admit the sender, open and verify its bundle, and check it answers this offer exactly once.

        ``redeem=False`` reopens a request the journal stored (its nonce was redeemed when it
        first arrived), to prune it again after the service restarted.

        Everything the owner controls is refused with ``JobError`` (or the ``ProtocolError`` of
        the failed check), whose one-line text is ours and may go back to the owner; a failure
        of the entity's own registry or nonce store is a ``ServiceFault``, whose cause (paths,
        OS errors) stays in the event log.
        """
        opened = open_bundle(
            blob,
            kind=REQUEST_KIND,
            job_id=offer.job_id,
            request_hash=digest(offer.blob),
            recipient=self.identity,
            senders=self._senders(),
        )
        request = _request_of(opened)
        if request.job_id != offer.job_id or request.nonce != offer.nonce:
            raise JobError("request does not answer the offer it was sent for (job id or nonce differ)")
        if not redeem:
            return opened
        try:
            self.nonces.redeem(offer.job_id, offer.nonce)
        except ReplayError as exc:
            # A replay is the owner's doing; a nonce store that cannot be written is ours.
            if isinstance(exc.__cause__, OSError):
                raise ServiceFault("the entity could not record this request") from exc
            raise
        return opened

    def _senders(self) -> Mapping[str, IdentityCard]:
        """The registered owners' cards, read afresh; a broken registry is the entity's fault."""
        try:
            return self.registry()
        except (ProtocolError, OSError) as exc:
            raise ServiceFault("the entity could not read its owner registry") from exc

    def record_failure(self, job_id: str, reason: str, detail: str) -> str:
        """Log a failure's full text under a new error id; return what the owner may read.

        Exception text from pruning can quote anything the process touched, so the owner gets
        only our generic ``reason`` and the id an operator can look up in the event log.
        """
        error_id = secrets.token_hex(6)
        self.events.write("error", job_id=job_id, error_id=error_id, reason=reason, detail=detail[-16_000:])
        return f"{reason} (error id {error_id}; the entity's operator can look it up)"

    def prune(
        self,
        offer: Offer,
        opened: OpenedBundle,
        request_blob: bytes,
        progress: Callable[[dict], None] | None = None,
        *,
        checkpoint: bytes | None = None,
        threads: int | None = None,
    ) -> tuple[bytes, dict]:
        """Prune the opened request's model and seal the result to its owner: (sealed blob, summary).

        The result's ``request_hash`` is the hash of the exact request bytes it answers, which the
        owner also holds, so a result cannot be replayed as the answer to another request.
        ``checkpoint`` is the owner's signed audit checkpoint taken after it recorded this request;
        the entity countersigns it (a bad one is refused like a bad request).

        The received graph is checked here (``check_program_files``: op allow-list and sizes,
        before any torch code sees it) and then pruned in a child process that gets only the
        artifact bytes, the spec and the engine config (``entity.sandbox``), within the
        ``settings.sandbox`` limits (the operator's ``--prune-memory-gib`` / ``--prune-timeout``);
        signing and sealing stay here. A failure in the child reaches
        the owner as our generic reason and an error id, its text only the event log.
        """
        from entity.pruning import DEFAULT_RECIPE, PruneConfig

        started = time.perf_counter()
        request = _request_of(opened)
        spec, wanted, artifact = request.spec, request.prune, dict(request.artifact)
        check_program_files(artifact)  # graph and sizes refused here, before any torch code runs on them
        recipe = wanted.recipe or self.settings.recipe or DEFAULT_RECIPE
        # The operator's engine settings and options for this recipe, then what the owner asked for.
        kwargs: dict[str, Any] = {
            **self.settings.prune_options(recipe),
            "rate": wanted.rate,
            "skip_layers": list(wanted.skip_layers),
            "recipe": recipe,
        }
        if wanted.model_rate is not None:
            kwargs["model_rate"] = wanted.model_rate
        try:
            checked: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
            PruneConfig(**checked)
        except (TypeError, ValueError) as exc:
            raise JobError(f"pruning request not supported: {exc}") from exc
        # The graph runs in a child process that holds no key; a failure's text stays in our log.
        try:
            result = (self.runner or run_pruning)(
                artifact,
                spec.to_json(),
                kwargs,
                progress,
                self.settings.sandbox,
                on_confined=lambda line: self.events.write("sandbox", job_id=offer.job_id, filesystem=line),
                torch_threads=threads,
            )
        except PruningRefused as exc:
            raise JobError(str(exc)) from None
        except PruningFailed as exc:
            raise JobError(self.record_failure(offer.job_id, exc.reason, exc.detail)) from None
        retrain = RetrainRecipe() if self.settings.epochs is None else RetrainRecipe(epochs=self.settings.epochs)
        report = dict(result.report)
        report["job_id"] = offer.job_id
        report["received"] = {"files": dict(opened.file_digests()), "input_spec": spec.to_json(), "request": wanted.to_json()}
        report["entity_seconds"] = str(round(time.perf_counter() - started, 3))
        countersignature = None
        if checkpoint:
            countersignature = countersign_checkpoint(checkpoint, owner=opened.sender, entity=self.identity)
        files = PruneResult(
            result.state_dict,
            result.masks,
            report,
            retrain,
            receipt=make_receipt(opened, entity=self.identity, job_id=offer.job_id),
            countersignature=countersignature,
        ).files()
        blob = seal_bundle(
            files,
            kind=RESULT_KIND,
            job_id=offer.job_id,
            request_hash=digest(request_blob),
            sender=self.identity,
            recipient=opened.sender,
        )
        summary = {
            "job_id": offer.job_id,
            "owner": opened.sender.fingerprint,
            "recipe": report.get("recipe"),
            "achieved_rate": report.get("achieved_rate"),
            "bytes_received": sum(len(v) for v in opened.files.values()),
            "bytes_sent": len(blob),
        }
        return blob, summary
