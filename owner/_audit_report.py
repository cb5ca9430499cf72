"""The compliance report behind ``python -m owner.audit report``: data model and plain renderers.

``build_report`` turns a verified (or partly verified) log into one ``Report`` value; renderers
for HTML, CSV and JSON are pure functions of it (the terminal renderer lives in the CLI, the only
place that imports rich). ``RENDERERS`` maps every ``Format`` to its renderer; a test checks the
mapping is exhaustive. Log content is treated as untrusted text (job ids, reasons and error
text come from the other party): HTML output escapes everything, CSV cells that a spreadsheet
would run as a formula are neutralised (``csv_cell``), and terminal text goes through
``printable`` (control characters as visible escapes) and, in the CLI, into rich without markup.

A ``privacy.audit`` event (written by ``python -m owner.privacy audit``, local-only) becomes a
``PrivacyAudit`` shown in every format with its plain reading (``owner.privacy.reading``); its
ROC plot is embedded in the HTML only from the fixed path beside the log and only while its
SHA-256 is the one the event pins.
"""

from __future__ import annotations

import csv
import enum
import html
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from owner.privacy.reading import EVENT as EV_PRIVACY
from owner.privacy.reading import METRIC_COLUMNS, PLOT_PATH, WHAT_THE_NUMBERS_MEAN, WHAT_THEY_DO_NOT_PROVE, findings, plain_reading, summary_rows
from protocol import canonical
from protocol.audit import (
    EV_BLOCKED,
    EV_COUNTERSIGN,
    EV_RECEIPT,
    EV_RECEIVED,
    EV_REFUSED,
    EV_SENT,
    AuditVerdict,
    iter_lines,
)
from protocol.keys import IdentityCard


class Format(enum.Enum):
    TERMINAL = "terminal"
    HTML = "html"
    CSV = "csv"
    JSON = "json"


DEFAULT_PURPOSE = (
    "Compression (pattern pruning) of the controller's own neural network by an external service, "
    "so that it runs on mobile devices; the service never receives the training data."
)

FILE_CATEGORIES = {
    "program.json": "model computation graph (torch.export, ATen operators; no source code, no stack traces)",
    "weights.safetensors": "model parameters and buffers",
    "constants.safetensors": "model constants",
    "request.json": "pruning request and input specification (shape, channel order, pixel range, normalisation)",
    "masks.bin": "pruning masks (one bit per weight)",
    "report.json": "job report (achieved compression, per-layer error on synthetic inputs, time)",
    "recipe.json": "retraining recipe (optimiser configuration)",
}

SECURITY_MEASURES = (
    "Every transfer is signed (Ed25519, DSSE envelope over an in-toto Statement v1 listing the SHA-256 of "
    "every file and of every tensor with its dtype and shape); signatures and hashes are verified on the "
    "raw bytes before anything is parsed.",
    "Every transfer is encrypted to its single recipient with HPKE (RFC 9180: X25519, HKDF-SHA256, "
    "AES-256-GCM), bound to the job id and the hash of the request it answers; replayed or re-ordered "
    "messages are refused.",
    "The service admits only owners whose identity cards it has registered; the owner pins the "
    "service's card. Private keys are stored with mode 0600.",
    "An egress guard checks every outbound payload before it leaves: exactly the model's tensor names, "
    "dtypes and shapes, no metadata, bytes equal to a fresh serialisation, finite values, bounded size, "
    "no stack traces of the owner's code; a violation blocks the send and is logged.",
    "Received archives holding pickled entries are refused; nothing received is unpickled.",
    "This trail is append-only canonical JSON, hash-chained record to record, with the records as leaves "
    "of an RFC 9162 Merkle tree and a signed checkpoint after every transfer, countersigned by the "
    "service, which also returns a signed receipt of exactly what it received.",
)

PROVES = (
    "Which artifacts crossed (by SHA-256 of every file and tensor), in which direction, when, between which keys, and in which order.",
    "That the service acknowledged, under its own key, exactly the files it received (receipts) and the "
    "state of this trail at each transfer (countersigned checkpoints).",
    "That no record covered by a verified checkpoint was edited, removed, inserted or re-ordered "
    "afterwards; truncation below a checkpoint held elsewhere (e.g. by the service) is detected.",
    "Which data facts crossed: only the input specification listed in each request (shape, channel "
    "order, pixel range, normalisation), and which outbound payloads the egress guard blocked.",
)

