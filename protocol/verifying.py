"""Verifying: the only way a bundle's statement and files become trusted.

``check_statement`` verifies the DSSE signature over the statement bytes first, then the
statement's bindings (kind, job, request, sender, recipient), then that the files present are
exactly the files listed (naming any extra, missing or changed file), their digests, and for each
``*.safetensors`` file every tensor's name, dtype, shape and SHA-256 after a strict header parse
(the file's own ``sha256-safetensors`` digest is then derived from those, not hashed again).
Nothing is returned before all of that holds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from . import canonical
from ._wire import dsse as _dsse
from ._wire.pickles import reject_pickles
from ._wire.safetensors import TREE_DIGEST, parse_header, tensor_digests, tree_digest
from .errors import ArtifactError, ReplayError, SignatureError
from .keys import IdentityCard
from .signing import BUNDLE_PREDICATE, FILE_NAME_RE, STATEMENT_TYPE

__all__ = ["check_statement", "verify_statement_envelope"]


def verify_statement_envelope(envelope: bytes, signer: IdentityCard) -> dict[str, Any]:
    """Verify the envelope's signature, then parse the in-toto statement it carries."""
    env = _dsse.parse(envelope)
    payload = _dsse.verify(env, signer.verify_key(), signer.fingerprint, _dsse.INTOTO_PAYLOAD_TYPE)
    try:
        statement = canonical.loads(payload)
    except canonical.CanonicalJSONError as exc:
        raise SignatureError(f"signed statement is not canonical JSON: {exc}") from exc
    if (
        not isinstance(statement, dict)
        or set(statement) != {"_type", "subject", "predicateType", "predicate"}
        or statement["_type"] != STATEMENT_TYPE
        or statement["predicateType"] != BUNDLE_PREDICATE
        or not isinstance(statement["predicate"], dict)
        or not isinstance(statement["subject"], list)
    ):
        raise SignatureError("signed statement is not a blindprune bundle statement (in-toto v1)")
    return statement


def check_statement(
    statement: Mapping[str, Any],
    files: Mapping[str, bytes],
    *,
    kind: str,
    job_id: str,
    request_hash: str,
    sender: IdentityCard,
    recipient: IdentityCard,
) -> None:
    """Raise unless ``statement`` (already signature-verified) binds and describes ``files``."""
    pred = statement["predicate"]
    expected = {"kind", "job_id", "request_hash", "sender", "recipient", "claims", "tensors"}
    if set(pred) != expected or not isinstance(pred["claims"], dict) or not isinstance(pred["tensors"], dict):
        raise SignatureError("signed statement predicate has the wrong fields")
    if pred["kind"] != kind:
        raise SignatureError(f"signed statement is for a {pred['kind']!r}, expected a {kind!r}")
    if pred["job_id"] != job_id:
        raise ReplayError(f"signed statement is for job {pred['job_id']!r}, expected {job_id!r} (replayed?)")
    if pred["request_hash"] != request_hash:
        raise ReplayError("signed statement answers another request (request hash differs; replayed?)")
    if pred["sender"] != sender.fingerprint or pred["recipient"] != recipient.fingerprint:
        raise SignatureError("signed statement names another sender or recipient")

    listed: dict[str, tuple[str, str]] = {}  # name -> (digest algorithm, hex)
    for subject in statement["subject"]:
        if (
            not isinstance(subject, dict)
            or set(subject) != {"name", "digest"}
            or not isinstance(subject["name"], str)
            or not isinstance(subject["digest"], dict)
            or len(subject["digest"]) != 1
        ):
            raise SignatureError("signed statement has a malformed subject")
        ((algorithm, value),) = subject["digest"].items()
        allowed = {"sha256", TREE_DIGEST} if subject["name"].endswith(".safetensors") else {"sha256"}
        if algorithm not in allowed or not isinstance(value, str):
            raise SignatureError(f"signed statement cites {subject['name']!r} by an unknown digest")
        if subject["name"] in listed:
            raise SignatureError(f"signed statement lists {subject['name']!r} twice")
        listed[subject["name"]] = (algorithm, value)
    extra = sorted(set(files) - set(listed))
    missing = sorted(set(listed) - set(files))
    if extra:
        raise ArtifactError(f"unlisted file(s) in bundle: {', '.join(extra)}")
    if missing:
        raise ArtifactError(f"file(s) listed but absent: {', '.join(missing)}")
    tensor_files = {n for n in files if n.endswith(".safetensors")}
    if set(pred["tensors"]) != tensor_files:
        raise SignatureError("signed statement's tensor listings do not match the safetensors files")
    for name in sorted(files):
        if not FILE_NAME_RE.match(name):
            raise ArtifactError(f"file name {name!r} is not a plain file name")
        reject_pickles(name, files[name])
        if listed[name][0] == "sha256" and hashlib.sha256(files[name]).hexdigest() != listed[name][1]:
            raise ArtifactError(f"{name}: SHA-256 does not match the signed statement (tampered)")
    for name in sorted(tensor_files):
        header = parse_header(files[name], what=name)
        digests = tensor_digests(files[name], header)
        if listed[name][0] == TREE_DIGEST and tree_digest(files[name], header, digests) != listed[name][1]:
            raise ArtifactError(f"{name}: digest does not match the signed statement (tampered)")
        entries = pred["tensors"][name]
        if not isinstance(entries, list):
            raise SignatureError(f"{name}: malformed tensor listing")
        seen: set[str] = set()
        for entry in entries:
            if not isinstance(entry, dict) or set(entry) != {"name", "dtype", "shape", "sha256"}:
                raise SignatureError(f"{name}: malformed tensor listing entry")
            tname = entry["name"]
            info = header.tensors.get(tname) if isinstance(tname, str) else None
            if info is None:
                raise ArtifactError(f"{name}: listed tensor {tname!r} is absent")
            if entry["dtype"] != info.dtype or entry["shape"] != list(info.shape):
                raise ArtifactError(f"{name}: tensor {tname!r} dtype/shape differ from the signed statement")
            if entry["sha256"] != digests[tname]:
                raise ArtifactError(f"{name}: tensor {tname!r} bytes differ from the signed statement")
            seen.add(tname)
        if seen != set(header.tensors):
            extra_t = sorted(set(header.tensors) - seen)
            raise ArtifactError(f"{name}: unlisted tensor(s) {', '.join(extra_t[:5])}")
