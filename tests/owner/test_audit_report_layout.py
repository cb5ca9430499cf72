"""The officer's report: narrow terminals, what the HTML footer counts, BatchNorm statistics only
when they crossed, and the membership-inference audit in every format."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from owner._audit_report import build_report, render_csv, render_html, render_json
from owner.audit import _render_terminal
from protocol.audit import AuditLog, verify_log
from protocol.keys import Identity
from tests.owner.privacy_helpers import trail_with_audit

OWNER = Identity.generate("owner", "clinic")
ENTITY = Identity.generate("entity", "service")


def _report(path: Path):
    verdict = verify_log(path, owner=OWNER.card, entity=ENTITY.card)
    assert verdict.ok, verdict.error
    return build_report(path, verdict, owner=OWNER.card, owner_pinned=True, entity_pinned=True)


@pytest.fixture()
def trail(tmp_path: Path) -> Path:
    return trail_with_audit(tmp_path, OWNER, ENTITY)


def _terminal(path: Path, width: int) -> str:
    buf = io.StringIO()
    _render_terminal(_report(path), Console(file=buf, width=width, color_system=None))
    return buf.getvalue()


@pytest.mark.parametrize("width", [80, 64])
def test_terminal_report_at_narrow_widths_keeps_every_transfer_column(trail: Path, width: int) -> None:
    text = _terminal(trail, width)
    sent = next(json.loads(line) for line in trail.read_text().splitlines() if '"transfer.sent"' in line)
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if sent["time"] in line)
    cells, below = lines[at].split("│"), lines[at + 1].split("│")
    assert cells[1].strip() == str(sent["seq"]) and cells[2].strip() == sent["time"] and below[2].strip() == "sent"
    assert "receipt no" in cells[-2]
    assert max(len(line) for line in text.splitlines()) <= width


def test_html_footer_counts_the_records_the_page_lists(trail: Path) -> None:
    report = _report(trail)
    html = render_html(report)
    listed = html.split("<h2>Every record</h2>")[1].count("<tr><td>")
    assert listed == len(report.records) and f"{len(report.records)} records shown" in html
    assert f"{len(report.transfers)} of them transfers" in html


def _sent_with(tmp_path: Path, tensors: object) -> Path:
    path = tmp_path / "audit.jsonl"
    details = {"job_id": "job-1", "kind": "model", "peer": ENTITY.fingerprint, "peer_name": "service", "statement": "sha256:" + "1" * 64}
    details["files"] = {"weights.safetensors": "sha256:" + "2" * 64}
    if tensors is not None:
        details["tensors"] = tensors
    with AuditLog.open(path, OWNER) as log:
        log.append("transfer.sent", details)
        log.checkpoint()
    return path


def test_batchnorm_statistics_are_listed_only_when_the_request_carried_them(tmp_path: Path) -> None:
    def categories(tensors: object, folder: str) -> str:
        (tmp_path / folder).mkdir()
        return " ".join(_report(_sent_with(tmp_path / folder, tensors)).art30["categories_of_data"])

    bn_free = categories({"weights.safetensors": ["conv1.weight", "fc.weight", "fc.bias"]}, "a")
    assert "no BatchNorm statistics" in bn_free and "running means" not in bn_free
    with_bn = categories({"weights.safetensors": [{"name": "bn1.running_mean"}, {"name": "bn1.running_var"}, {"name": "conv1.weight"}]}, "b")
    assert "including 2 BatchNorm running means and variances" in with_bn
    unlisted = categories(None, "c")
    assert "does not list the tensors" in unlisted and "running means" not in unlisted


def test_privacy_audit_shows_in_every_format_with_its_plain_reading(trail: Path) -> None:
    report = _report(trail)
    (audit,) = report.privacy
    assert audit.local_only and audit.plot is not None
    html = render_html(report)
    assert "Membership-inference audits" in html and "data:image/png;base64," in html and "What they do not prove" in html
    assert "final model: strongest attack" in html
    body = json.loads(render_json(report))
    assert body["privacy_audits"][0]["event"]["models"][2]["model"] == "final" and body["privacy_audit_what_they_do_not_prove"]
    csv_text = render_csv(report)
    assert csv_text.count("\n,") == 0 and len([row for row in csv_text.split("\n\n")[1].splitlines()]) == 1 + 3 * 5
    text = _terminal(trail, 80)
    assert "Membership-inference audit" in text and "final model: strongest attack" in text.replace("\n", " ")


def test_a_changed_roc_plot_is_not_embedded(trail: Path) -> None:
    plot = trail.parent / "privacy" / "roc.png"
    plot.write_bytes(plot.read_bytes() + b"x")
    (audit,) = _report(trail).privacy
    assert audit.plot is None and "differs" in audit.plot_note
    assert "data:image/png" not in render_html(_report(trail))


def test_hostile_privacy_event_content_is_escaped_and_unreadable_values_show_as_unknown(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    hostile = {"model": "<script>x</script>", "held_out_accuracy": "NaN", "results": {"rmia": {"auc": ["2.5", "0", "1"]}}}
    with AuditLog.open(path, OWNER) as log:
        log.append("privacy.audit", {"local_only": True, "sent_anywhere": False, "models": [hostile, "junk"], "files": {"../../etc/passwd": "x"}})
        log.checkpoint()
    report = _report(path)
    html = render_html(report)
    assert "<script>x" not in html and "&lt;script&gt;x" in html
    (audit,) = report.privacy
    assert audit.rows[0][1] == "?" and audit.rows[0][3] == "?" and audit.plot is None