CANNOT_PROVE = (
    "What the weights encode. A trained model can memorise parts of its training data; membership "
    "inference and model inversion attacks can recover some of that from the weights alone. Sending "
    "weights is a disclosure of a function of the personal data, which this trail records but cannot bound.",
    "Anything done outside this tool: copies made by other software, data sent by other channels, or "
    "what the service does with the weights after receipt.",
    "Events after the last signed checkpoint, until the next one (they are chained but not yet signed), "
    "and completeness against truncation if no checkpoint is held outside this log.",
    "That the clock times are correct: times are the owner machine's clock, not a trusted timestamp.",
)


@dataclass(frozen=True)
class Transfer:
    seq: int
    time: str
    direction: str  # "sent" | "received"
    job_id: str
    kind: str
    peer: str
    peer_name: str
    statement: str
    files: dict[str, str]
    bytes: int
    receipt: bool = False
    countersigned: bool = False


@dataclass(frozen=True)
class PrivacyAudit:
    """One ``privacy.audit`` event: a membership-inference audit run on the owner's machine.
    ``plot``: the ROC plot, when the file next to the log still has the hash the event pins."""

    seq: int
    time: str
    details: dict[str, Any]
    plot: bytes | None
    plot_note: str

    @property
    def rows(self) -> list[tuple[str, ...]]:
        return summary_rows(self.details)

    @property
    def reading(self) -> list[str]:
        return plain_reading(self.details)

    @property
    def local_only(self) -> bool:
        return self.details.get("local_only") is True and self.details.get("sent_anywhere") is False


@dataclass(frozen=True)
class Report:
    log_path: str
    verdict: AuditVerdict
    owner: IdentityCard | None
    owner_pinned: bool
    entity_pinned: bool
    records: list[dict[str, Any]]
    transfers: list[Transfer]
    blocked: list[dict[str, Any]]
    refused: list[dict[str, Any]]
    data_facts: list[dict[str, Any]]
    art30: dict[str, Any]
    privacy: list[PrivacyAudit] = field(default_factory=list)
    proves: tuple[str, ...] = PROVES
    cannot_prove: tuple[str, ...] = CANNOT_PROVE
    warnings: tuple[str, ...] = field(default_factory=tuple)


def _valid_records(path: Path, limit: int | None) -> list[dict[str, Any]]:
    out = []
    for index, line, complete in iter_lines(path):
        if (limit is not None and index >= limit) or not complete:
            break
        try:
            out.append(canonical.loads(line))
        except canonical.CanonicalJSONError:
            break
    return out


