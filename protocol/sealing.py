"""Sealing: sign a bundle of named files, then seal it to one recipient with HPKE.

Wire format (all lengths big-endian)::

    sealed  = b"BPSEAL1\\n" | u32 len | header (canonical JSON) | HPKE ciphertext (enc || ct)
    header  = {"v": 1, "suite", "kind", "job_id", "request_hash", "sender", "recipient"}
    plain   = b"BPBNDL1\\n" | u32 len | DSSE envelope (in-toto statement) | u32 count
              | count x (u16 len | file name | u64 len | file bytes)          (sorted by name)

HPKE is RFC 9180 base mode, X25519 / HKDF-SHA256 / AES-256-GCM, with ``info`` = a fixed label
plus the canonical JSON of kind, job id, request hash, sender and recipient. The clear header is
for routing only: every field of it is bound through ``info``, so editing it makes opening fail.
A bundle from another job or answering another request cannot be opened as this one (replay).

Order on opening: framing checks, admission of the sender, HPKE open, DSSE signature over the
statement bytes, statement bindings, then every file and tensor hash. ``open_bundle`` returns an
``OpenedBundle`` only when everything holds; on failure it raises and leaves nothing behind.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke

from . import canonical
from .errors import AdmissionError, ArtifactError, ReplayError, SealError
from .keys import Identity, IdentityCard
from .signing import FILE_NAME_RE, check_kind, digest, make_statement, sign_statement, subject_digests
from .verifying import check_statement, verify_statement_envelope

__all__ = [
    "BUNDLE_MAGIC",
    "DEFAULT_MAX_BUNDLE",
    "INFO_LABEL",
    "MAX_FILES",
    "MAX_HEADER",
    "OpenedBundle",
    "SEAL_MAGIC",
    "SUITE_NAME",
    "Sealed",
    "open_bundle",
    "peek_header",
    "seal_bundle",
    "seal_bundle_detailed",
    "sender_fingerprint",
]

SEAL_MAGIC = b"BPSEAL1\n"
BUNDLE_MAGIC = b"BPBNDL1\n"
SUITE_NAME = "DHKEM(X25519,HKDF-SHA256)/HKDF-SHA256/AES-256-GCM"
INFO_LABEL = b"blindprune/seal/v1\n"
MAX_HEADER = 64 * 1024
MAX_FILES = 64
DEFAULT_MAX_BUNDLE = 4 * 1024**3
_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
_ENC_LEN = 32
_TAG_LEN = 16


@dataclass(frozen=True)
class OpenedBundle:
    """The trusted view of a verified bundle: files, claims, sender and the signed statement."""

    files: Mapping[str, bytes]
    claims: Mapping[str, Any]
    sender: IdentityCard
    statement: Mapping[str, Any]
    envelope: bytes = field(repr=False)
    kind: str = ""
    job_id: str = ""
    request_hash: str = ""

    @property
    def statement_hash(self) -> str:
        """``sha256:`` of the signed envelope bytes: what receipts and audit records cite."""
        return digest(self.envelope)

    def file_digests(self) -> dict[str, str]:
        return subject_digests(self.statement["subject"])


def _info(kind: str, job_id: str, request_hash: str, sender: str, recipient: str) -> bytes:
    return INFO_LABEL + canonical.dumps({"kind": kind, "job_id": job_id, "request_hash": request_hash, "sender": sender, "recipient": recipient})


def _check_id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not (1 <= len(value) <= 256) or not value.isprintable():
        raise SealError(f"{what} must be a short printable string")
    return value


@dataclass(frozen=True)
class Sealed:
    """What ``seal_bundle_detailed`` produced: the wire bytes plus what the sender should log."""

    blob: bytes = field(repr=False)
    statement: Mapping[str, Any]
    envelope: bytes = field(repr=False)

    @property
    def statement_hash(self) -> str:
        return digest(self.envelope)

    @property
    def kind(self) -> str:
        return self.statement["predicate"]["kind"]

    @property
    def job_id(self) -> str:
        return self.statement["predicate"]["job_id"]

    def file_digests(self) -> dict[str, str]:
        return subject_digests(self.statement["subject"])


def seal_bundle(
    files: Mapping[str, bytes],
    *,
    kind: str,
    job_id: str,
    request_hash: str,
    sender: Identity,
    recipient: IdentityCard,
    claims: Mapping[str, Any] | None = None,
) -> bytes:
    """Sign an in-toto statement of ``files`` and seal statement + files to ``recipient``.

    ``request_hash`` is the ``digest()`` of what this bundle answers (the offer for a model
    artifact, ``request.json`` for a result). ``claims`` is small canonical JSON (no floats).
    """
    return seal_bundle_detailed(files, kind=kind, job_id=job_id, request_hash=request_hash, sender=sender, recipient=recipient, claims=claims).blob


def seal_bundle_detailed(
    files: Mapping[str, bytes],
    *,
    kind: str,
    job_id: str,
    request_hash: str,
    sender: Identity,
    recipient: IdentityCard,
    claims: Mapping[str, Any] | None = None,
) -> Sealed:
    """``seal_bundle`` that also returns the signed statement (for ``AuditLog.record_sent``)."""
    check_kind(kind)
    _check_id(job_id, "job id")
    _check_id(request_hash, "request hash")
    if not files or len(files) > MAX_FILES:
        raise ArtifactError(f"a bundle holds 1 to {MAX_FILES} files, got {len(files)}")
    statement = make_statement(
        files,
        kind=kind,
        job_id=job_id,
        request_hash=request_hash,
        sender=sender.card,
        recipient=recipient,
        claims=claims or {},
    )
    envelope = sign_statement(statement, sender)
    blob = _seal_frames(envelope, files, kind, job_id, request_hash, sender.fingerprint, recipient)
    return Sealed(blob=blob, statement=MappingProxyType(statement), envelope=envelope)


def _seal_frames(
    envelope: bytes,
    files: Mapping[str, bytes],
    kind: str,
    job_id: str,
    request_hash: str,
    sender_fp: str,
    recipient: IdentityCard,
) -> bytes:
    """Frame envelope + files and seal them (no checks: callers check; tests forge with it)."""
    parts: list[bytes] = [BUNDLE_MAGIC, struct.pack(">I", len(envelope)), envelope, struct.pack(">I", len(files))]
    for name in sorted(files):
        raw = name.encode("utf-8")
        parts += [struct.pack(">H", len(raw)), raw, struct.pack(">Q", len(files[name])), files[name]]
    plaintext = b"".join(parts)
    del parts
    header = canonical.dumps(
        {
            "v": 1,
            "suite": SUITE_NAME,
            "kind": kind,
            "job_id": job_id,
            "request_hash": request_hash,
            "sender": sender_fp,
            "recipient": recipient.fingerprint,
        }
    )
    info = _info(kind, job_id, request_hash, sender_fp, recipient.fingerprint)
    sealed = _SUITE.encrypt(plaintext, recipient.seal_key(), info=info)
    del plaintext
    return b"".join([SEAL_MAGIC, struct.pack(">I", len(header)), header, sealed])


def _read_header(blob: bytes) -> tuple[dict[str, Any], int]:
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise SealError("sealed bundle must be bytes")
    if len(blob) < len(SEAL_MAGIC) + 4 or bytes(blob[: len(SEAL_MAGIC)]) != SEAL_MAGIC:
        raise SealError("not a blindprune sealed bundle (bad magic)")
    (n,) = struct.unpack(">I", blob[len(SEAL_MAGIC) : len(SEAL_MAGIC) + 4])
    start = len(SEAL_MAGIC) + 4
    if n > MAX_HEADER or start + n > len(blob):
        raise SealError("sealed bundle header length is out of bounds")
    try:
        header = canonical.loads(bytes(blob[start : start + n]))
    except canonical.CanonicalJSONError as exc:
        raise SealError(f"sealed bundle header is malformed: {exc}") from exc
    keys = {"v", "suite", "kind", "job_id", "request_hash", "sender", "recipient"}
    if not isinstance(header, dict) or set(header) != keys or header["v"] != 1 or header["suite"] != SUITE_NAME:
        raise SealError("sealed bundle header has an unknown version, suite or fields")
    for key in ("kind", "job_id", "request_hash", "sender", "recipient"):
        _check_id(header[key], f"sealed bundle {key}")
    return header, start + n


def sender_fingerprint(blob: bytes) -> str:
    """The fingerprint a sealed bundle claims as sender: for routing and messages, not trust."""
    header, _ = _read_header(blob)
    return header["sender"]


def peek_header(blob: bytes) -> dict[str, str]:
    """The clear routing header (kind, job id, sender, recipient): untrusted until opened."""
    header, _ = _read_header(blob)
    return {k: header[k] for k in ("kind", "job_id", "request_hash", "sender", "recipient")}


def _split_plaintext(plain: bytes) -> tuple[bytes, dict[str, bytes]]:
    view = memoryview(plain)
    pos = len(BUNDLE_MAGIC)
    if bytes(view[:pos]) != BUNDLE_MAGIC:
        raise SealError("opened bundle has a bad inner magic")

    def take(n: int) -> memoryview:
        nonlocal pos
        if n < 0 or pos + n > len(view):
            raise SealError("opened bundle is truncated or its lengths are inconsistent")
        out = view[pos : pos + n]
        pos += n
        return out

    (env_len,) = struct.unpack(">I", take(4))
    envelope = bytes(take(env_len))
    (count,) = struct.unpack(">I", take(4))
    if count > MAX_FILES:
        raise SealError(f"opened bundle claims {count} files (at most {MAX_FILES})")
    files: dict[str, bytes] = {}
    for _ in range(count):
        (name_len,) = struct.unpack(">H", take(2))
        try:
            name = bytes(take(name_len)).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SealError("opened bundle has a non-UTF-8 file name") from exc
        if not FILE_NAME_RE.match(name) or name in files:
            raise SealError(f"opened bundle has a bad or duplicate file name {name!r}")
        (size,) = struct.unpack(">Q", take(8))
        files[name] = bytes(take(size))
    if pos != len(view):
        raise SealError("opened bundle has trailing bytes")
    return envelope, files


def open_bundle(
    blob: bytes,
    *,
    kind: str,
    job_id: str,
    request_hash: str,
    recipient: Identity,
    senders: Mapping[str, IdentityCard],
    max_bytes: int = DEFAULT_MAX_BUNDLE,
) -> OpenedBundle:
    """Open and verify a sealed bundle; the returned view is the only trusted one.

    Raises ``AdmissionError`` (sender not in ``senders``), ``ReplayError`` (another job or
    request), ``SealError`` (wrong recipient, tampered ciphertext), ``SignatureError`` or
    ``ArtifactError`` (statement or file mismatch, pickles, bad safetensors).
    """
    if len(blob) > max_bytes:
        raise SealError(f"sealed bundle of {len(blob)} bytes exceeds the {max_bytes}-byte limit")
    header, body_start = _read_header(blob)
    if header["kind"] != kind:
        raise SealError(f"sealed bundle is a {header['kind']!r}, expected a {kind!r}")
    if header["job_id"] != job_id:
        raise ReplayError(f"sealed bundle is for job {header['job_id']!r}, expected {job_id!r} (replayed or misrouted)")
    if header["request_hash"] != request_hash:
        raise ReplayError(f"sealed bundle for job {job_id!r} answers another request (replayed or stale)")
    if header["recipient"] != recipient.fingerprint:
        raise SealError(f"sealed bundle is for recipient {header['recipient'][:16]}, not this party ({recipient.fingerprint[:16]})")
    sender = senders.get(header["sender"])
    if sender is None:
        raise AdmissionError(f"sender {header['sender'][:16]} is not registered here; add its identity card to the registry to admit it")
    if sender.fingerprint != header["sender"]:
        raise AdmissionError("registry maps a fingerprint to a card with other keys")
    if len(blob) - body_start < _ENC_LEN + _TAG_LEN:
        raise SealError("sealed bundle is truncated")
    info = _info(kind, job_id, request_hash, sender.fingerprint, recipient.fingerprint)
    try:
        plain = _SUITE.decrypt(memoryview(blob)[body_start:], recipient.sealing_key, info=info)
    except InvalidTag as exc:
        raise SealError("cannot open sealed bundle: tampered bytes, or sealed for another job, request or sender (replayed?)") from exc
    envelope, files = _split_plaintext(plain)
    del plain
    statement = verify_statement_envelope(envelope, sender)
    check_statement(statement, files, kind=kind, job_id=job_id, request_hash=request_hash, sender=sender, recipient=recipient.card)
    return OpenedBundle(
        files=MappingProxyType(files),
        claims=MappingProxyType(dict(statement["predicate"]["claims"])),
        sender=sender,
        statement=MappingProxyType(statement),
        envelope=envelope,
        kind=kind,
        job_id=job_id,
        request_hash=request_hash,
    )
