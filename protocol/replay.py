"""Replay protection: offers issued once, (job id, nonce) pairs accepted once, across restarts.

The entity ``issue()``s an offer (fresh job id + nonce) and later ``redeem()``s it when the
owner's request arrives: an unknown or already-redeemed offer is a ``ReplayError``. The owner
``accept_once()``s each result it opens under its (job id, nonce). State is an append-only file
(one canonical-JSON line per event, fsynced) so a restarted process still refuses old messages;
a torn final line left by a crash is ignored (the event it described never completed).
"""
from __future__ import annotations

import os
import secrets
import threading
from pathlib import Path

from . import canonical
from .errors import ReplayError


def new_job_id() -> str:
    return "job-" + secrets.token_hex(12)


def new_nonce() -> str:
    return secrets.token_hex(16)


class NonceStore:
    """Persistent sets of issued offers and used (job id, nonce) pairs; ``path=None`` keeps them in memory."""

    def __init__(self, path: Path | None = None) -> None:
        self._path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._issued: set[tuple[str, str]] = set()
        self._used: set[tuple[str, str]] = set()
        if self._path is not None and self._path.exists():
            self._load()

    def _load(self) -> None:
        assert self._path is not None
        data = self._path.read_bytes()
        lines = data.split(b"\n")
        if data and not data.endswith(b"\n"):
            lines = lines[:-1]  # torn final line: the event never completed; drop it so appends stay whole
            os.truncate(self._path, data.rfind(b"\n") + 1)
        for line in lines:
            if not line:
                continue
            try:
                rec = canonical.loads(line)
                key = (str(rec["job_id"]), str(rec["nonce"]))
                op = rec["op"]
            except (canonical.CanonicalJSONError, KeyError, TypeError) as exc:
                raise ReplayError(f"nonce store {self._path} is corrupt") from exc
            (self._issued if op == "issue" else self._used).add(key)

    def _record(self, op: str, job_id: str, nonce: str) -> None:
        if self._path is None:
            return
        line = canonical.dumps({"op": op, "job_id": job_id, "nonce": nonce}) + b"\n"
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def issue(self, job_id: str | None = None) -> tuple[str, str]:
        """A fresh (job id, nonce) for an offer, remembered until redeemed."""
        with self._lock:
            key = (job_id or new_job_id(), new_nonce())
            self._record("issue", *key)
            self._issued.add(key)
            return key

    def redeem(self, job_id: str, nonce: str) -> None:
        """Accept a request answering an offer this side issued, exactly once."""
        with self._lock:
            key = (job_id, nonce)
            if key not in self._issued:
                raise ReplayError(f"job {job_id!r}: no offer with this nonce was issued here (forged or stale)")
            if key in self._used:
                raise ReplayError(f"job {job_id!r}: this offer was already answered (replayed request)")
            self._record("use", *key)
            self._used.add(key)

    def accept_once(self, job_id: str, nonce: str) -> None:
        """Accept one message for (job id, nonce); a second one is a replay."""
        with self._lock:
            key = (job_id, nonce)
            if key in self._used:
                raise ReplayError(f"job {job_id!r}: a message with this nonce was already accepted (replayed)")
            self._record("use", *key)
            self._used.add(key)

    def seen(self, job_id: str, nonce: str) -> bool:
        return (job_id, nonce) in self._used
