"""The owner's audit trail: a hash-chained, Merkle-checkpointed, append-only JSONL log.

Each line is one canonical-JSON record ``{"seq", "time", "event", "details", "prev"}`` where
``prev`` is the SHA-256 of the previous line's bytes (a fixed zero hash for the first). Records
are also the leaves of an RFC 9162 Merkle tree; ``checkpoint()`` signs (tree size, root hash) with
the owner's key and appends the signed checkpoint to the log. The entity countersigns checkpoints
(``countersign_checkpoint``) and returns a signed receipt of exactly what it received
(``make_receipt``); the owner records both (``record_countersignature``, ``record_receipt``).

Crash safety: a record is one ``write`` of a full line followed by ``fsync``; a process killed
mid-write can leave only a torn final line, which ``AuditLog.open`` truncates (and notes in a
``log.recovered`` record). ``verify_log`` reports a torn line as a failure until then.

What the log proves: which artifacts (by hash) crossed, when, between which keys, in which
order, and that the log was not edited, re-ordered or truncated below a checkpoint the entity
countersigned. What it cannot prove: what the weights themselves encode (a model can memorise
training data; membership inference can recover some of it), or anything done outside the tool.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import secrets
import stat
import time as _time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import canonical
from ._files import read_regular
from ._wire.merkle import Accumulator
from .errors import AuditError, ProtocolError, SignatureError
from .keys import Identity, IdentityCard
from .sealing import OpenedBundle, Sealed
from .signing import digest, message_signer, read_message_unchecked, sign_message, verify_message

__all__ = [
    "AuditLog",
    "AuditVerdict",
    "CHECKPOINT_KIND",
    "COUNTERSIGN_KIND",
    "EV_BLOCKED",
    "EV_CHECKPOINT",
    "EV_COUNTERSIGN",
    "EV_CREATED",
    "EV_RECEIPT",
    "EV_RECEIVED",
    "EV_RECOVERED",
    "EV_REFUSED",
    "EV_SENT",
    "GENESIS_PREV",
    "MAX_RECORD_BYTES",
    "RECEIPT_KIND",
    "countersign_checkpoint",
    "embedded_cards",
    "iter_lines",
    "make_receipt",
    "read_records",
    "verify_log",
]

GENESIS_PREV = "sha256:" + "0" * 64
CHECKPOINT_KIND = "audit-checkpoint"
COUNTERSIGN_KIND = "audit-countersignature"
RECEIPT_KIND = "receipt"
MAX_RECORD_BYTES = 1024 * 1024

# Events with a fixed meaning (others are free-form, e.g. "job.started", "retrain.finished").
EV_CREATED = "log.created"
EV_RECOVERED = "log.recovered"
EV_CHECKPOINT = "checkpoint"
EV_COUNTERSIGN = "countersignature"
EV_RECEIPT = "receipt"
EV_SENT = "transfer.sent"
EV_RECEIVED = "transfer.received"
EV_BLOCKED = "egress.blocked"
EV_REFUSED = "admission.refused"
# Written only by the AuditLog method that checks them first (``append`` refuses these names):
# a receipt, countersignature or checkpoint appended unchecked could break the log for good.
_RESERVED = {
    EV_CREATED: "open",
    EV_RECOVERED: "open",
    EV_CHECKPOINT: "checkpoint",
    EV_COUNTERSIGN: "record_countersignature",
    EV_RECEIPT: "record_receipt",
}


def _now() -> str:
    return _time.strftime("%Y-%m-%dT%H:%M:%SZ", _time.gmtime())


def _line_hash(line: bytes) -> str:
    return "sha256:" + hashlib.sha256(line).hexdigest()


def _redump(value: Any) -> bytes:
    """Canonical bytes of a value that came out of ``canonical.loads`` (so already float-free):
    the same encoding as ``canonical.dumps`` without re-walking the value to check its types,
    which dominated ``verify_log`` on large logs."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _envelope(value: Any) -> Mapping[str, Any]:
    """An envelope embedded in a record, as the dict ``verify_message`` accepts (no re-encoding)."""
    if not isinstance(value, dict):
        raise SignatureError("record does not embed a signed envelope")
    return value


