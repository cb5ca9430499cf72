"""``python -m owner.audit``: verify exit codes, report formats, Art. 30 fields, hostile content."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from owner._audit_report import RENDERERS, Format, build_report, render_html
from protocol.audit import AuditLog, countersign_checkpoint, make_receipt, verify_log
from protocol.keys import Identity
from protocol.sealing import open_bundle, seal_bundle_detailed
from protocol.signing import digest

ROOT = Path(__file__).resolve().parents[2]
OWNER = Identity.generate("owner", "clinic")
ENTITY = Identity.generate("entity", "service")
SPEC = {"shape": [1, 28, 28], "channel_order": "L", "pixel_range": [0, 255], "mean": ["0.286"], "std": ["0.353"]}


@pytest.fixture()
def trail(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    files = {"weights.safetensors": save({"w": torch.ones(3)}), "request.json": b"{}"}
    sealed = seal_bundle_detailed(files, kind="model", job_id="job-1", request_hash=digest(b"o"), sender=OWNER, recipient=ENTITY.card)
    with AuditLog.open(path, OWNER) as log:
        log.record_sent(sealed, recipient=ENTITY.card, request={"job_id": "job-1", "input_spec": SPEC})
        cp = log.checkpoint()
        opened = open_bundle(
            sealed.blob, kind="model", job_id="job-1", request_hash=digest(b"o"), recipient=ENTITY, senders={OWNER.fingerprint: OWNER.card}
        )
        log.record_countersignature(countersign_checkpoint(cp, owner=OWNER.card, entity=ENTITY), entity=ENTITY.card)
        log.record_receipt(make_receipt(opened, entity=ENTITY, job_id="job-1"), entity=ENTITY.card)
        log.append("egress.blocked", {"reason": "egress blocked: <script>alert(1)</script> tensor 'images'"})
        log.checkpoint()
    (tmp_path / "owner.json").write_bytes(OWNER.card.to_bytes())
    (tmp_path / "entity.json").write_bytes(ENTITY.card.to_bytes())
    return path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "owner.audit", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def _pins(trail: Path) -> list[str]:
    return ["--owner", str(trail.parent / "owner.json"), "--entity", str(trail.parent / "entity.json")]


def test_verify_exits_0_on_an_honest_trail(trail: Path) -> None:
    out = _run("verify", str(trail), *_pins(trail))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("OK:") and "1 receipts" in out.stdout and out.stderr == ""


def test_verify_without_pins_fails_unless_the_weaker_check_is_named(trail: Path) -> None:
    refused = _run("verify", str(trail))
    assert refused.returncode == 1 and refused.stdout.startswith("FAIL:") and "--owner" in refused.stdout
    assert refused.stdout.count("\n") == 1 and "Traceback" not in refused.stderr
    out = _run("verify", str(trail), "--trust-embedded-cards")
    assert out.returncode == 0 and "pin it with --owner" in out.stderr
    assert out.stdout.startswith("OK (WEAKER CHECK: owner key taken from the log itself")


def test_verify_exits_1_naming_the_first_broken_record(trail: Path) -> None:
    lines = trail.read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b"job-1", b"job-7")
    trail.write_bytes(b"\n".join(lines))
    out = _run("verify", str(trail), *_pins(trail))
    assert out.returncode == 1
    assert out.stdout.startswith("FAIL:") and "record 2 (line 3)" in out.stdout
    assert "Traceback" not in out.stderr


def test_verify_detects_truncation_with_an_external_checkpoint(trail: Path, tmp_path: Path) -> None:
    with AuditLog.open(trail, OWNER) as log:
        log.append("job.finished", {})
        kept = log.checkpoint()
    (tmp_path / "cp.json").write_bytes(kept)
    lines = trail.read_bytes().split(b"\n")
    trail.write_bytes(b"\n".join(lines[:7]) + b"\n")
    out = _run("verify", str(trail), *_pins(trail), "--checkpoint", str(tmp_path / "cp.json"))
    assert out.returncode == 1 and "truncated" in out.stdout


def test_missing_log_or_card_is_one_line_exit_1_and_bad_usage_exit_2(tmp_path: Path, trail: Path) -> None:
    out = _run("verify", str(tmp_path / "nope.jsonl"))
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "not found" in out.stderr
    out = _run("verify", str(trail), "--owner", str(tmp_path / "missing.json"))
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "missing.json" in out.stderr
    assert _run("report", str(trail), "--html", "--csv").returncode == 2
    assert _run("frobnicate").returncode == 2


def test_every_format_has_a_renderer_entry() -> None:
    assert set(RENDERERS) == set(Format)


def test_json_report_carries_art30_fields_and_limits(trail: Path) -> None:
    out = _run("report", str(trail), *_pins(trail), "--json", "--contact", "dpo@clinic.example", "--recipient-location", "EU (Germany)")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    art = data["gdpr_art30"]
    for key in ("controller", "purposes", "categories_of_data", "recipients", "transfers", "third_country_transfers", "security_measures"):
        assert art[key], key
    assert art["controller"]["contact"] == "dpo@clinic.example"
    assert art["recipients"] == [{"name": "service", "key_fingerprint": ENTITY.fingerprint}]
    assert art["third_country_transfers"] == "EU (Germany)"
    assert data["data_facts_transferred"][0]["input_spec"] == SPEC
    assert data["transfers"][0]["receipt"] and data["transfers"][0]["countersigned"]
    assert any("membership inference" in s for s in data["what_the_trail_cannot_prove"])
    assert any("memorise" in s for s in data["what_the_trail_cannot_prove"])
    assert data["egress_blocked"][0]["reason"].startswith("egress blocked")


def test_csv_report_has_one_row_per_record(trail: Path, tmp_path: Path) -> None:
    out = _run("report", str(trail), *_pins(trail), "--csv", "-o", str(tmp_path / "r.csv"))
    assert out.returncode == 0 and out.stderr.startswith("OK:")
    rows = list(csv.reader(io.StringIO((tmp_path / "r.csv").read_text())))
    assert rows[0][:3] == ["seq", "time", "event"]
    assert len(rows) - 1 == len(trail.read_bytes().splitlines())
    assert rows[1][2] == "log.created"


def test_html_report_escapes_log_content(trail: Path) -> None:
    out = _run("report", str(trail), *_pins(trail), "--html")
    assert out.returncode == 0
    assert "<script>alert(1)</script>" not in out.stdout and "&lt;script&gt;" in out.stdout
    assert "Art. 30" in out.stdout and "membership inference" in out.stdout


def test_terminal_report_renders_and_fails_on_a_broken_trail(trail: Path) -> None:
    ok = _run("report", str(trail), *_pins(trail))
    assert ok.returncode == 0 and "Record of processing" in ok.stdout and "cannot prove" in ok.stdout
    trail.write_bytes(trail.read_bytes() + b'{"torn')
    bad = _run("report", str(trail), *_pins(trail))
    assert bad.returncode == 1 and "FAIL" in bad.stdout


def test_report_of_a_broken_log_covers_only_the_verified_prefix(trail: Path) -> None:
    lines = trail.read_bytes().split(b"\n")
    lines[3] = lines[3].replace(b'"seq":3', b'"seq":4')
    trail.write_bytes(b"\n".join(lines))
    verdict = verify_log(trail, owner=OWNER.card, entity=ENTITY.card)
    report = build_report(trail, verdict, owner=OWNER.card, owner_pinned=True, entity_pinned=True)
    assert not verdict.ok and len(report.records) == verdict.first_bad == 3
    assert "FAIL" in render_html(report)


def test_verify_accepts_several_entity_cards(trail: Path, tmp_path: Path) -> None:
    (tmp_path / "other.json").write_bytes(Identity.generate("entity", "other").card.to_bytes())
    out = _run(
        "verify",
        str(trail),
        "--owner",
        str(trail.parent / "owner.json"),
        "--entity",
        str(trail.parent / "entity.json"),
        "--entity",
        str(tmp_path / "other.json"),
    )
    assert out.returncode == 0 and "1 receipts" in out.stdout and out.stderr == ""


def test_default_verify_and_every_signature_both_catch_a_forged_earlier_checkpoint(trail: Path) -> None:
    lines = trail.read_bytes().split(b"\n")
    first_checkpoint = next(i for i, ln in enumerate(lines) if b'"event":"checkpoint"' in ln)
    record = json.loads(lines[first_checkpoint])
    signature = record["details"]["checkpoint"]["signatures"][0]
    signature["sig"] = ("A" if signature["sig"][0] != "A" else "B") + signature["sig"][1:]
    lines[first_checkpoint] = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
    trail.write_bytes(b"\n".join(lines))
    default = _run("verify", str(trail), *_pins(trail))
    every = _run("verify", str(trail), *_pins(trail), "--every-signature")
    assert default.returncode == 1 and every.returncode == 1, default.stdout + every.stdout
    assert f"record {first_checkpoint} " in every.stdout
