"""DSSE envelopes (Dead Simple Signing Envelope v1) with Ed25519.

The signature covers ``PAE(payloadType, payload)``, so the payload type cannot be swapped and the
payload is verified as bytes before it is parsed. The envelope itself is canonical JSON, so an
envelope embedded in an audit record re-serialises to exactly the bytes that were received.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import SignatureError
from . import canonical

INTOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
MAX_ENVELOPE_BYTES = 16 * 1024 * 1024


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding."""
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64d(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise SignatureError(f"{what} is not a base64 string")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise SignatureError(f"{what} is not valid base64") from exc


@dataclass(frozen=True)
class Envelope:
    """A parsed (not yet trusted) envelope: a payload type, the payload bytes, one signature."""

    payload_type: str
    payload: bytes
    keyid: str
    sig: bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "payload": b64e(self.payload),
            "payloadType": self.payload_type,
            "signatures": [{"keyid": self.keyid, "sig": b64e(self.sig)}],
        }

    def to_bytes(self) -> bytes:
        return canonical.dumps(self.to_json())


def sign(payload_type: str, payload: bytes, key: Ed25519PrivateKey, keyid: str) -> Envelope:
    return Envelope(payload_type, payload, keyid, key.sign(pae(payload_type, payload)))


def parse(blob: bytes | dict[str, Any]) -> Envelope:
    """Parse an envelope's structure; trusts nothing (the signature is checked by ``verify``)."""
    if isinstance(blob, dict):
        data: Any = blob
    else:
        if len(blob) > MAX_ENVELOPE_BYTES:
            raise SignatureError(f"signed envelope too large ({len(blob)} bytes)")
        try:
            data = canonical.loads(bytes(blob))
        except canonical.CanonicalJSONError as exc:
            raise SignatureError(f"signed envelope is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or set(data) != {"payload", "payloadType", "signatures"}:
        raise SignatureError("signed envelope must have exactly payload, payloadType and signatures")
    if not isinstance(data["payloadType"], str):
        raise SignatureError("signed envelope payloadType is not a string")
    sigs = data["signatures"]
    if not isinstance(sigs, list) or len(sigs) != 1:
        raise SignatureError("signed envelope must carry exactly one signature")
    entry = sigs[0]
    if not isinstance(entry, dict) or set(entry) != {"keyid", "sig"} or not isinstance(entry["keyid"], str):
        raise SignatureError("signed envelope signature entry is malformed")
    sig = b64d(entry["sig"], "signature")
    if len(sig) != 64:
        raise SignatureError("signature is not 64 bytes (Ed25519)")
    return Envelope(data["payloadType"], b64d(data["payload"], "payload"), entry["keyid"], sig)


def verify(env: Envelope, public: Ed25519PublicKey, keyid: str, payload_type: str) -> bytes:
    """Return the payload bytes iff the envelope is signed by ``public`` under ``payload_type``."""
    if env.keyid != keyid:
        raise SignatureError(f"signed by key {env.keyid[:16]}, expected {keyid[:16]} (wrong signer)")
    if env.payload_type != payload_type:
        raise SignatureError(f"payload type {env.payload_type!r}, expected {payload_type!r}")
    try:
        public.verify(env.sig, pae(env.payload_type, env.payload))
    except InvalidSignature as exc:
        raise SignatureError(f"signature by {keyid[:16]} does not verify (tampered or wrong signer)") from exc
    return env.payload
