"""Audit log: hash chain, RFC 9162 checkpoints, countersignatures, receipts, crash safety."""

from __future__ import annotations

import base64
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from protocol import canonical
from protocol._wire.merkle import Accumulator, leaf_hash, node_hash, root_of
from protocol.audit import AuditLog, countersign_checkpoint, make_receipt, read_records, verify_log
from protocol.errors import AuditError, SignatureError
from protocol.keys import Identity
from protocol.sealing import open_bundle, seal_bundle_detailed
from protocol.signing import digest

OWNER = Identity.generate("owner", "clinic")
ENTITY = Identity.generate("entity", "service")
ROOT = Path(__file__).resolve().parents[2]


def _job(log: AuditLog) -> None:
    """One honest transfer as the flow runs it: send, checkpoint, countersign, receipt."""
    files = {"weights.safetensors": save({"w": torch.ones(3)}), "request.json": b'{"job_id":"job-1"}'}
    sealed = seal_bundle_detailed(files, kind="model", job_id="job-1", request_hash=digest(b"offer"), sender=OWNER, recipient=ENTITY.card)
    log.append("job.started", {"job_id": "job-1"})
    log.record_sent(sealed, recipient=ENTITY.card, request={"job_id": "job-1"})
    checkpoint = log.checkpoint()
    opened = open_bundle(
        sealed.blob, kind="model", job_id="job-1", request_hash=digest(b"offer"), recipient=ENTITY, senders={OWNER.fingerprint: OWNER.card}
    )
    log.record_countersignature(countersign_checkpoint(checkpoint, owner=OWNER.card, entity=ENTITY), entity=ENTITY.card)
    log.record_receipt(make_receipt(opened, entity=ENTITY, job_id="job-1"), entity=ENTITY.card)
    log.append("job.finished", {"job_id": "job-1"})
    log.checkpoint()


