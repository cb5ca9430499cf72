"""Signing: DSSE envelopes over canonical JSON; in-toto statements over bundles of files.

Two shapes of signed content:

* a *message* (``sign_message`` / ``verify_message``): a small canonical-JSON payload with a
  ``kind`` and the signer's fingerprint, e.g. the entity's offer, an audit checkpoint, a receipt;
* a *statement* (``make_statement``; checked by ``verifying.check_statement``): an in-toto
  Statement v1 listing every file and every tensor of every ``*.safetensors`` file (name, dtype,
  shape, SHA-256), bound to a kind, job id, request hash, sender and recipient. A safetensors
  file's own digest is derived from its header and tensor digests (``sha256-safetensors``, see
  ``_wire.safetensors.tree_digest``) so that its bytes are hashed once; other files carry SHA-256.
  ``sealing.seal_bundle`` signs it and seals it together with the files.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

from . import canonical
from ._wire import dsse as _dsse
from ._wire.pickles import reject_pickles
from ._wire.safetensors import TREE_DIGEST, parse_header, tensor_digests, tree_digest
from .errors import ArtifactError, SignatureError
from .keys import Identity, IdentityCard

__all__ = [
    "BUNDLE_PREDICATE",
    "FILE_NAME_RE",
    "MESSAGE_PAYLOAD_TYPE",
    "MESSAGE_TYPE",
    "STATEMENT_TYPE",
    "check_kind",
    "describe_files",
    "digest",
    "make_statement",
    "message_signer",
    "read_message_unchecked",
    "sign_message",
    "sign_statement",
    "subject_digests",
    "verify_message",
]

MESSAGE_PAYLOAD_TYPE = "application/vnd.blindprune.message+json"
MESSAGE_TYPE = "blindprune/message/v1"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
BUNDLE_PREDICATE = "https://blindprune.dev/bundle/v1"
_KIND_RE = re.compile(r"^[a-z][a-z0-9._-]{0,63}$")
FILE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def digest(data: bytes | memoryview) -> str:
    """``sha256:<hex>``: how request hashes, statement hashes and log hashes are written."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_kind(kind: str) -> str:
    if not isinstance(kind, str) or not _KIND_RE.match(kind):
        raise SignatureError(f"message kind {kind!r} is not a short lowercase name")
    return kind


def sign_message(payload: Mapping[str, Any], *, kind: str, signer: Identity) -> bytes:
    """A DSSE envelope (canonical JSON bytes) over ``{kind, signer, body: payload}``."""
    body = canonical.dumps({"type": MESSAGE_TYPE, "kind": check_kind(kind), "signer": signer.fingerprint, "body": dict(payload)})
    return _dsse.sign(MESSAGE_PAYLOAD_TYPE, body, signer.signing_key, signer.fingerprint).to_bytes()


def verify_message(blob: bytes | Mapping[str, Any], *, kind: str, signer: IdentityCard) -> dict[str, Any]:
    """The payload of a message signed by ``signer`` under ``kind``; raises on any mismatch."""
    env = _dsse.parse(dict(blob) if isinstance(blob, Mapping) else blob)
    payload = _dsse.verify(env, signer.verify_key(), signer.fingerprint, MESSAGE_PAYLOAD_TYPE)
    return _message_body(payload, kind=kind, signer=signer)


def read_message_unchecked(blob: bytes | Mapping[str, Any], *, kind: str, signer: IdentityCard) -> dict[str, Any]:
    """The payload of a message *claimed* to be from ``signer``, without checking the signature.

    Only for content whose integrity is already covered by a verified signature over a hash of
    it (``verify_log(..., every_signature=False)``: earlier checkpoints are leaves of the Merkle
    tree that the last, verified checkpoint signs). Never use it on bytes received from a peer.
    """
    env = _dsse.parse(dict(blob) if isinstance(blob, Mapping) else blob)
    if env.keyid != signer.fingerprint or env.payload_type != MESSAGE_PAYLOAD_TYPE:
        raise SignatureError(f"message names key {env.keyid[:16]}, expected {signer.fingerprint[:16]} (wrong signer)")
    return _message_body(env.payload, kind=kind, signer=signer)