def build_report(
    path: Path,
    verdict: AuditVerdict,
    *,
    owner: IdentityCard | None,
    owner_pinned: bool,
    entity_pinned: bool,
    purpose: str = DEFAULT_PURPOSE,
    controller_contact: str | None = None,
    recipient_location: str | None = None,
) -> Report:
    """Collect everything a report shows; only the verified prefix of a broken log is used."""
    # A failed verdict that locates no broken record verified nothing: show no record then.
    records = _valid_records(Path(path), None if verdict.ok else (verdict.first_bad or 0))
    transfers: list[Transfer] = []
    receipts: set[tuple[str, str]] = set()
    countersigned_upto = 0
    blocked, refused, facts = [], [], []
    privacy: list[PrivacyAudit] = []
    for rec in records:
        d = rec.get("details", {})
        ev = rec.get("event")
        if ev in (EV_SENT, EV_RECEIVED):
            transfers.append(
                Transfer(
                    seq=rec["seq"],
                    time=rec["time"],
                    direction="sent" if ev == EV_SENT else "received",
                    job_id=str(d.get("job_id")),
                    kind=str(d.get("kind")),
                    peer=str(d.get("peer")),
                    peer_name=str(d.get("peer_name", "")),
                    statement=str(d.get("statement")),
                    files=_files_of(d),
                    bytes=d["bytes"] if type(d.get("bytes")) is int else 0,
                )
            )
            request = d.get("request")
            if ev == EV_SENT and isinstance(request, dict) and "input_spec" in request:
                facts.append({"seq": rec["seq"], "job_id": d.get("job_id"), "input_spec": request["input_spec"], "prune": request.get("prune")})
        elif ev == EV_RECEIPT:
            body = _message_body(d.get("receipt"))
            receipts.add((str(body.get("job_id")), str(body.get("statement"))))
        elif ev == EV_COUNTERSIGN:
            body = _message_body(d.get("countersignature"))
            if isinstance(body.get("tree_size"), int):
                countersigned_upto = max(countersigned_upto, body["tree_size"])
        elif ev == EV_BLOCKED:
            blocked.append({"seq": rec["seq"], "time": rec["time"], **d})
        elif ev == EV_REFUSED:
            refused.append({"seq": rec["seq"], "time": rec["time"], **d})
        elif ev == EV_PRIVACY and isinstance(d, dict):
            plot, note = _privacy_plot(Path(path), d)
            privacy.append(PrivacyAudit(rec["seq"], str(rec["time"]), d, plot, note))
    transfers = [
        Transfer(**{**t.__dict__, "receipt": (t.job_id, t.statement) in receipts, "countersigned": t.seq < countersigned_upto}) for t in transfers
    ]
    recipients: dict[str, str] = {}
    categories: set[str] = set()
    sent_tensors = {rec["seq"]: rec.get("details", {}).get("tensors") for rec in records if rec.get("event") == EV_SENT}
    for t in transfers:
        if t.direction == "sent":
            recipients[t.peer] = t.peer_name
            categories.update(_category(name, sent_tensors.get(t.seq)) for name in t.files)
    art30 = {
        "controller": {
            "name": owner.name if owner else None,
            "key_fingerprint": owner.fingerprint if owner else None,
            "contact": controller_contact or "not recorded by this tool",
        },
        "purposes": purpose,
        "categories_of_data_subjects": "none: no record about any data subject is transferred",
        "categories_of_data": sorted(categories) or ["nothing was transferred"],
        "data_not_transferred": "training images, labels, batches, gradients and data statistics never leave "
        "the controller; the only facts about the data that cross are the input specifications listed below",
        "recipients": [{"name": name, "key_fingerprint": fp} for fp, name in sorted(recipients.items())],
        "transfers": len([t for t in transfers if t.direction == "sent"]),
        "third_country_transfers": recipient_location or "not recorded by this tool (state the recipient's location)",
        "security_measures": list(SECURITY_MEASURES),
    }
    warnings = list(verdict.warnings)
    if owner is not None and not owner_pinned:
        warnings.append("owner key taken from the log itself (pin it with --owner CARD to rule out a rewritten log)")
    if owner is not None and not entity_pinned:
        warnings.append("service key taken from the log itself (pin it with --entity CARD)")
    return Report(
        log_path=str(path),
        verdict=verdict,
        owner=owner,
        owner_pinned=owner_pinned,
        entity_pinned=entity_pinned,
        records=records,
        transfers=transfers,
        blocked=blocked,
        refused=refused,
        data_facts=facts,
        art30=art30,
        privacy=privacy,
        warnings=tuple(warnings),
    )


_BN_SUFFIXES = (".running_mean", ".running_var")


def _tensor_names(listing: Any, file: str) -> list[str] | None:
    """The tensor names a transfer record lists for ``file`` (``{"file": ["name", ...]}`` or the
    statement's ``{"file": [{"name": ...}, ...]}``), or None when the record lists none."""
    if not isinstance(listing, dict) or not isinstance(listing.get(file), list):
        return None
    return [str(t.get("name")) if isinstance(t, dict) else str(t) for t in listing[file]]


def _category(file: str, listing: Any) -> str:
    """What a sent file is, saying BatchNorm statistics crossed only when the record shows that
    they did (a BN-free model carries none)."""
    base = FILE_CATEGORIES.get(file, f"file {file}")
    if not file.endswith(".safetensors"):
        return base
    names = _tensor_names(listing, file)
    if names is None:
        return f"{base} (this record does not list the tensors by name)"
    stats = [n for n in names if n.endswith(_BN_SUFFIXES)]
    if not stats:
        return f"{base} ({len(names)} tensors; no BatchNorm statistics)"
    return (
        f"{base} ({len(names)} tensors), including {len(stats)} BatchNorm running means and variances "
        "(per-channel aggregate statistics of the training data's activations)"
    )


def _privacy_plot(log: Path, details: dict[str, Any]) -> tuple[bytes | None, str]:
    """The audit's ROC plot from the log's folder, only at the fixed path the audit writes (a
    path named in the log is never followed) and only if its SHA-256 is the one the event pins."""
    import hashlib

    files = details.get("files")
    pinned = files.get(PLOT_PATH) if isinstance(files, dict) else None
    if not isinstance(pinned, str):
        return None, "the event names no ROC plot"
    path = log.parent / PLOT_PATH
    try:
        data = path.read_bytes() if path.is_file() and not path.is_symlink() else None
    except OSError:
        data = None
    if data is None:
        return None, f"ROC plot {PLOT_PATH} not found next to the log"
    if "sha256:" + hashlib.sha256(data).hexdigest() != pinned:
        return None, f"ROC plot {PLOT_PATH} differs from the one the audit recorded (its SHA-256 changed): not shown"
    return data, f"ROC plot {PLOT_PATH} (SHA-256 matches the audit event)"


