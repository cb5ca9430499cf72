"""The owner's side of one job, Flower-free: answer the offer, receive and verify the result.

Order of every outbound step: build the payload from the model artifact and the request, pass it
through the egress guard, seal it to the pinned entity card, record the transfer in the audit log
(with the data facts that crossed), checkpoint, and only then hand the bytes to Flower. Inbound:
open and verify against the pinned card before anything is parsed, then check the content as
strictly as the entity checks a request (DESIGN "Threat model": a malicious or broken entity):
every tensor finite and in the model's schema, BatchNorm variances positive, masks only on 3x3
convolution weights and only library patterns at the claimed rate, a recipe within the owner's
limits, bounded JSON. Only a result that passes all of it is recorded as received; a failing one
is recorded as refused. Text from the entity is escaped (``protocol.display``) before it is kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from protocol import canonical
from protocol.artifact import PROGRAM_FILE, WEIGHTS_FILE, dump_tensors, program_to_files
from protocol.audit import EV_BLOCKED, EV_REFUSED, AuditLog
from protocol.contract import (
    ADMISSION_KIND,
    COUNTERSIGNATURE_FILE,
    HELLO_KIND,
    MAX_ID_CHARS,
    OFFER_KIND,
    RECEIPT_FILE,
    RECIPE_FILE,
    REPORT_FILE,
    REQUEST_KIND,
    RESULT_KIND,
    STATUS_KIND,
    Admission,
    Hello,
    JobStatus,
    ModelRequest,
    PruneResult,
)
from protocol.display import printable
from protocol.egress import DATA_COUNTERS, EgressGuard, redact_counters, schema_of
from protocol.errors import EgressViolation, ProtocolError
from protocol.keys import Identity, IdentityCard
from protocol.program_guard import check_program
from protocol.replay import NonceStore
from protocol.sealing import open_bundle, seal_bundle_detailed
from protocol.signing import digest, sign_message, verify_message
from protocol.spec import InputSpec, PruneRequest, RetrainLimits, RetrainRecipe, SpecError
from protocol.tensors import GraphRoles, graph_roles

MAX_REQUEST_BYTES = 4 * 1024**3
MAX_ASKS = 16
REASON_CHARS = 300  # how much of the entity's text a refusal keeps


class SessionError(RuntimeError):
    """The job cannot go on (one line for the user; any text from the entity in it is escaped)."""


def _short_id(value: Any) -> bool:
    """A job id or nonce the rest of the protocol accepts (sealing binds them as printable text)."""
    return isinstance(value, str) and 1 <= len(value) <= MAX_ID_CHARS and value.isprintable()


@dataclass(frozen=True)
class ResumeState:
    """What the owner keeps of a request it sent, to collect its result in a later run."""

    job_id: str
    nonce: str
    request_digest: str

    def to_json(self) -> dict[str, str]:
        return {"job_id": self.job_id, "nonce": self.nonce, "request_digest": self.request_digest}


@dataclass
class PruneOutcome:
    """What the entity sent back, verified."""

    job_id: str
    state_dict: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    report: dict[str, Any]
    recipe: RetrainRecipe
    bytes_received: int
    files: dict[str, str]
    # The only report fields the owner uses or shows, checked: the rest is kept, never shown.
    recipe_name: str | None = None
    achieved_rate: str | None = None
    achieved_model_rate: str | None = None


@dataclass
class OwnerSession:
    """State of the owner during the exchange; the Flower ClientApp only calls into it."""

    identity: Identity
    entity_card: IdentityCard
    program: torch.export.ExportedProgram
    spec: InputSpec
    request: PruneRequest
    audit: AuditLog
    nonces: NonceStore | None = None
    max_bytes: int = MAX_REQUEST_BYTES
    limits: RetrainLimits = field(default_factory=RetrainLimits)
    intent: str = "request"  # "check": a dry run; "resume": collect ``resume``'s job
    resume: ResumeState | None = None
    on_request_sealed: Callable[[ResumeState], None] | None = None  # keep it (OUT/job.json) before it goes out
    on_status: Callable[[JobStatus], None] | None = None
    # Keeps the verified result (OUT/received, OUT/job.json) before the acknowledgement goes back:
    # once acknowledged, the entity deletes its copy, so a crash after that must not lose it.
    on_result_verified: Callable[[PruneOutcome], None] | None = None
    outcome_at: float | None = None
    job_id: str | None = None
    nonce: str | None = None
    offer_job: str | None = None
    offer_nonce: str | None = None
    offer_digest: str = ""
    request_blob: bytes | None = None
    request_digest: str | None = None
    admission: Admission | None = None
    status: JobStatus | None = None
    last_heard: float = field(default_factory=time.monotonic)
    outcome: PruneOutcome | None = None
    refusal: str | None = None
    finished: bool = False
    bytes_sent: int = 0
    ignored_fabs: list[str] = field(default_factory=list)
    transfers: list[dict] = field(default_factory=list)
    sent_checkpoint: bytes | None = None

    def __post_init__(self) -> None:
        # BatchNorm's num_batches_tracked counts training steps (about the training-set size over
        # the batch size): a data statistic nobody asked for, so it leaves as zeros.
        self._artifact = program_to_files(self.program)
        self._artifact[WEIGHTS_FILE] = dump_tensors(redact_counters(self.program.state_dict))
        # Read from the owner's own graph, never from what the entity says about it.
        self._roles: GraphRoles = graph_roles(self.program)

    # ---------------------------------------------------------------- offer -> hello
    def answer_offer(self, offer_blob: bytes, presented_card: bytes | None) -> bytes:
        """Verify the entity's signed offer against the pinned card; return the signed hello.

        The hello (who this owner is, what it wants, how large its model is) is all that leaves
        before the entity admits the owner: an unregistered owner, a full queue or a model over
        the entity's limit is refused before the model crosses. It is on record as sent.
        """
        if self.offer_job is not None:
            raise SessionError(f"a second offer arrived during job {self.offer_job}; refusing it")
        if presented_card is not None:
            try:
                presented = IdentityCard.from_bytes(presented_card)
            except ProtocolError as exc:
                raise SessionError(f"the entity presented a malformed identity card: {printable(exc, REASON_CHARS)}") from exc
            if presented.fingerprint != self.entity_card.fingerprint:
                self.audit.append(
                    EV_REFUSED,
                    {
                        "reason": "entity card differs from the pinned card",
                        "presented": presented.fingerprint,
                        "pinned": self.entity_card.fingerprint,
                    },
                )
                raise SessionError(
                    f"the entity presented card {printable(presented.fingerprint[:23])}..., not the pinned {self.entity_card.fingerprint[:23]}..."
                )
        try:
            offer = verify_message(offer_blob, kind=OFFER_KIND, signer=self.entity_card)
        except ProtocolError as exc:
            reason = printable(exc, REASON_CHARS)
            self.audit.append(EV_REFUSED, {"reason": f"offer failed verification: {reason}"})
            raise SessionError(f"the entity's offer failed verification: {reason}") from exc
        asks_for = offer.get("asks_for", []) if isinstance(offer, dict) else None
        problem = None
        if not isinstance(offer, dict) or not _short_id(offer.get("job_id")) or not _short_id(offer.get("nonce")):
            problem = f"it lacks a job_id or nonce (each a printable string of 1..{MAX_ID_CHARS} characters)"
        elif not (isinstance(asks_for, list) and len(asks_for) <= MAX_ASKS and all(isinstance(a, str) and len(a) <= 200 for a in asks_for)):
            problem = f"its asks_for is not a list of at most {MAX_ASKS} short strings"
        if problem is not None:
            self.audit.append(EV_REFUSED, {"reason": f"malformed offer: {problem}", "offer": digest(offer_blob)})
            raise SessionError(f"the entity's offer is malformed: {problem}; refusing it")
        offer_job, offer_nonce = offer["job_id"], offer["nonce"]
        if self.nonces is not None:
            try:
                self.nonces.accept_once(offer_job, offer_nonce, scope="offer")
            except ProtocolError as exc:
                reason = printable(exc, REASON_CHARS)
                self.audit.record_refused(f"replayed offer: {reason}", peer=self.entity_card.fingerprint, job_id=offer_job)
                raise SessionError(f"the entity's offer was seen before (replay): {reason}") from exc
        self.offer_job, self.offer_nonce, self.last_heard = offer_job, offer_nonce, time.monotonic()
        self.offer_digest = digest(offer_blob)
        if self.resume is not None:
            self.job_id, self.nonce, self.request_digest = self.resume.job_id, self.resume.nonce, self.resume.request_digest
        else:
            self.job_id, self.nonce = offer_job, offer_nonce
        self.audit.append(
            "offer.received",
            {
                "job_id": offer_job,
                "entity": self.entity_card.fingerprint,
                "offer": digest(offer_blob),
                "asks_for": [printable(a) for a in asks_for],
            },
        )
        hello = Hello(
            offer_job,
            offer_nonce,
            self.identity.fingerprint,
            "resume" if self.resume is not None else self.intent,
            request_bytes=sum(len(v) for v in self._artifact.values()),
            resume_job=self.resume.job_id if self.resume is not None else None,
        )
        blob = sign_message(hello.to_json(), kind=HELLO_KIND, signer=self.identity)
        self.audit.append("hello.sent", {**hello.to_json(), "entity": self.entity_card.fingerprint, "hello": digest(blob), "bytes": len(blob)})
        self.bytes_sent += len(blob)
        return blob

    # ---------------------------------------------------------------- admission -> request
    def answer_admission(self, blob: bytes) -> bytes | None:
        """Verify the entity's signed admission; return the sealed request (None for a check).

        The signed audit checkpoint taken after recording the request is left in
        ``sent_checkpoint``; it travels beside the sealed bundle for the entity to countersign.
        """
        if self.offer_job is None:
            raise SessionError("an admission arrived before any offer")
        if self.admission is not None:
            raise SessionError(f"a second admission arrived for job {self.offer_job}; refusing it")
        try:
            admission = Admission.from_json(verify_message(blob, kind=ADMISSION_KIND, signer=self.entity_card))
        except ProtocolError as exc:
            reason = printable(exc, REASON_CHARS)
            self.audit.append(EV_REFUSED, {"job_id": self.offer_job, "reason": f"admission failed verification: {reason}"})
            raise SessionError(f"the entity's admission failed verification: {reason}") from exc
        if admission.job_id != self.offer_job or admission.owner != self.identity.fingerprint or admission.intent != self.intent:
            self.audit.append(EV_REFUSED, {"job_id": self.offer_job, "reason": "admission is for another job, owner or intent"})
            raise SessionError("the entity's admission is for another job, owner or intent; refusing it")
        self.admission, self.last_heard = admission, time.monotonic()
        self.audit.append("admission.received", {"job_id": self.offer_job, "queued": admission.queued, "workers": admission.workers})
        if self.intent == "check":
            return None
        return self._sealed_request()

    def _sealed_request(self) -> bytes:
        if self.job_id is None or self.nonce is None:
            raise SessionError("no offer to answer with a request")
        bundle = ModelRequest(self.job_id, self.nonce, self.request, self.spec, self._artifact)
        request = bundle.to_json()
        files = bundle.files()
        claims: dict[str, Any] = {}
        guard = EgressGuard(
            schema=schema_of(self.program.state_dict),
            max_bytes=self.max_bytes,
            zero_tensors=DATA_COUNTERS,
            program_check=self._program_is_ours_and_clean,
            on_violation=self._record_blocked,
        )
        guard.check(files, claims)
        sealed = seal_bundle_detailed(
            files,
            kind=REQUEST_KIND,
            job_id=self.job_id,
            request_hash=self.offer_digest,
            sender=self.identity,
            recipient=self.entity_card,
            claims=claims,
        )
        self.request_digest = digest(sealed.blob)
        if self.on_request_sealed is not None:  # kept before it leaves: a crash after sending can resume
            self.on_request_sealed(ResumeState(self.job_id, self.nonce, self.request_digest))
        record = self.audit.record_sent(sealed, recipient=self.entity_card, request=request)
        # Taken after the transfer is on record, so the entity's countersignature covers it.
        self.sent_checkpoint = self.audit.checkpoint()
        self.request_blob = sealed.blob
        self.bytes_sent += len(sealed.blob)
        self.transfers.append(
            {
                "direction": "sent",
                "kind": REQUEST_KIND,
                "bytes": len(sealed.blob),
                "files": record["details"]["files"],
                "tensors": len(self.program.state_dict),
            }
        )
        return sealed.blob

    def _record_blocked(self, reason: str) -> None:
        self.audit.append(EV_BLOCKED, {"job_id": self.job_id, "reason": reason})

    def _program_is_ours_and_clean(self, data: bytes) -> None:
        check_program(data)
        if data != self._artifact[PROGRAM_FILE]:
            raise EgressViolation("egress blocked: program.json differs from this model's own export")

    # ---------------------------------------------------------------- result
    def receive_result(self, blob: bytes) -> dict[str, str]:
        """Open, verify and check the entity's result; only then record it, its receipt and countersignature.

        Every check of the content runs before the log is touched, so a result that fails one is
        on record only as refused. The receipt and countersignature are checked again by the audit
        log as they are appended (they must match this log's transfers and checkpoints); a failure
        there is a refusal too, recorded after the received transfer, and the log stays valid.
        """
        if self.job_id is None or self.request_digest is None:
            raise SessionError("a result arrived before any request was sent")
        if self.outcome is not None:
            raise SessionError(f"a second result arrived for job {self.job_id}; refusing it (replay)")
        try:
            opened = open_bundle(
                blob,
                kind=RESULT_KIND,
                job_id=self.job_id,
                request_hash=self.request_digest,
                recipient=self.identity,
                senders={self.entity_card.fingerprint: self.entity_card},
            )
        except ProtocolError as exc:
            reason = printable(exc, REASON_CHARS)
            self.audit.append(EV_REFUSED, {"job_id": self.job_id, "reason": f"result failed verification: {reason}"})
            raise SessionError(f"the entity's result failed verification: {reason}") from exc
        try:
            checked = self._check_result(opened.files)
        except (ProtocolError, SpecError) as exc:
            reason = printable(exc, REASON_CHARS)
            self.audit.append(EV_REFUSED, {"job_id": self.job_id, "reason": f"result content invalid: {reason}"})
            raise SessionError(f"the entity's result is invalid: {reason}") from exc
        if self.nonces is not None and self.nonce is not None:
            try:
                self.nonces.accept_once(self.job_id, self.nonce)
            except ProtocolError as exc:
                self.audit.record_refused(f"replayed result: {printable(exc, REASON_CHARS)}", peer=self.entity_card.fingerprint, job_id=self.job_id)
                raise SessionError(f"a result for job {self.job_id} was accepted before (replay)") from exc
        self.audit.record_received(opened, size=len(blob))
        try:
            self.audit.record_receipt(opened.files[RECEIPT_FILE], entity=self.entity_card)
            if COUNTERSIGNATURE_FILE in opened.files:
                self.audit.record_countersignature(opened.files[COUNTERSIGNATURE_FILE], entity=self.entity_card)
        except ProtocolError as exc:
            reason = printable(exc, REASON_CHARS)
            self.audit.append(EV_REFUSED, {"job_id": self.job_id, "reason": f"receipt or countersignature refused: {reason}"})
            raise SessionError(f"the entity's receipt or countersignature is invalid: {reason}") from exc
        self.audit.checkpoint()
        self.outcome = PruneOutcome(
            self.job_id,
            dict(checked.weights),
            dict(checked.masks),
            dict(checked.report),
            checked.recipe,
            len(blob),
            dict(opened.file_digests()),
            recipe_name=checked.recipe_name,
            achieved_rate=checked.achieved_rate,
            achieved_model_rate=checked.achieved_model_rate,
        )
        self.transfers.append(
            {"direction": "received", "kind": RESULT_KIND, "bytes": len(blob), "files": dict(opened.file_digests()), "tensors": len(checked.weights)}
        )
        if self.on_result_verified is not None:
            self.on_result_verified(self.outcome)  # an OSError here withholds the ack: the entity keeps the result
        self.outcome_at = time.monotonic()
        return {"status": "verified"}

    # ---------------------------------------------------------------- status
    def receive_status(self, blob: bytes) -> JobStatus | None:
        """A signed status of this job: the entity is alive. An older one than the last is ignored (None)."""
        try:
            status = JobStatus.from_json(verify_message(blob, kind=STATUS_KIND, signer=self.entity_card))
        except ProtocolError as exc:
            raise SessionError(f"the entity's status message failed verification: {printable(exc, REASON_CHARS)}") from exc
        if status.job_id != self.job_id:
            raise SessionError("the entity's status message is for another job; ignoring it")
        if self.status is not None and status.seq <= self.status.seq:
            return None
        self.status, self.last_heard = status, time.monotonic()
        if self.on_status is not None:
            self.on_status(status)
        return status

    def _check_result(self, files: Mapping[str, bytes]) -> PruneResult:
        """Every content check of a verified result (``contract.PruneResult``); logs nothing."""
        return PruneResult.from_files(
            files,
            dense=self.program.state_dict,
            roles=self._roles,
            limits=self.limits,
            verify_signed=lambda blob, kind: verify_message(blob, kind=kind, signer=self.entity_card),
            request=self.request,
        )

    # ---------------------------------------------------------------- refusal / finish
    def refused(self, reason: str) -> None:
        """The entity refused the job; its reason is the entity's text, so it is kept escaped."""
        self.refusal = f"the entity refused the job: {printable(reason, REASON_CHARS)}"
        self.audit.append(EV_REFUSED, {"job_id": self.job_id or "", "by": "entity", "reason": printable(reason, REASON_CHARS)})

    def finish(self, outcome: str) -> None:
        self.finished = True
        self.audit.append("job.closed", {"job_id": self.job_id or "", "outcome": printable(outcome, 64)})

    def note_ignored_fab(self, fab_hash: str, size: int) -> None:
        if fab_hash not in self.ignored_fabs:
            self.ignored_fabs.append(fab_hash)
            self.audit.append(
                "fab.ignored", {"fab": "sha256:" + fab_hash, "bytes": size, "reason": "the owner runs only its own installed ClientApp"}
            )


def save_outcome_files(outcome: PruneOutcome, directory: Path) -> None:
    """Keep what the entity sent (verified) next to the final model, for the record."""
    from protocol.artifact import MASKS_FILE, write_files_atomically

    write_files_atomically(
        directory,
        {
            WEIGHTS_FILE: dump_tensors(outcome.state_dict),
            MASKS_FILE: dump_tensors(outcome.masks),
            REPORT_FILE: canonical.dumps(outcome.report),
            RECIPE_FILE: canonical.dumps(outcome.recipe.to_json()),
        },
    )


def load_outcome_files(directory: Path, job_id: str, limits: RetrainLimits) -> PruneOutcome:
    """What :func:`save_outcome_files` kept of a verified result, for a run that resumes after it.

    These are the owner's own files, written after every check passed; the recipe is checked
    against the owner's limits again, as they may have changed since.
    """
    from protocol.artifact import MASKS_FILE, load_tensors

    try:
        weights = load_tensors((directory / WEIGHTS_FILE).read_bytes())
        masks = load_tensors((directory / MASKS_FILE).read_bytes())
        report = canonical.loads((directory / REPORT_FILE).read_bytes())
        recipe = RetrainRecipe.from_json(canonical.loads((directory / RECIPE_FILE).read_bytes()))
        limits.check(recipe)
    except (OSError, ProtocolError, SpecError) as exc:
        raise SessionError(f"the result kept in {directory} is unreadable ({exc}); move the folder aside and start a new job") from None
    size = sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
    rate = report.get("achieved_rate") if isinstance(report, dict) else None
    model_rate = report.get("achieved_model_rate") if isinstance(report, dict) else None
    name = report.get("recipe") if isinstance(report, dict) else None
    return PruneOutcome(
        job_id,
        weights,
        masks,
        dict(report) if isinstance(report, dict) else {},
        recipe,
        size,
        {},
        recipe_name=printable(name) if name is not None else None,
        achieved_rate=printable(rate) if rate is not None else None,
        achieved_model_rate=printable(model_rate) if model_rate is not None else None,
    )