def _message_body(payload: bytes, *, kind: str, signer: IdentityCard) -> dict[str, Any]:
    try:
        data = canonical.loads(payload)
    except canonical.CanonicalJSONError as exc:
        raise SignatureError(f"signed message payload is not canonical JSON: {exc}") from exc
    if not isinstance(data, dict) or set(data) != {"type", "kind", "signer", "body"} or data["type"] != MESSAGE_TYPE:
        raise SignatureError("signed message payload has the wrong structure")
    if data["kind"] != kind:
        raise SignatureError(f"signed message is a {data['kind']!r}, expected a {kind!r}")
    if data["signer"] != signer.fingerprint or not isinstance(data["body"], dict):
        raise SignatureError("signed message names another signer")
    return data["body"]


def message_signer(blob: bytes | Mapping[str, Any]) -> str:
    """Fingerprint a message claims to be signed by (routing only; not trusted)."""
    return _dsse.parse(dict(blob) if isinstance(blob, Mapping) else blob).keyid


def describe_files(files: Mapping[str, bytes]) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Subjects (every file, sorted) and tensor listings (every ``*.safetensors`` file).

    Refuses pickled content and malformed safetensors files: a sender must not sign what a
    receiver is bound to refuse.
    """
    subjects: list[dict[str, Any]] = []
    tensors: dict[str, list[dict[str, Any]]] = {}
    for name in sorted(files):
        if not FILE_NAME_RE.match(name):
            raise ArtifactError(f"file name {name!r} is not a plain file name")
        data = files[name]
        reject_pickles(name, data)
        if not name.endswith(".safetensors"):
            subjects.append({"name": name, "digest": {"sha256": hashlib.sha256(data).hexdigest()}})
            continue
        header = parse_header(data, what=name)
        digests = tensor_digests(data, header)
        subjects.append({"name": name, "digest": {TREE_DIGEST: tree_digest(data, header, digests)}})
        tensors[name] = [
            {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "sha256": digests[t.name]}
            for t in sorted(header.tensors.values(), key=lambda t: t.name)
        ]
    return subjects, tensors


def subject_digests(subjects: list[dict[str, Any]]) -> dict[str, str]:
    """``name -> "<algorithm>:<hex>"`` for a statement's subjects (what audit records and receipts cite).

    A ``*.safetensors`` file is cited by its ``sha256-safetensors`` digest (``tree_digest``),
    every other file by its plain SHA-256; statements from older senders cite safetensors files by
    plain SHA-256 too, and those still read as such.
    """
    out = {}
    for subject in subjects:
        ((algorithm, value),) = subject["digest"].items()
        out[subject["name"]] = f"{algorithm}:{value}"
    return out


def make_statement(
    files: Mapping[str, bytes],
    *,
    kind: str,
    job_id: str,
    request_hash: str,
    sender: IdentityCard,
    recipient: IdentityCard,
    claims: Mapping[str, Any],
) -> dict[str, Any]:
    subjects, tensors = describe_files(files)
    return {
        "_type": STATEMENT_TYPE,
        "subject": subjects,
        "predicateType": BUNDLE_PREDICATE,
        "predicate": {
            "kind": check_kind(kind),
            "job_id": job_id,
            "request_hash": request_hash,
            "sender": sender.fingerprint,
            "recipient": recipient.fingerprint,
            "claims": dict(claims),
            "tensors": tensors,
        },
    }


def sign_statement(statement: Mapping[str, Any], signer: Identity) -> bytes:
    return _dsse.sign(_dsse.INTOTO_PAYLOAD_TYPE, canonical.dumps(dict(statement)), signer.signing_key, signer.fingerprint).to_bytes()