def _files_of(details: dict[str, Any]) -> dict[str, str]:
    """A record's ``files`` as name -> hash strings (anything else, in a hostile log, as none)."""
    files = details.get("files")
    return {str(k): str(v) for k, v in files.items()} if isinstance(files, dict) else {}


def _message_body(envelope: Any) -> dict[str, Any]:
    """The (already verified by verify_log) payload body of an embedded envelope, for display."""
    import base64

    try:
        payload = canonical.loads(base64.b64decode(envelope["payload"]))
        return payload["body"] if isinstance(payload.get("body"), dict) else {}
    except (KeyError, TypeError, ValueError, canonical.CanonicalJSONError):
        return {}


def weaker_checks(verdict: AuditVerdict, *, owner_pinned: bool) -> list[str]:
    """What an OK verdict did not check, so that a weaker check is never read as the full one."""
    if not verdict.ok:
        return []
    weaker = []
    if not owner_pinned:
        weaker.append("owner key taken from the log itself (--trust-embedded-cards), a log forged under another key passes")
    if verdict.checkpoints == 0:
        weaker.append("no signed checkpoint (--allow-unanchored), only the hash chain was checked")
    return weaker


def verdict_text(verdict: AuditVerdict, *, owner_pinned: bool, where: str | None = None) -> str:
    """The one OK/FAIL line of ``verify`` and of every report; ``where``: the log path to name."""
    at = f" {where}:" if where else ""
    if not verdict.ok:
        return f"FAIL:{at} {printable(str(verdict.error))}"
    weaker = weaker_checks(verdict, owner_pinned=owner_pinned)
    head = f"OK (WEAKER CHECK: {'; '.join(weaker)}):" if weaker else "OK:"
    return (
        f"{head}{at} {verdict.records} records, {verdict.checkpoints} signed checkpoints, {verdict.receipts} receipts; "
        f"first {verdict.anchored} records signed, first {verdict.countersigned} countersigned by the entity"
    )


def verdict_line(report: Report) -> str:
    return verdict_text(report.verdict, owner_pinned=report.owner_pinned)


# C0 and C1 controls, DEL, and the invisible or bidirectional format characters that can make a
# terminal line read differently from its bytes (U+200B..U+200F, U+202A..U+202E, U+2066..U+2069, BOM).
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")


def printable(text: str) -> str:
    """``text`` with every control or invisible format character as a visible escape (``\\x1b``),
    so that log text from the other party cannot drive the reader's terminal."""
    return _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}", text)


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> str:
    """One CSV cell, neutralised against formula injection (OWASP): a cell that starts with
    ``= + - @``, tab or CR would be run by a spreadsheet (``=HYPERLINK(...)`` in a job id the
    entity chose), so it gets a leading single quote and is shown as text."""
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def report_json(report: Report) -> dict[str, Any]:
    return {
        "log": report.log_path,
        "verdict": report.verdict.to_json(),
        "warnings": list(report.warnings),
        "gdpr_art30": report.art30,
        "data_facts_transferred": report.data_facts,
        "transfers": [t.__dict__ for t in report.transfers],
        "egress_blocked": report.blocked,
        "admissions_refused": report.refused,
        "privacy_audits": [
            {
                "seq": a.seq,
                "time": a.time,
                "local_only": a.local_only,
                "event": a.details,
                "plain_reading": a.reading,
                "roc_plot": a.plot_note,
            }
            for a in report.privacy
        ],
        "privacy_audit_what_the_numbers_mean": list(WHAT_THE_NUMBERS_MEAN) if report.privacy else [],
        "privacy_audit_what_they_do_not_prove": list(WHAT_THEY_DO_NOT_PROVE) if report.privacy else [],
        "what_the_trail_proves": list(report.proves),
        "what_the_trail_cannot_prove": list(report.cannot_prove),
        "records": len(report.records),
    }


def render_json(report: Report) -> str:
    return json.dumps(report_json(report), indent=2, sort_keys=True) + "\n"


PRIVACY_CSV_HEADER = ("seq", "time", "model", "held_out_accuracy", "attack", *(f"{m}{end}" for m in METRIC_COLUMNS for end in ("", "_low", "_high")))


