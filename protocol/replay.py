"""Replay protection: offers issued once, (job id, nonce) pairs accepted once, across restarts.

The entity ``issue()``s an offer (fresh job id + nonce) and later ``redeem()``s it when the
owner's request arrives: an unknown or already-redeemed offer is a ``ReplayError``. The owner
``accept_once()``s each message it acts on under its (job id, nonce) and a *scope* naming the
step (``"offer"`` when it answers an offer, ``"result"`` when it accepts a result), so one job's
offer and result do not collide while a replay of either is refused. State is an append-only file
(one canonical-JSON line per event, fsynced) so a restarted process still refuses old messages; a
torn final line left by a crash is dropped (the event it described never completed). One process
owns a store at a time.
"""

from __future__ import annotations

import os
import secrets
import threading
from pathlib import Path

from . import canonical
from .errors import ReplayError

__all__ = ["NonceStore", "OFFER_SCOPE", "RESULT_SCOPE", "new_job_id", "new_nonce"]

OFFER_SCOPE = "offer"
RESULT_SCOPE = "result"


def new_job_id() -> str:
    return "job-" + secrets.token_hex(12)


def new_nonce() -> str:
    return secrets.token_hex(16)


class NonceStore:
    """Persistent sets of issued offers and used (scope, job id, nonce); ``path=None``: in memory."""

    def __init__(self, path: Path | None = None) -> None:
        self._path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._issued: set[tuple[str, str]] = set()
        self._used: set[tuple[str, str, str]] = set()
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
                op, job_id, nonce = rec["op"], rec["job_id"], rec["nonce"]
                # lines written before scopes existed carry none: count them as used in every scope
                scopes = [rec["scope"]] if "scope" in rec else [OFFER_SCOPE, RESULT_SCOPE]
                if not all(isinstance(v, str) for v in (op, job_id, nonce, *scopes)) or op not in ("issue", "use"):
                    raise TypeError("bad field")
            except (canonical.CanonicalJSONError, KeyError, TypeError) as exc:
                raise ReplayError(f"nonce store {self._path} is corrupt") from exc
            if op == "issue":
                self._issued.add((job_id, nonce))
            else:
                self._used.update((scope, job_id, nonce) for scope in scopes)

    def _record(self, op: str, scope: str, job_id: str, nonce: str) -> None:
        if self._path is None:
            return
        line = canonical.dumps({"op": op, "scope": scope, "job_id": job_id, "nonce": nonce}) + b"\n"
        try:
            fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise ReplayError(f"cannot record in nonce store {self._path}: {exc.strerror}") from exc

    def issue(self, job_id: str | None = None) -> tuple[str, str]:
        """A fresh (job id, nonce) for an offer, remembered until redeemed."""
        with self._lock:
            job, nonce = job_id or new_job_id(), new_nonce()
            self._record("issue", OFFER_SCOPE, job, nonce)
            self._issued.add((job, nonce))
            return job, nonce

    def redeem(self, job_id: str, nonce: str) -> None:
        """Accept a request answering an offer this side issued, exactly once."""
        with self._lock:
            if (job_id, nonce) not in self._issued:
                raise ReplayError(f"job {job_id!r}: no offer with this nonce was issued here (forged or stale)")
            if (OFFER_SCOPE, job_id, nonce) in self._used:
                raise ReplayError(f"job {job_id!r}: this offer was already answered (replayed request)")
            self._record("use", OFFER_SCOPE, job_id, nonce)
            self._used.add((OFFER_SCOPE, job_id, nonce))

    def accept_once(self, job_id: str, nonce: str, *, scope: str = RESULT_SCOPE) -> None:
        """Accept one message for (scope, job id, nonce); a second one is a replay."""
        with self._lock:
            key = (scope, job_id, nonce)
            if key in self._used:
                raise ReplayError(f"job {job_id!r}: a {scope} with this nonce was already accepted (replayed)")
            self._record("use", scope, job_id, nonce)
            self._used.add(key)

    def seen(self, job_id: str, nonce: str, *, scope: str = RESULT_SCOPE) -> bool:
        return (scope, job_id, nonce) in self._used
