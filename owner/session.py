"""The owner's side of one job, Flower-free: answer the offer, receive and verify the result.

Order of every outbound step: build the payload from the model artifact and the request, pass it
through the egress guard, seal it to the pinned entity card, record the transfer in the audit log
(with the data facts that crossed), checkpoint, and only then hand the bytes to Flower. Inbound:
open and verify against the pinned card before anything is parsed, then record it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from protocol import canonical
from protocol.artifact import PROGRAM_FILE, WEIGHTS_FILE, dump_tensors, load_tensors, program_to_files
from protocol.audit import EV_BLOCKED, EV_REFUSED, AuditLog
from protocol.egress import DATA_COUNTERS, EgressGuard, redact_counters, schema_of
from protocol.errors import EgressViolation, ProtocolError
from protocol.keys import Identity, IdentityCard
from protocol.masks import unpack_masks
from protocol.program_guard import check_program
from protocol.replay import NonceStore
from protocol.sealing import open_bundle, seal_bundle_detailed
from protocol.signing import digest, verify_message
from protocol.spec import InputSpec, PruneRequest, RetrainRecipe

OFFER_KIND = "offer"
REQUEST_KIND = "model-request"
RESULT_KIND = "prune-result"
REQUEST_FILE = "request.json"
MAX_REQUEST_BYTES = 4 * 1024**3


class SessionError(RuntimeError):
    """The job cannot go on (one line for the user)."""


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
    job_id: str | None = None
    nonce: str | None = None
    request_blob: bytes | None = None
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

    # ---------------------------------------------------------------- offer -> request
    def answer_offer(self, offer_blob: bytes, presented_card: bytes | None) -> bytes:
        """Verify the entity's signed offer against the pinned card; return the sealed request.

        The signed audit checkpoint taken after recording the request is left in
        ``sent_checkpoint``; it travels beside the sealed bundle for the entity to countersign.
        """
        if self.job_id is not None:
            raise SessionError(f"a second offer arrived during job {self.job_id}; refusing it")
        if presented_card is not None:
            try:
                presented = IdentityCard.from_bytes(presented_card)
            except ProtocolError as exc:
                raise SessionError(f"the entity presented a malformed identity card: {exc}") from exc
            if presented.fingerprint != self.entity_card.fingerprint:
                self.audit.append(EV_REFUSED, {"reason": "entity card differs from the pinned card",
                                               "presented": presented.fingerprint, "pinned": self.entity_card.fingerprint})
                raise SessionError(
                    f"the entity presented card {presented.fingerprint[:23]}..., not the pinned {self.entity_card.fingerprint[:23]}..."
                )
        try:
            offer = verify_message(offer_blob, kind=OFFER_KIND, signer=self.entity_card)
        except ProtocolError as exc:
            self.audit.append(EV_REFUSED, {"reason": f"offer failed verification: {exc}"})
            raise SessionError(f"the entity's offer failed verification: {exc}") from exc
        self.job_id, self.nonce = str(offer["job_id"]), str(offer["nonce"])
        if self.nonces is not None:
            try:
                self.nonces.accept_once(self.job_id, self.nonce, scope="offer")
            except ProtocolError as exc:
                self.audit.record_refused(f"replayed offer: {exc}", peer=self.entity_card.fingerprint, job_id=self.job_id)
                raise SessionError(f"the entity's offer was seen before (replay): {exc}") from exc
        self.audit.append("offer.received", {"job_id": self.job_id, "entity": self.entity_card.fingerprint,
                                             "offer": digest(offer_blob), "asks_for": list(offer.get("asks_for", []))})
        request = {"job_id": self.job_id, "nonce": self.nonce, "prune": self.request.to_json(), "input_spec": self.spec.to_json()}
        files = dict(self._artifact)
        files[REQUEST_FILE] = canonical.dumps(request)
        claims: dict[str, Any] = {}
        guard = EgressGuard(
            schema=schema_of(self.program.state_dict),
            max_bytes=self.max_bytes,
            zero_tensors=DATA_COUNTERS,
            program_check=self._program_is_ours_and_clean,
            on_violation=lambda reason: self.audit.append(EV_BLOCKED, {"job_id": self.job_id, "reason": reason}),
        )
        guard.check(files, claims)
        sealed = seal_bundle_detailed(
            files, kind=REQUEST_KIND, job_id=self.job_id, request_hash=digest(offer_blob),
            sender=self.identity, recipient=self.entity_card, claims=claims,
        )
        record = self.audit.record_sent(sealed, recipient=self.entity_card, request=request)
        # Taken after the transfer is on record, so the entity's countersignature covers it.
        self.sent_checkpoint = self.audit.checkpoint()
        self.request_blob = sealed.blob
        self.bytes_sent += len(sealed.blob)
        self.transfers.append({"direction": "sent", "kind": REQUEST_KIND, "bytes": len(sealed.blob),
                               "files": record["details"]["files"], "tensors": len(self.program.state_dict)})
        return sealed.blob

    def _program_is_ours_and_clean(self, data: bytes) -> None:
        check_program(data)
        if data != self._artifact[PROGRAM_FILE]:
            raise EgressViolation("egress blocked: program.json differs from this model's own export")

    # ---------------------------------------------------------------- result
    def receive_result(self, blob: bytes) -> dict[str, str]:
        """Open and verify the entity's result; record it, its receipt and countersignature."""
        if self.job_id is None or self.request_blob is None:
            raise SessionError("a result arrived before any request was sent")
        if self.outcome is not None:
            raise SessionError(f"a second result arrived for job {self.job_id}; refusing it (replay)")
        try:
            opened = open_bundle(
                blob, kind=RESULT_KIND, job_id=self.job_id, request_hash=digest(self.request_blob),
                recipient=self.identity, senders={self.entity_card.fingerprint: self.entity_card},
            )
        except ProtocolError as exc:
            self.audit.append(EV_REFUSED, {"job_id": self.job_id, "reason": f"result failed verification: {exc}"})
            raise SessionError(f"the entity's result failed verification: {exc}") from exc
        if self.nonces is not None and self.nonce is not None:
            try:
                self.nonces.accept_once(self.job_id, self.nonce)
            except ProtocolError as exc:
                self.audit.record_refused(f"replayed result: {exc}", peer=self.entity_card.fingerprint, job_id=self.job_id)
                raise SessionError(f"a result for job {self.job_id} was accepted before (replay)") from exc
        self.audit.record_received(opened, size=len(blob))
        try:
            state = load_tensors(opened.files[WEIGHTS_FILE])
            masks = unpack_masks(opened.files["masks.bin"])
            report = canonical.loads(opened.files["report.json"])
            recipe = RetrainRecipe.from_json(canonical.loads(opened.files["recipe.json"]))
            self.audit.record_receipt(opened.files["receipt.json"], entity=self.entity_card)
            if "countersignature.json" in opened.files:
                self.audit.record_countersignature(opened.files["countersignature.json"], entity=self.entity_card)
        except (KeyError, ProtocolError, ValueError) as exc:
            self.audit.append(EV_REFUSED, {"job_id": self.job_id, "reason": f"result content invalid: {exc}"})
            raise SessionError(f"the entity's result is invalid: {exc}") from exc
        self._check_result(state, masks)
        self.audit.checkpoint()
        self.outcome = PruneOutcome(self.job_id, state, masks, report, recipe, len(blob), dict(opened.file_digests()))
        self.transfers.append({"direction": "received", "kind": RESULT_KIND, "bytes": len(blob),
                               "files": dict(opened.file_digests()), "tensors": len(state)})
        return {"status": "verified"}

    def _check_result(self, state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> None:
        expected = schema_of(self.program.state_dict)
        got = schema_of(state)
        if got != expected:
            diff = sorted(set(expected) ^ set(got)) or sorted(k for k in expected if expected[k] != got.get(k))
            raise SessionError(f"pruned weights do not match the model's schema (first difference: {diff[:3]})")
        for name, mask in masks.items():
            if name not in state or tuple(mask.shape) != tuple(state[name].shape):
                raise SessionError(f"mask {name!r} does not match a weight of the model")
            if not torch.isfinite(state[name]).all():
                raise SessionError(f"pruned weight {name!r} holds non-finite values")
            if torch.count_nonzero(state[name][~mask]):
                raise SessionError(f"pruned weight {name!r} is nonzero where its mask prunes it")

    # ---------------------------------------------------------------- refusal / finish
    def refused(self, reason: str) -> None:
        self.refusal = reason
        self.audit.append(EV_REFUSED, {"job_id": self.job_id or "", "by": "entity", "reason": reason})

    def finish(self, outcome: str) -> None:
        self.finished = True
        self.audit.append("job.closed", {"job_id": self.job_id or "", "outcome": outcome})

    def note_ignored_fab(self, fab_hash: str, size: int) -> None:
        if fab_hash not in self.ignored_fabs:
            self.ignored_fabs.append(fab_hash)
            self.audit.append("fab.ignored", {"fab": "sha256:" + fab_hash, "bytes": size,
                                              "reason": "the owner runs only its own installed ClientApp"})


def save_outcome_files(outcome: PruneOutcome, directory: Path) -> None:
    """Keep what the entity sent (verified) next to the final model, for the record."""
    from protocol.artifact import dump_tensors, write_files_atomically

    write_files_atomically(directory, {
        "weights.safetensors": dump_tensors(outcome.state_dict),
        "masks.safetensors": dump_tensors(outcome.masks),
        "report.json": canonical.dumps(outcome.report),
        "recipe.json": canonical.dumps(outcome.recipe.to_json()),
    })