@pytest.fixture()
def honest(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    with AuditLog.open(path, OWNER) as log:
        _job(log)
    return path


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def _write(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def _append_unchecked(path: Path, event: str, details: dict) -> None:
    """Chain one record onto the log by hand, as a writer that skipped AuditLog's checks would."""
    lines = _lines(path)
    prev = "sha256:" + hashlib.sha256(lines[-1]).hexdigest()
    rec = {"seq": len(lines), "time": "2024-01-01T00:00:00Z", "event": event, "details": details, "prev": prev}
    _write(path, [*lines, canonical.dumps(rec)])


def test_merkle_tree_head_matches_rfc9162_definition() -> None:
    leaves = [bytes([i]) * i for i in range(20)]
    acc = Accumulator()
    for i, leaf in enumerate(leaves):
        acc.append_leaf(leaf)
        assert acc.root() == root_of(leaves[: i + 1])
    a, b, c = (leaf_hash(x) for x in leaves[:3])
    assert root_of(leaves[:3]) == node_hash(node_hash(a, b), c)
    assert root_of([]) == hashlib.sha256(b"").digest()


def test_honest_log_verifies_with_countersignatures_and_receipts(honest: Path) -> None:
    verdict = verify_log(honest, owner=OWNER.card, entity=ENTITY.card)
    assert verdict.ok, verdict.error
    assert verdict.records == len(_lines(honest))
    assert verdict.checkpoints == 2 and verdict.receipts == 1 and verdict.countersigned == 3
    assert verdict.warnings == ()


def test_without_entity_card_signatures_are_reported_unverified(honest: Path) -> None:
    verdict = verify_log(honest, owner=OWNER.card)
    assert verdict.ok and any("not verified" in w for w in verdict.warnings)


def test_records_are_canonical_json_without_floats(honest: Path) -> None:
    for line in _lines(honest):
        assert canonical.dumps(canonical.loads(line)) == line
    with AuditLog.open(honest, OWNER) as log, pytest.raises(AuditError, match="float"):
        log.append("eval", {"accuracy": 0.9})


def test_edited_record_is_named(honest: Path) -> None:
    lines = _lines(honest)
    lines[1] = lines[1].replace(b"job-1", b"job-2")
    _write(honest, lines)
    verdict = verify_log(honest, owner=OWNER.card, entity=ENTITY.card)
    assert not verdict.ok and verdict.first_bad == 2 and "record 2" in verdict.error


def test_edited_record_with_rebuilt_chain_fails_the_checkpoint(honest: Path) -> None:
    lines = _lines(honest)
    recs = [canonical.loads(line) for line in lines]
    recs[1]["details"]["job_id"] = "job-X"
    prev = "sha256:" + "0" * 64
    for rec in recs:  # an attacker without the owner's key re-chains every hash
        rec["prev"] = prev
        line = canonical.dumps(rec)
        prev = "sha256:" + hashlib.sha256(line).hexdigest()
    _write(honest, [canonical.dumps(r) for r in recs])
    verdict = verify_log(honest, owner=OWNER.card, entity=ENTITY.card)
    assert not verdict.ok and "checkpoint does not match" in verdict.error


def test_reordered_records_are_named(honest: Path) -> None:
    lines = _lines(honest)
    lines[1], lines[2] = lines[2], lines[1]
    _write(honest, lines)
    verdict = verify_log(honest, owner=OWNER.card)
    assert not verdict.ok and verdict.first_bad == 1 and "re-ordered" in verdict.error


def test_deleted_record_is_named(honest: Path) -> None:
    lines = _lines(honest)
    del lines[3]
    _write(honest, lines)
    verdict = verify_log(honest, owner=OWNER.card)
    assert not verdict.ok and verdict.first_bad == 3


def test_whitespace_edit_is_detected(honest: Path) -> None:
    lines = _lines(honest)
    lines[2] = lines[2].replace(b'","', b'", "', 1)
    _write(honest, lines)
    verdict = verify_log(honest, owner=OWNER.card)
    assert not verdict.ok and verdict.first_bad == 2


def test_truncation_below_a_countersigned_checkpoint_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog.open(path, OWNER) as log:
        for i in range(5):
            log.append("event", {"i": i})
        kept = log.checkpoint()  # e.g. held by the entity, countersigned
        log.append("event", {"i": 99})
        log.checkpoint()
    lines = _lines(path)
    _write(path, lines[:4])  # truncated at a line boundary: the chain alone cannot tell
    assert not verify_log(path, owner=OWNER.card).ok  # ... but no signed checkpoint is left in it
    assert verify_log(path, owner=OWNER.card, allow_unanchored=True).ok
    verdict = verify_log(path, owner=OWNER.card, checkpoint=kept)
    assert not verdict.ok and "truncated" in verdict.error


def test_torn_last_line_fails_verify_then_open_recovers_it(honest: Path) -> None:
    good = honest.read_bytes()
    honest.write_bytes(good + b'{"details":{"job_id":"jo')
    verdict = verify_log(honest, owner=OWNER.card)
    assert not verdict.ok and "torn" in verdict.error
    with AuditLog.open(honest, OWNER) as log:
        log.append("after.recovery", {})
    records = read_records(honest)
    assert [r["event"] for r in records[-2:]] == ["log.recovered", "after.recovery"]
    assert verify_log(honest, owner=OWNER.card, entity=ENTITY.card).ok


def test_log_of_another_owner_is_refused(honest: Path) -> None:
    other = Identity.generate("owner", "other")
    assert not verify_log(honest, owner=other.card).ok
    with pytest.raises(AuditError, match="another owner"):
        AuditLog.open(honest, other)


def test_resume_refuses_a_broken_chain(honest: Path) -> None:
    lines = _lines(honest)
    lines[1], lines[2] = lines[2], lines[1]
    _write(honest, lines)
    with pytest.raises(AuditError, match="breaks the hash chain"):
        AuditLog.open(honest, OWNER)


def test_second_writer_is_refused(tmp_path: Path) -> None:
    with AuditLog.open(tmp_path / "a.jsonl", OWNER):
        with pytest.raises(AuditError, match="in use"):
            AuditLog.open(tmp_path / "a.jsonl", OWNER)


def test_receipt_for_something_never_sent_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    files = {"a.bin": b"hello"}
    sealed = seal_bundle_detailed(files, kind="model", job_id="job-9", request_hash=digest(b"o"), sender=OWNER, recipient=ENTITY.card)
    opened = open_bundle(
        sealed.blob, kind="model", job_id="job-9", request_hash=digest(b"o"), recipient=ENTITY, senders={OWNER.fingerprint: OWNER.card}
    )
    receipt = make_receipt(opened, entity=ENTITY, job_id="job-9")
    with AuditLog.open(path, OWNER) as log, pytest.raises(AuditError, match="never recorded as sent"):
        log.record_receipt(receipt, entity=ENTITY.card)
    _append_unchecked(path, "receipt", {"entity": ENTITY.fingerprint, "receipt": canonical.loads(receipt)})
    verdict = verify_log(path, owner=OWNER.card, entity=ENTITY.card)
    assert not verdict.ok and "receipt does not match" in verdict.error


def test_countersignature_by_wrong_entity_is_refused_when_recorded(tmp_path: Path) -> None:
    with AuditLog.open(tmp_path / "a.jsonl", OWNER) as log:
        cp = log.checkpoint()
        forged = countersign_checkpoint(cp, owner=OWNER.card, entity=Identity.generate("entity"))
        with pytest.raises(SignatureError, match="wrong signer"):
            log.record_countersignature(forged, entity=ENTITY.card)


def test_countersign_refuses_a_checkpoint_not_signed_by_the_owner(tmp_path: Path) -> None:
    with AuditLog.open(tmp_path / "a.jsonl", Identity.generate("owner")) as log:
        cp = log.checkpoint()
    with pytest.raises(SignatureError):
        countersign_checkpoint(cp, owner=OWNER.card, entity=ENTITY)


_WRITER = """
import sys
from protocol.audit import AuditLog
from protocol.keys import load_identity
log = AuditLog.open(sys.argv[1], load_identity(sys.argv[2]))
i = 0
while True:
    log.append("tick", {"i": i, "pad": "x" * 2000})
    if i == 20:
        print("ready", flush=True)
    i += 1
"""


def test_killed_writer_leaves_a_valid_prefix(tmp_path: Path) -> None:
    from protocol.keys import init_identity, load_identity

    init_identity(tmp_path / "k", "owner")
    path = tmp_path / "audit.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(tmp_path / "k")], cwd=ROOT, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        time.sleep(0.2)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    owner = load_identity(tmp_path / "k")
    verdict = verify_log(path, owner=owner.card, allow_unanchored=True)  # killed before any checkpoint
    assert verdict.ok or "torn" in (verdict.error or "")
    with AuditLog.open(path, owner) as log:
        log.checkpoint()
    assert verify_log(path, owner=owner.card).ok


def _corrupt_checkpoint_signature(path: Path, which: int) -> None:
    """Replace the signature of the ``which``-th checkpoint and re-chain (an attacker without the key)."""
    recs = [canonical.loads(line) for line in _lines(path)]
    cps = [r for r in recs if r["event"] == "checkpoint"]
    env = cps[which]["details"]["checkpoint"]
    sig = bytearray(base64.b64decode(env["signatures"][0]["sig"]))
    sig[5] ^= 0x01
    env["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    prev = "sha256:" + "0" * 64
    for rec in recs:
        rec["prev"] = prev
        prev = "sha256:" + hashlib.sha256(canonical.dumps(rec)).hexdigest()
    _write(path, [canonical.dumps(r) for r in recs])


@pytest.mark.parametrize("every_signature", [True, False])
def test_quick_and_full_verification_agree_on_honest_and_forged_logs(honest: Path, every_signature: bool) -> None:
    assert verify_log(honest, owner=OWNER.card, entity=ENTITY.card, every_signature=every_signature).ok
    _corrupt_checkpoint_signature(honest, 0)
    verdict = verify_log(honest, owner=OWNER.card, entity=ENTITY.card, every_signature=every_signature)
    assert not verdict.ok
    # full mode names the forged checkpoint itself; quick mode catches it at the entity's
    # countersignature of that checkpoint or, without the entity's card, at the last signed root
    assert verdict.first_bad == (3 if every_signature else 4)
    if not every_signature:
        assert verify_log(honest, owner=OWNER.card, every_signature=False).first_bad == 7


def test_quick_verification_checks_the_last_checkpoint_signature(honest: Path) -> None:
    _corrupt_checkpoint_signature(honest, -1)
    verdict = verify_log(honest, owner=OWNER.card, every_signature=False)
    assert not verdict.ok and "does not verify" in verdict.error


def test_open_refusing_a_broken_log_leaves_it_untouched(honest: Path) -> None:
    lines = _lines(honest)
    lines[1], lines[2] = lines[2], lines[1]
    broken = b"".join(line + b"\n" for line in lines) + b'{"torn'
    honest.write_bytes(broken)
    with pytest.raises(AuditError):
        AuditLog.open(honest, OWNER)
    assert honest.read_bytes() == broken


def test_log_whose_only_line_is_torn_is_recreated_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b'{"details":{"log_id":"lo')
    with AuditLog.open(path, OWNER) as log:
        log.checkpoint()
    records = read_records(path)
    assert [r["event"] for r in records] == ["log.created", "log.recovered", "checkpoint"]
    assert verify_log(path, owner=OWNER.card).ok


@pytest.mark.parametrize(
    "edit",
    [
        lambda line: line.replace(b'"event"', b'"event":"x","event"', 1),  # duplicate key
        lambda line: line.replace(b'"seq":', b'"seq":1.0,"_":', 1),  # a float
        lambda line: line[:-1] + b',"seq":NaN}',  # NaN
        lambda line: line.replace(b"{", b"{ ", 1),  # white space
    ],
)
def test_non_canonical_lines_are_refused(honest: Path, edit) -> None:
    lines = _lines(honest)
    lines[2] = edit(lines[2])
    _write(honest, lines)
    verdict = verify_log(honest, owner=OWNER.card)
    assert not verdict.ok and verdict.first_bad == 2


def test_log_with_two_entities_verifies_with_a_mapping_of_their_cards(tmp_path: Path) -> None:
    other = Identity.generate("entity", "second-service")
    path = tmp_path / "audit.jsonl"
    with AuditLog.open(path, OWNER) as log:
        _job(log)
        files = {"a.bin": b"payload"}
        sealed = seal_bundle_detailed(files, kind="model", job_id="job-2", request_hash=digest(b"o2"), sender=OWNER, recipient=other.card)
        log.record_sent(sealed, recipient=other.card)
        cp = log.checkpoint()
        opened = open_bundle(
            sealed.blob, kind="model", job_id="job-2", request_hash=digest(b"o2"), recipient=other, senders={OWNER.fingerprint: OWNER.card}
        )
        log.record_countersignature(countersign_checkpoint(cp, owner=OWNER.card, entity=other), entity=other.card)
        log.record_receipt(make_receipt(opened, entity=other, job_id="job-2"), entity=other.card)
        log.checkpoint()
    both = verify_log(path, owner=OWNER.card, entity={ENTITY.fingerprint: ENTITY.card, other.fingerprint: other.card})
    assert both.ok and both.receipts == 2 and both.warnings == ()
    one = verify_log(path, owner=OWNER.card, entity={ENTITY.fingerprint: ENTITY.card})
    assert one.ok and one.receipts == 1 and any("not verified" in w for w in one.warnings)
    strict = verify_log(path, owner=OWNER.card, entity=ENTITY.card)
    assert not strict.ok and "wrong signer" in strict.error


def test_receipt_signed_by_an_entity_other_than_the_recipient_is_refused(tmp_path: Path) -> None:
    other = Identity.generate("entity", "second-service")
    path = tmp_path / "audit.jsonl"
    files = {"a.bin": b"payload"}
    sealed = seal_bundle_detailed(files, kind="model", job_id="job-3", request_hash=digest(b"o"), sender=OWNER, recipient=ENTITY.card)
    opened = open_bundle(
        sealed.blob, kind="model", job_id="job-3", request_hash=digest(b"o"), recipient=ENTITY, senders={OWNER.fingerprint: OWNER.card}
    )
    forged = make_receipt(opened, entity=other, job_id="job-3")  # the other entity signs for what ENTITY received
    with AuditLog.open(path, OWNER) as log:
        log.record_sent(sealed, recipient=ENTITY.card)
        with pytest.raises(AuditError, match="was sent to"):
            log.record_receipt(forged, entity=other.card)
    _append_unchecked(path, "receipt", {"entity": other.fingerprint, "receipt": canonical.loads(forged)})
    verdict = verify_log(path, owner=OWNER.card, entity={ENTITY.fingerprint: ENTITY.card, other.fingerprint: other.card})
    assert not verdict.ok and "receipt does not match" in verdict.error