def _root_str(acc: Accumulator) -> str:
    return "sha256:" + acc.root().hex()


class AuditLog:
    """Appender for one owner's log; use ``AuditLog.open`` (creates or resumes) and ``close``."""

    def __init__(self, path: Path, identity: Identity, fd: int, log_id: str, seq: int, prev: str, acc: Accumulator):
        self.path = path
        self.identity = identity
        self._fd = fd
        self.log_id = log_id
        self._seq = seq
        self._prev = prev
        self._acc = acc
        # What record_receipt / record_countersignature check against (filled by _note from
        # every transfer.sent and checkpoint record, also when a log is resumed):
        self._sent: dict[tuple[str, str], tuple[str, Any, str]] = {}  # (job, statement) -> (kind, files, peer)
        self._checkpoints: dict[str, tuple[int, str]] = {}  # digest(blob) -> (tree_size, root_hash)

    # -------------------------------------------------------------------------------- lifecycle
    @classmethod
    def open(cls, path: Path, identity: Identity) -> AuditLog:
        """Create the log, or resume it after checking its chain; a torn last line is recovered.

        Holds an exclusive lock on the file until ``close`` so two writers cannot interleave.
        A symbolic link at ``path`` (dangling or not) is refused and never followed
        (``O_NOFOLLOW``): whoever can plant one could otherwise make the owner create, or append
        its trail to, a file of their choosing. A FIFO, device or folder there is refused too.
        """
        path = Path(path)
        try:
            # O_NONBLOCK: opening a FIFO or device never waits; it has no effect on a regular file.
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            if exc.errno == errno.ELOOP or path.is_symlink():
                raise AuditError(f"audit log {path} is a symbolic link; refusing to follow it (give the path of the log file itself)") from exc
            raise AuditError(f"cannot open audit log {path}: {exc.strerror}") from exc
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise AuditError(f"audit log {path} is not a regular file; give the path of a plain file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise AuditError(f"audit log {path} is in use by another process") from exc
        try:
            data = _read_all(fd)
            torn = b""
            if data and not data.endswith(b"\n"):
                cut = data.rfind(b"\n") + 1
                torn = data[cut:]
                data = data[:cut]
            log = cls(path, identity, fd, "", 0, GENESIS_PREV, Accumulator())
            if data:
                log._resume(data)  # raises on a broken chain before anything is changed on disk
            if torn:
                os.ftruncate(fd, len(data))
                os.fsync(fd)
            if not data:
                log.log_id = "log-" + secrets.token_hex(12)
                log._append(
                    EV_CREATED,
                    {"log_id": log.log_id, "owner": identity.fingerprint, "owner_name": identity.card.name, "owner_card": identity.card.to_json()},
                )
            if torn:
                log._append(EV_RECOVERED, {"dropped_bytes": len(torn), "dropped_sha256": digest(torn)})
            return log
        except BaseException:
            os.close(fd)
            raise

    def _resume(self, data: bytes) -> None:
        for index, line in enumerate(data.split(b"\n")[:-1]):
            rec = _parse_line(line, index)
            if rec["seq"] != index or rec["prev"] != self._prev:
                raise AuditError(f"audit log {self.path}: record {index} breaks the hash chain; run `python -m owner.audit verify`")
            if index == 0:
                if rec["event"] != EV_CREATED or rec["details"].get("owner") != self.identity.fingerprint:
                    raise AuditError(f"audit log {self.path} belongs to another owner or has no log.created record")
                self.log_id = str(rec["details"]["log_id"])
            if rec["event"] in (EV_SENT, EV_CHECKPOINT):
                self._note(rec["event"], rec["details"], index)
            self._prev = _line_hash(line)
            self._acc.append_leaf(line)
            self._seq = index + 1

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def size(self) -> int:
        """Number of records (the Merkle tree size)."""
        return self._seq

    @property
    def root_hash(self) -> str:
        return _root_str(self._acc)

    # -------------------------------------------------------------------------------- appending
    def append(self, event: str, details: Mapping[str, Any]) -> dict[str, Any]:
        """Append one record durably (one write + fsync) and return it.

        The events that ``verify_log`` checks against signatures (checkpoint, countersignature,
        receipt, log.created, log.recovered) are refused here: they go through the method that
        checks them first, so no caller can append one that breaks the log.
        """
        if isinstance(event, str) and event in _RESERVED:
            raise AuditError(f"audit event {event!r} is written only by AuditLog.{_RESERVED[event]}; call that instead")
        return self._append(event, details)

    def _note(self, event: str, details: Mapping[str, Any], index: int) -> None:
        """Remember what a transfer.sent or checkpoint record (at ``index``, not yet a leaf) commits to."""
        if event == EV_SENT:
            key = (str(details.get("job_id")), str(details.get("statement")))
            self._sent[key] = (str(details.get("kind")), details.get("files"), str(details.get("peer")))
        elif event == EV_CHECKPOINT:
            self._checkpoints[digest(_redump(details.get("checkpoint")))] = (index, self.root_hash)

    def _append(self, event: str, details: Mapping[str, Any]) -> dict[str, Any]:
        if self._fd < 0:
            raise AuditError("audit log is closed")
        if not isinstance(event, str) or not event or len(event) > 64:
            raise AuditError(f"audit event name {event!r} must be a short string")
        body = dict(details)
        record = {"seq": self._seq, "time": _now(), "event": event, "details": body, "prev": self._prev}
        try:
            line = canonical.dumps(record)
        except canonical.CanonicalJSONError as exc:
            raise AuditError(f"audit record {event!r} is not canonical JSON: {exc}") from exc
        if len(line) > MAX_RECORD_BYTES:
            raise AuditError(f"audit record {event!r} is larger than {MAX_RECORD_BYTES} bytes")
        try:
            written = os.write(self._fd, line + b"\n")
            if written != len(line) + 1:
                raise OSError(0, "short write")
            os.fsync(self._fd)
        except OSError as exc:
            raise AuditError(f"cannot append to audit log {self.path}: {exc.strerror}") from exc
        if event in (EV_SENT, EV_CHECKPOINT):
            self._note(event, body, self._seq)
        self._prev = _line_hash(line)
        self._acc.append_leaf(line)
        self._seq += 1
        return record

    def checkpoint(self) -> bytes:
        """Sign (tree size, root) of every record so far, append it, and return the signed blob."""
        body = {
            "log_id": self.log_id,
            "tree_size": self._seq,
            "root_hash": self.root_hash,
            "last_record": self._prev,
            "time": _now(),
        }
        blob = sign_message(body, kind=CHECKPOINT_KIND, signer=self.identity)
        self._append(EV_CHECKPOINT, {"checkpoint": canonical.loads(blob)})
        return blob

    def record_sent(self, sealed: Sealed, *, recipient: IdentityCard, request: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Log an outbound transfer (the statement hash and every file hash); ``request``: the
        decoded ``request.json`` when it was sent, so the data facts that crossed are on record."""
        details: dict[str, Any] = {
            "job_id": sealed.job_id,
            "kind": sealed.kind,
            "peer": recipient.fingerprint,
            "peer_name": recipient.name,
            "peer_card": recipient.to_json(),
            "statement": sealed.statement_hash,
            "files": sealed.file_digests(),
            "bytes": len(sealed.blob),
            "claims": dict(sealed.statement["predicate"]["claims"]),
            # The tensor names of each weights file: the officer's report says from these what
            # crossed (BatchNorm statistics only when the model has them).
            "tensors": {name: [t["name"] for t in listing] for name, listing in sealed.statement["predicate"].get("tensors", {}).items()},
        }
        if request is not None:
            details["request"] = dict(request)
        return self.append(EV_SENT, details)

    def record_received(self, opened: OpenedBundle, *, size: int) -> dict[str, Any]:
        """Log an inbound, verified bundle."""
        return self.append(
            EV_RECEIVED,
            {
                "job_id": opened.job_id,
                "kind": opened.kind,
                "peer": opened.sender.fingerprint,
                "peer_name": opened.sender.name,
                "peer_card": opened.sender.to_json(),
                "statement": opened.statement_hash,
                "files": opened.file_digests(),
                "bytes": size,
                "claims": dict(opened.claims),
            },
        )

    def record_blocked(self, reason: str, *, job_id: str | None = None) -> dict[str, Any]:
        """Log an egress block (``EgressGuard(on_violation=log.record_blocked)``)."""
        return self.append(EV_BLOCKED, {"reason": str(reason), **({"job_id": job_id} if job_id else {})})

    def record_refused(self, reason: str, *, peer: str, job_id: str | None = None) -> dict[str, Any]:
        """Log a refused admission (on either side: who was refused or refused us, and why)."""
        return self.append(EV_REFUSED, {"reason": str(reason), "peer": peer, **({"job_id": job_id} if job_id else {})})

    def record_countersignature(self, blob: bytes, *, entity: IdentityCard) -> dict[str, Any]:
        """Verify the entity's countersignature of one of this log's checkpoints, then log it.

        A valid signature is not enough: the countersigned digest must be a checkpoint this log
        issued, with its tree size and root, or ``verify_log`` would reject the record later and
        the owner's own log would never verify again. On a mismatch nothing is appended.
        """
        body = verify_message(blob, kind=COUNTERSIGN_KIND, signer=entity)
        if body.get("log_id") != self.log_id or body.get("owner") != self.identity.fingerprint:
            raise AuditError("countersignature is for another audit log; not recorded")
        ref = self._checkpoints.get(str(body.get("checkpoint")))
        if ref is None:
            raise AuditError("countersignature is of a checkpoint this audit log never issued; not recorded")
        if body.get("tree_size") != ref[0] or body.get("root_hash") != ref[1]:
            raise AuditError(f"countersignature states another tree size or root than checkpoint {ref[0]} of this log; not recorded")
        if body.get("entity") != entity.fingerprint:
            raise AuditError(f"countersignature names entity {str(body.get('entity'))[:16]!r}, not its signer {entity.short}; not recorded")
        return self._append(EV_COUNTERSIGN, {"entity": entity.fingerprint, "countersignature": canonical.loads(blob)})

    def record_receipt(self, blob: bytes, *, entity: IdentityCard) -> dict[str, Any]:
        """Verify the entity's receipt and check it against what this log recorded as sent, then log it.

        The receipt must name a transfer of this log (job id and statement hash) sent by this
        owner to ``entity``, with exactly the file hashes that were sent: a receipt the entity
        signed for something else would otherwise enter the log and make ``verify_log`` fail on
        it for good. On a mismatch nothing is appended.
        """
        body = verify_message(blob, kind=RECEIPT_KIND, signer=entity)
        job = str(body.get("job_id"))[:64]
        sent = self._sent.get((str(body.get("job_id")), str(body.get("statement"))))
        if sent is None:
            raise AuditError(f"receipt for job {job!r} names a statement this audit log never recorded as sent; not recorded")
        kind, files, peer = sent
        if peer != entity.fingerprint:
            raise AuditError(f"receipt for job {job!r} is signed by {entity.short}, but that transfer was sent to {peer[:16]}; not recorded")
        if body.get("files") != files:
            raise AuditError(f"receipt for job {job!r} lists other file hashes than were sent; not recorded")
        if body.get("kind") != kind:
            raise AuditError(f"receipt for job {job!r} is for another kind of transfer than was sent; not recorded")
        if body.get("sender") != self.identity.fingerprint or body.get("received_by") != entity.fingerprint:
            raise AuditError(f"receipt for job {job!r} names another sender or recipient than this transfer's; not recorded")
        return self._append(EV_RECEIPT, {"entity": entity.fingerprint, "receipt": canonical.loads(blob)})


def _read_all(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks: list[bytes] = []
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _no_float(text: str) -> Any:
    raise ValueError(f"float {text} in canonical JSON")


def _fast_loads(line: bytes, where: str) -> Any:
    """Strict parse of one log line at C speed: floats and NaN are refused here, and duplicate
    keys, key order and white space by the caller's re-encoding check (a line with a duplicate key
    re-encodes to different bytes), which ``canonical.loads``' per-object Python hook would
    otherwise do ten thousand times over on a large log."""
    try:
        canonical.check_depth(line)  # a JSONDepthError is a ValueError
        return json.loads(line.decode("utf-8"), parse_float=_no_float, parse_constant=_no_float)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise AuditError(f"{where}: not canonical JSON ({str(exc).splitlines()[0][:80]})") from exc


def _parse_line(line: bytes, index: int) -> dict[str, Any]:
    where = f"record {index} (line {index + 1})"
    if len(line) > MAX_RECORD_BYTES:
        raise AuditError(f"{where}: longer than {MAX_RECORD_BYTES} bytes")
    rec = _fast_loads(line, where)
    if not isinstance(rec, dict) or set(rec) != {"seq", "time", "event", "details", "prev"}:
        raise AuditError(f"{where}: fields must be seq, time, event, details, prev")
    if not isinstance(rec["details"], dict) or not isinstance(rec["event"], str) or not isinstance(rec["time"], str):
        raise AuditError(f"{where}: malformed event, time or details")
    if type(rec["seq"]) is not int or not isinstance(rec["prev"], str):
        raise AuditError(f"{where}: malformed seq or prev")
    if _redump(rec) != line:
        raise AuditError(f"{where}: not in canonical form (edited)")
    return rec


# ------------------------------------------------------------------------------------ entity side


def countersign_checkpoint(checkpoint: bytes, *, owner: IdentityCard, entity: Identity) -> bytes:
    """Entity side: verify the owner's checkpoint and sign that the entity has seen it."""
    body = verify_message(checkpoint, kind=CHECKPOINT_KIND, signer=owner)
    for key in ("log_id", "tree_size", "root_hash"):
        if key not in body:
            raise SignatureError(f"owner checkpoint lacks {key}")
    return sign_message(
        {
            "checkpoint": digest(checkpoint),
            "log_id": body["log_id"],
            "tree_size": body["tree_size"],
            "root_hash": body["root_hash"],
            "owner": owner.fingerprint,
            "entity": entity.fingerprint,
            "time": _now(),
        },
        kind=COUNTERSIGN_KIND,
        signer=entity,
    )


def make_receipt(opened: OpenedBundle, *, entity: Identity, job_id: str) -> bytes:
    """Entity side: a signed receipt of exactly what it received (statement and file hashes)."""
    if opened.job_id and opened.job_id != job_id:
        raise ProtocolError(f"receipt for job {job_id!r} but the bundle is for {opened.job_id!r}")
    return sign_message(
        {
            "job_id": job_id,
            "kind": opened.kind,
            "request_hash": opened.request_hash,
            "statement": opened.statement_hash,
            "files": opened.file_digests(),
            "sender": opened.sender.fingerprint,
            "received_by": entity.fingerprint,
            "time": _now(),
        },
        kind=RECEIPT_KIND,
        signer=entity,
    )


# ------------------------------------------------------------------------------------ verifying


@dataclass(frozen=True)
class AuditVerdict:
    """Outcome of ``verify_log``. ``ok`` is False iff ``error`` names the first broken record."""

    ok: bool
    records: int
    checkpoints: int
    anchored: int  # records covered by the last valid checkpoint
    countersigned: int  # records covered by the last checkpoint the entity countersigned
    receipts: int
    error: str | None = None
    first_bad: int | None = None  # record index (0-based); line = first_bad + 1
    log_id: str | None = None
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "records": self.records,
            "checkpoints": self.checkpoints,
            "anchored": self.anchored,
            "countersigned": self.countersigned,
            "receipts": self.receipts,
            "error": self.error,
            "first_bad": self.first_bad,
            "log_id": self.log_id,
            "warnings": list(self.warnings),
        }


