"""The entity's durable job journal: every admitted job, from its sealed request to its delivery.

A job enters the journal when its request arrives, before it is queued, with the sealed request
and the offer it answers stored beside it (``HOME/jobs/JOB/``, files 0600): after a kill -9 the
restarted service reads the journal and either prunes the job again from its stored request or,
past a bounded number of attempts, refuses it with a stored reason, so no job is forgotten. A
finished job keeps its sealed result until its owner collects it (the owner resumes with the job
id); once delivered, the owner's model and the result are deleted: the entity keeps nothing of an
owner's model longer than the job needs.

SQLite in WAL mode with ``synchronous=FULL``: each state change is one committed, fsynced
transaction. Only the ServerApp's loop thread writes it.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from protocol._files import atomic_write

QUEUED, PRUNING, DONE, DELIVERED, REFUSED = "queued", "pruning", "done", "delivered", "refused"
OPEN_STATES = (QUEUED, PRUNING, DONE)
REQUEST_BLOB = "request.sealed"
RESULT_BLOB = "result.sealed"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    nonce TEXT NOT NULL,
    offer BLOB NOT NULL,
    checkpoint BLOB,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '',
    request_bytes INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    updated REAL NOT NULL
)
"""


@dataclass(frozen=True)
class JournalEntry:
    job_id: str
    owner: str
    nonce: str
    offer: bytes
    checkpoint: bytes | None
    state: str
    attempts: int
    reason: str
    request_bytes: int
    created: float


class JobJournal:
    """The jobs table plus each job's stored blobs under ``root/JOB/``."""

    def __init__(self, path: Path, blobs: Path):
        self.path = Path(path)
        self.blobs = Path(blobs)
        self.blobs.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path.touch(mode=0o600, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def _dir(self, job_id: str) -> Path:
        # Job ids are ours (NonceStore.issue: URL-safe random text), never the owner's.
        return self.blobs / job_id

    def add(self, job_id: str, *, owner: str, nonce: str, offer: bytes, checkpoint: bytes | None, request: bytes) -> None:
        """Store the sealed request, then the job as queued (a crash between leaves only an orphan file)."""
        folder = self._dir(job_id)
        folder.mkdir(mode=0o700, exist_ok=True)
        atomic_write(folder / REQUEST_BLOB, request)
        now = time.time()
        self._db.execute(
            "INSERT INTO jobs (job_id, owner, nonce, offer, checkpoint, state, request_bytes, created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (job_id, owner, nonce, offer, checkpoint, QUEUED, len(request), now, now),
        )

    def set_state(self, job_id: str, state: str, reason: str = "", *, attempt: bool = False) -> None:
        self._db.execute(
            "UPDATE jobs SET state = ?, reason = ?, attempts = attempts + ?, updated = ? WHERE job_id = ?",
            (state, reason, 1 if attempt else 0, time.time(), job_id),
        )

    def store_result(self, job_id: str, blob: bytes) -> None:
        """The sealed result, kept until the owner has it (so a lost connection loses nothing)."""
        atomic_write(self._dir(job_id) / RESULT_BLOB, blob)
        self.set_state(job_id, DONE)

    def request(self, job_id: str) -> bytes:
        return (self._dir(job_id) / REQUEST_BLOB).read_bytes()

    def result(self, job_id: str) -> bytes:
        return (self._dir(job_id) / RESULT_BLOB).read_bytes()

    def finish(self, job_id: str, state: str, reason: str = "") -> None:
        """Delivered or refused: record it, then delete the owner's model and the result."""
        self.set_state(job_id, state, reason)
        folder = self._dir(job_id)
        for name in (REQUEST_BLOB, RESULT_BLOB):
            (folder / name).unlink(missing_ok=True)
        try:
            folder.rmdir()
        except OSError:
            pass

    def get(self, job_id: str) -> JournalEntry | None:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return None if row is None else JournalEntry(*row)

    def open_jobs(self) -> Iterator[JournalEntry]:
        """Jobs not yet delivered or refused, oldest first."""
        marks = ", ".join("?" for _ in OPEN_STATES)
        for row in self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE state IN ({marks}) ORDER BY created", OPEN_STATES).fetchall():
            yield JournalEntry(*row)

    def in_flight(self, owner: str) -> int:
        """This owner's jobs queued or pruning (a per-owner limit counts these)."""
        row = self._db.execute("SELECT COUNT(*) FROM jobs WHERE owner = ? AND state IN (?, ?)", (owner, QUEUED, PRUNING)).fetchone()
        return int(row[0])


_COLUMNS = "job_id, owner, nonce, offer, checkpoint, state, attempts, reason, request_bytes, created"
