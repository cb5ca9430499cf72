"""Replay protection: offers redeemed once, results accepted once, across restarts."""

from __future__ import annotations

from pathlib import Path

import pytest

from protocol.errors import ReplayError
from protocol.replay import NonceStore


def test_offer_is_redeemed_exactly_once_and_survives_restart(tmp_path: Path) -> None:
    store = NonceStore(tmp_path / "nonces.jsonl")
    job, nonce = store.issue()
    restarted = NonceStore(tmp_path / "nonces.jsonl")
    restarted.redeem(job, nonce)
    with pytest.raises(ReplayError, match="already answered"):
        NonceStore(tmp_path / "nonces.jsonl").redeem(job, nonce)


def test_unissued_offer_is_refused() -> None:
    store = NonceStore()
    job, _ = store.issue()
    with pytest.raises(ReplayError, match="no offer"):
        store.redeem(job, "f" * 32)


def test_result_is_accepted_once_per_job_and_nonce(tmp_path: Path) -> None:
    store = NonceStore(tmp_path / "seen.jsonl")
    store.accept_once("job-1", "n1")
    store.accept_once("job-1", "n2")
    with pytest.raises(ReplayError, match="already accepted"):
        NonceStore(tmp_path / "seen.jsonl").accept_once("job-1", "n1")


def test_torn_last_line_is_ignored_and_corruption_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "seen.jsonl"
    store = NonceStore(path)
    store.accept_once("job-1", "n1")
    with path.open("ab") as handle:
        handle.write(b'{"job_id":"job-2","no')
    recovered = NonceStore(path)
    assert recovered.seen("job-1", "n1")
    recovered.accept_once("job-2", "n2")
    assert NonceStore(path).seen("job-2", "n2")
    path.write_bytes(b"garbage\n")
    with pytest.raises(ReplayError, match="corrupt"):
        NonceStore(path)


def test_scopes_keep_one_jobs_offer_and_result_apart(tmp_path: Path) -> None:
    store = NonceStore(tmp_path / "owner.jsonl")
    store.accept_once("job-1", "n1", scope="offer")
    store.accept_once("job-1", "n1", scope="result")
    with pytest.raises(ReplayError, match="offer with this nonce was already accepted"):
        NonceStore(tmp_path / "owner.jsonl").accept_once("job-1", "n1", scope="offer")


def test_store_written_before_scopes_existed_still_refuses_its_nonces(tmp_path: Path) -> None:
    path = tmp_path / "old.jsonl"
    path.write_bytes(b'{"job_id":"job-1","nonce":"n1","op":"issue"}\n{"job_id":"job-1","nonce":"n1","op":"use"}\n')
    store = NonceStore(path)
    with pytest.raises(ReplayError):
        store.redeem("job-1", "n1")
    with pytest.raises(ReplayError):
        store.accept_once("job-1", "n1")