class _Fail(Exception):
    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


def embedded_cards(path: Path) -> tuple[IdentityCard | None, dict[str, IdentityCard]]:
    """The owner card from ``log.created`` and the peer cards of transfer records, as the log
    itself states them. Untrusted (whoever rewrote the log could rewrite these too): the CLI uses
    them only when no card is pinned, and says so."""
    owner: IdentityCard | None = None
    peers: dict[str, IdentityCard] = {}
    for index, line, complete in iter_lines(path):
        if not complete:
            break
        if index and b'"peer_card"' not in line:
            continue  # only log.created and transfer records carry cards: skip parsing the rest
        try:
            rec = _parse_line(line, index)
            if index == 0 and rec["event"] == EV_CREATED:
                owner = IdentityCard.from_json(rec["details"].get("owner_card"))
            elif rec["event"] in (EV_SENT, EV_RECEIVED) and "peer_card" in rec["details"]:
                card = IdentityCard.from_json(rec["details"]["peer_card"])
                peers[card.fingerprint] = card
        except ProtocolError:
            continue
    return owner, peers


def iter_lines(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """(index, line bytes, complete) for each line of the log; the last may be torn.

    ``AuditError`` if the path is a FIFO, device or folder (read non-blocking, never hangs)."""
    data = read_regular(Path(path), limit=None, error=AuditError, what="audit log")
    lines = data.split(b"\n")
    for index, line in enumerate(lines[:-1]):
        yield index, line, True
    if lines[-1]:
        yield len(lines) - 1, lines[-1], False


def read_records(path: Path) -> list[dict[str, Any]]:
    """Parsed records (for reports); raises ``AuditError`` on the first malformed line."""
    out = []
    for index, line, complete in iter_lines(path):
        if not complete:
            raise AuditError(f"record {index} (line {index + 1}) is incomplete (torn write)")
        out.append(_parse_line(line, index))
    return out


def verify_log(
    path: Path,
    *,
    owner: IdentityCard,
    entity: IdentityCard | Mapping[str, IdentityCard] | None = None,
    checkpoint: bytes | None = None,
    every_signature: bool = True,
    allow_unanchored: bool = False,
) -> AuditVerdict:
    """Check chain, canonical form, Merkle checkpoints, countersignatures and receipts.

    A log with no signed checkpoint fails: its hash chain alone is something anyone can compute,
    so a log fabricated from the owner's public card would otherwise pass. ``allow_unanchored``
    accepts such a log (one still being written, before its first transfer) after checking the
    chain only, with a warning saying so. Checkpoints signed by any key but ``owner`` fail.

    ``entity``: the entity card that must have signed every countersignature and receipt, or a
    mapping fingerprint -> card for an owner that worked with several entities (signatures by an
    entity not in the mapping are counted as unverified, like all of them when ``entity`` is None,
    and a warning says so); a receipt must also match a transfer sent to that same entity. ``checkpoint``: a signed checkpoint held outside the log
    (e.g. the one the entity countersigned); the log must contain that tree as a prefix, which
    detects truncation below it. ``every_signature=False`` verifies the owner's signature on the
    last checkpoint only (every checkpoint's tree size and root are still recomputed, and every
    entity signature is still verified): each earlier checkpoint is a leaf of the tree that the
    last one signs, so this is as strong against anyone without the owner's key, and about twice
    as fast on logs with a checkpoint every few records; a broken earlier signature is then
    reported at the last checkpoint rather than where it is.
    """
    path = Path(path)
    if not path.exists():
        return AuditVerdict(False, 0, 0, 0, 0, 0, error=f"audit log {path} not found", first_bad=None)
    warnings: list[str] = []
    entities: dict[str, IdentityCard] = {} if entity is None or isinstance(entity, IdentityCard) else dict(entity)

    def entity_for(env: Mapping[str, Any]) -> IdentityCard | None:
        if isinstance(entity, IdentityCard):
            return entity
        return entities.get(message_signer(env))

    acc = Accumulator()
    prev = GENESIS_PREV
    last_unverified: tuple[int, bytes] | None = None  # the last checkpoint, when only it is verified
    external: tuple[int, str, str] | None = None  # (tree size, root, log id) of the external checkpoint
    if checkpoint is not None:
        try:
            ext = verify_message(checkpoint, kind=CHECKPOINT_KIND, signer=owner)
        except ProtocolError as exc:
            return AuditVerdict(False, 0, 0, 0, 0, 0, error=f"external checkpoint: {exc}")
        if not isinstance(ext.get("tree_size"), int) or not isinstance(ext.get("root_hash"), str):
            return AuditVerdict(False, 0, 0, 0, 0, 0, error="external checkpoint lacks tree_size or root_hash")
        external = (ext["tree_size"], ext["root_hash"], str(ext.get("log_id")))
    external_root: str | None = _root_str(acc) if external is not None and external[0] == 0 else None
    checkpoints: dict[str, tuple[int, str]] = {}  # digest(blob) -> (tree_size, root)
    sent: dict[tuple[str, str], dict[str, Any]] = {}
    n_cp = anchored = countersigned = receipts = 0
    log_id: str | None = None
    unverified = 0
    pending = 0  # records since the last checkpoint that no signature covers yet
    count = 0
    try:
        for index, line, complete in iter_lines(path):
            if not complete:
                raise _Fail(index, f"record {index} (line {index + 1}) is incomplete (torn write; AuditLog.open recovers it)")
            try:
                rec = _parse_line(line, index)
            except AuditError as exc:
                raise _Fail(index, str(exc)) from exc
            where = f"record {index} (line {index + 1})"
            if rec["seq"] != index:
                raise _Fail(index, f"{where}: sequence number {rec['seq']}, expected {index} (re-ordered or deleted records)")
            if rec["prev"] != prev:
                raise _Fail(index, f"{where}: previous-record hash does not match (edited, re-ordered or deleted records)")
            details, event = rec["details"], rec["event"]
            if index == 0:
                if event != EV_CREATED or details.get("owner") != owner.fingerprint:
                    raise _Fail(index, f"{where}: log does not start with log.created for owner {owner.short}")
                log_id = str(details.get("log_id"))
            try:
                if event == EV_CHECKPOINT:
                    blob = _redump(details.get("checkpoint"))
                    if every_signature:
                        body = verify_message(blob, kind=CHECKPOINT_KIND, signer=owner)
                    else:
                        body = read_message_unchecked(blob, kind=CHECKPOINT_KIND, signer=owner)
                        last_unverified = (index, blob)
                    root = _root_str(acc)  # the tree over the `index` records before this one
                    if body.get("log_id") != log_id or body.get("tree_size") != index or body.get("root_hash") != root:
                        raise _Fail(index, f"{where}: checkpoint does not match the {index} records before it (edited log)")
                    checkpoints[digest(blob)] = (index, root)
                    n_cp += 1
                    anchored = index
                    pending = 0
                elif event == EV_COUNTERSIGN:
                    env = _envelope(details.get("countersignature"))
                    signer = entity_for(env)
                    if signer is None:
                        unverified += 1
                    else:
                        body = verify_message(env, kind=COUNTERSIGN_KIND, signer=signer)
                        ref = checkpoints.get(str(body.get("checkpoint")))
                        if ref is None or body.get("tree_size") != ref[0] or body.get("root_hash") != ref[1]:
                            raise _Fail(index, f"{where}: countersignature refers to no checkpoint earlier in this log")
                        countersigned = max(countersigned, ref[0])
                elif event == EV_SENT:
                    sent[(str(details.get("job_id")), str(details.get("statement")))] = details
                elif event == EV_RECEIPT:
                    env = _envelope(details.get("receipt"))
                    signer = entity_for(env)
                    if signer is None:
                        unverified += 1
                    else:
                        body = verify_message(env, kind=RECEIPT_KIND, signer=signer)
                        match = sent.get((str(body.get("job_id")), str(body.get("statement"))))
                        if (
                            match is None
                            or match.get("files") != body.get("files")
                            or match.get("peer") != signer.fingerprint
                            or body.get("sender") != owner.fingerprint
                        ):
                            raise _Fail(index, f"{where}: receipt does not match any transfer sent earlier in this log")
                        receipts += 1
            except (ProtocolError, canonical.CanonicalJSONError) as exc:
                raise _Fail(index, f"{where}: {exc}") from exc
            if event not in (EV_CHECKPOINT, EV_COUNTERSIGN, EV_RECEIPT):
                pending += 1
            prev = _line_hash(line)
            acc.append_leaf(line)
            if external is not None and external[0] == index + 1:
                external_root = _root_str(acc)
            count = index + 1
    except _Fail as fail:
        return AuditVerdict(False, fail.index, n_cp, anchored, countersigned, receipts, str(fail), fail.index, log_id)
    except AuditError as exc:  # from iter_lines: not a regular file
        return AuditVerdict(False, 0, 0, 0, 0, 0, error=str(exc), first_bad=0, log_id=log_id)
    except OSError as exc:
        return AuditVerdict(False, 0, 0, 0, 0, 0, error=f"cannot read {path}: {exc.strerror}", log_id=log_id)
    if count == 0:
        return AuditVerdict(False, 0, 0, 0, 0, 0, error="audit log is empty", first_bad=0)
    if last_unverified is not None:
        try:
            verify_message(last_unverified[1], kind=CHECKPOINT_KIND, signer=owner)
        except ProtocolError as exc:
            index = last_unverified[0]
            return AuditVerdict(False, index, n_cp - 1, 0, 0, 0, f"record {index} (line {index + 1}): {exc}", index, log_id)
    if external is not None:
        size, root, ext_log = external
        if ext_log != log_id or size > count or external_root != root:
            return AuditVerdict(
                False,
                count,
                n_cp,
                anchored,
                countersigned,
                receipts,
                f"log truncated or rewritten: external checkpoint of {size} records does not match",
                min(count, size),
                log_id,
            )
    if n_cp == 0:
        if not allow_unanchored:
            return AuditVerdict(
                False,
                count,
                0,
                0,
                countersigned,
                receipts,
                f"no signed checkpoint: nothing in this log is signed by owner {owner.short}, so anyone holding its "
                "public card could have written it (--allow-unanchored checks only the hash chain)",
                0,
                log_id,
            )
        warnings.append(
            f"no signed checkpoint: only the hash chain of the {count} record(s) was checked, "
            "nothing is signed by the owner (weaker check, --allow-unanchored)"
        )
        pending = 0
    if unverified:
        warnings.append(f"{unverified} entity signature(s) not verified (no card given for their signer)")
    if pending:
        warnings.append(f"{pending} record(s) after the last checkpoint are not yet anchored by a signed checkpoint")
    return AuditVerdict(True, count, n_cp, anchored, countersigned, receipts, None, None, log_id, tuple(warnings))
