"""Protocol errors: one base class, one subclass per kind of refusal.

Every error's ``str()`` is one clear line that a CLI can print as is (``_fatal(str(exc))``): what
was refused and why, never a traceback. Callers catch ``ProtocolError`` at their boundary; code
inside ``protocol`` raises the most specific subclass so that tests and the flow can tell a
forged signature from a replay from an egress block.
"""

from __future__ import annotations

__all__ = [
    "AdmissionError",
    "ArtifactError",
    "AuditError",
    "EgressViolation",
    "KeyFileError",
    "MaskError",
    "ProtocolError",
    "ReplayError",
    "RequestError",
    "SealError",
    "SignatureError",
]


class ProtocolError(Exception):
    """Base of every refusal raised by ``protocol``."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class KeyFileError(ProtocolError):
    """A key or identity card file is missing, malformed, too permissive, or would be overwritten."""


class SignatureError(ProtocolError):
    """A DSSE envelope is malformed, signed by the wrong key, or its signature does not verify."""


class SealError(ProtocolError):
    """A sealed bundle cannot be opened: wrong recipient, tampered bytes, or a wrong binding."""


class AdmissionError(ProtocolError):
    """The peer's identity card is not registered (or pinned) on this side."""


class ReplayError(ProtocolError):
    """A message belongs to another job, or its (job id, nonce) was already used."""


class RequestError(ProtocolError):
    """An owner's ``request.json`` is malformed (its one-line reason, our own text, goes back to it)."""


class ArtifactError(ProtocolError):
    """A file inside a bundle is malformed: hash mismatch, bad safetensors header, pickled entry."""


class MaskError(ProtocolError):
    """A packed mask is malformed or a mask holds values other than 0 and 1."""


class EgressViolation(ProtocolError):
    """The owner's egress guard blocked an outbound payload."""


class AuditError(ProtocolError):
    """The audit log is broken, or cannot be written safely."""