def _privacy_csv_rows(audit: PrivacyAudit) -> list[list[Any]]:
    def num(value: float | None) -> str:
        return "" if value is None else f"{value:.4f}"

    return [
        [audit.seq, audit.time, f.model, num(f.accuracy), attack, *(num(x) for m in METRIC_COLUMNS for x in (r[m].value, r[m].low, r[m].high))]
        for f in findings(audit.details)
        for attack, r in f.results.items()
    ]


def render_csv(report: Report) -> str:
    """One row per record: seq, time, event, job, peer, statement hash, files, details (JSON).
    When the trail holds membership-inference audits, a second table follows after one empty
    line: one row per audit, model and attack, each metric with its 95% interval (``_low``, ``_high``).
    Every cell goes through ``csv_cell``."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["seq", "time", "event", "job_id", "peer", "statement", "files", "details"])
    for rec in report.records:
        d = rec.get("details", {})
        writer.writerow(
            [
                csv_cell(cell)
                for cell in (
                    rec.get("seq"),
                    rec.get("time"),
                    rec.get("event"),
                    d.get("job_id", ""),
                    d.get("peer", ""),
                    d.get("statement", ""),
                    ";".join(f"{k}={v}" for k, v in sorted(_files_of(d).items())),
                    json.dumps(d, sort_keys=True),
                )
            ]
        )
    if report.privacy:
        writer.writerow([])
        writer.writerow(PRIVACY_CSV_HEADER)
        for audit in report.privacy:
            for row in _privacy_csv_rows(audit):
                writer.writerow([csv_cell(cell) for cell in row])
    return buf.getvalue()


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def render_html(report: Report) -> str:
    v = report.verdict
    a = report.art30
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>blindprune audit report</title>",
        "<meta name=viewport content='width=device-width, initial-scale=1'>",
        "<style>body{font-family:system-ui,sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem}"
        "table{border-collapse:collapse;width:100%}td,th{border:1px solid #ccc;padding:.3rem;text-align:left;"
        "vertical-align:top;font-size:.9rem}td{overflow-wrap:anywhere}.ok{color:#060}.fail{color:#a00}code{word-break:break-all}"
        ".scroll{overflow-x:auto}.scroll table{min-width:40rem}img{max-width:100%;height:auto}"
        "@media (max-width:40rem){body{margin:1rem auto;padding:0 .5rem}td,th{font-size:.8rem;padding:.2rem}}</style>",
        "</head><body>",
        "<h1>Audit report</h1>",
        f"<p>Log: <code>{_e(report.log_path)}</code></p>",
        f"<p class={'ok' if v.ok else 'fail'}><strong>{_e(verdict_line(report))}</strong></p>",
    ]
    if report.warnings:
        parts.append("<ul>" + "".join(f"<li>{_e(w)}</li>" for w in report.warnings) + "</ul>")
    parts.append("<h2>Record of processing (GDPR Art. 30)</h2><table>")
    rows = [
        ("Controller", f"{a['controller']['name']} (key {a['controller']['key_fingerprint']}); contact: {a['controller']['contact']}"),
        ("Purposes of the processing", a["purposes"]),
        ("Categories of data subjects", a["categories_of_data_subjects"]),
        ("Categories of data transferred", "; ".join(a["categories_of_data"])),
        ("Not transferred", a["data_not_transferred"]),
        ("Recipients", "; ".join(f"{r['name']} (key {r['key_fingerprint']})" for r in a["recipients"]) or "none"),
        ("Transfers", a["transfers"]),
        ("Transfers to third countries", a["third_country_transfers"]),
    ]
    parts += [f"<tr><th>{_e(k)}</th><td>{_e(val)}</td></tr>" for k, val in rows]
    parts.append("<tr><th>Security measures</th><td><ul>" + "".join(f"<li>{_e(m)}</li>" for m in a["security_measures"]) + "</ul></td></tr></table>")
    parts.append(
        "<h2>Transfers</h2><div class=scroll><table><tr><th>#</th><th>time</th><th>direction</th><th>job</th><th>peer</th>"
        "<th>files (SHA-256)</th><th>bytes</th><th>receipt</th><th>countersigned</th></tr>"
    )
    for t in report.transfers:
        files = "<br>".join(f"{_e(n)}: <code>{_e(h)}</code>" for n, h in sorted(t.files.items()))
        parts.append(
            f"<tr><td>{t.seq}</td><td>{_e(t.time)}</td><td>{_e(t.direction)}</td><td>{_e(t.job_id)}</td>"
            f"<td>{_e(t.peer_name)}<br><code>{_e(t.peer[:16])}</code></td><td>{files}</td><td>{t.bytes}</td>"
            f"<td>{'yes' if t.receipt else 'no'}</td><td>{'yes' if t.countersigned else 'no'}</td></tr>"
        )
    parts.append("</table></div><h2>Data facts that crossed</h2><table><tr><th>#</th><th>job</th><th>input specification</th></tr>")
    for f in report.data_facts:
        parts.append(f"<tr><td>{f['seq']}</td><td>{_e(f['job_id'])}</td><td><code>{_e(json.dumps(f['input_spec'], sort_keys=True))}</code></td></tr>")
    parts.append("</table>")
    if report.blocked:
        parts.append(
            "<h2>Blocked by the egress guard</h2><ul>"
            + "".join(f"<li>{_e(b.get('time'))}: {_e(b.get('reason'))}</li>" for b in report.blocked)
            + "</ul>"
        )
    if report.refused:
        parts.append(
            "<h2>Refusals (an admission, a job or a result refused by either party)</h2><ul>"
            + "".join(f"<li>{_e(r.get('time'))}: {_e(r.get('reason'))}</li>" for r in report.refused)
            + "</ul>"
        )
    parts += _privacy_html(report)
    parts.append("<h2>What this trail proves</h2><ul>" + "".join(f"<li>{_e(p)}</li>" for p in report.proves) + "</ul>")
    parts.append("<h2>What it cannot prove</h2><ul>" + "".join(f"<li>{_e(p)}</li>" for p in report.cannot_prove) + "</ul>")
    parts.append("<h2>Every record</h2><div class=scroll><table><tr><th>#</th><th>time</th><th>event</th><th>job</th></tr>")
    for rec in report.records:
        d = rec.get("details")
        job = d.get("job_id", "") if isinstance(d, dict) else ""
        parts.append(f"<tr><td>{_e(rec.get('seq'))}</td><td>{_e(rec.get('time'))}</td><td>{_e(rec.get('event'))}</td><td>{_e(job)}</td></tr>")
    parts.append(
        f"</table></div><p>{len(report.records)} records shown (every record above; {len(report.transfers)} of them transfers). "
        "The CSV and JSON formats carry each record's full details.</p></body></html>\n"
    )
    return "".join(parts)


def _privacy_html(report: Report) -> list[str]:
    """The membership-inference audits: results table, ROC plot (embedded), plain reading."""
    import base64

    if not report.privacy:
        return []
    parts = ["<h2>Membership-inference audits (run on the owner's machine; nothing sent)</h2>"]
    for audit in report.privacy:
        where = "local only, nothing sent" if audit.local_only else "NOT marked local-only"
        parts.append(f"<h3>Audit of record {audit.seq}, {_e(audit.time)} ({where})</h3>")
        parts.append("<ul>" + "".join(f"<li>{_e(line)}</li>" for line in audit.reading) + "</ul>")
        parts.append(
            "<div class=scroll><table><tr><th>model</th><th>held-out accuracy</th><th>attack</th><th>AUC [95%]</th>"
            "<th>balanced accuracy</th><th>TPR at 1% FPR</th><th>TPR at 0.1% FPR</th></tr>"
        )
        parts += ["<tr>" + "".join(f"<td>{_e(cell)}</td>" for cell in row) + "</tr>" for row in audit.rows]
        parts.append("</table></div>")
        if audit.plot is not None:
            data = base64.b64encode(audit.plot).decode("ascii")
            parts.append(f"<p><img alt='ROC curves of every attack on log-log axes' src='data:image/png;base64,{data}'></p>")
        parts.append(f"<p><small>{_e(audit.plot_note)}</small></p>")
    parts.append("<h3>What the numbers mean</h3><ul>" + "".join(f"<li>{_e(line)}</li>" for line in WHAT_THE_NUMBERS_MEAN) + "</ul>")
    parts.append("<h3>What they do not prove</h3><ul>" + "".join(f"<li>{_e(line)}</li>" for line in WHAT_THEY_DO_NOT_PROVE) + "</ul>")
    return parts


RENDERERS: dict[Format, Callable[[Report], str] | None] = {
    Format.TERMINAL: None,  # rendered with rich by the CLI (library code never imports rich)
    Format.HTML: render_html,
    Format.CSV: render_csv,
    Format.JSON: render_json,
}
