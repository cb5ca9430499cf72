"""``python -m owner.audit``: verify the owner's audit trail and report it to a compliance officer.

    python -m owner.audit verify LOG --owner CARD [--entity CARD]... [--checkpoint FILE] [--every-signature]
    python -m owner.audit report LOG --owner CARD [--html | --csv | --json] [-o FILE] [--purpose TEXT] ...

``verify`` exits 0 when the chain, every checkpoint, countersignature and receipt hold, else 1
with one line naming the first broken record. ``report`` renders the verified trail (terminal via
rich, or HTML / CSV / JSON) with the GDPR Art. 30 fields and what the trail proves and cannot;
it exits 1 when verification failed (the report then covers the verified prefix only). A
membership-inference audit recorded by ``python -m owner.privacy audit`` shows in every format.

No default trust: without ``--owner`` verification fails, because the owner card recorded in the
log is whatever its writer put there (a log forged wholesale under the forger's key verifies
against its own card). ``--trust-embedded-cards`` runs that weaker check anyway, and a log with no
signed checkpoint (nothing signed by the owner, only a hash chain anyone can compute) fails
unless ``--allow-unanchored``; either way the OK line then says it was a weaker check. Without
``--entity`` the entity cards the log records are used, with a warning.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from owner._audit_report import RENDERERS, Format, Report, build_report, printable, verdict_line, verdict_text
from protocol._files import read_regular
from protocol.audit import MAX_RECORD_BYTES, AuditVerdict, embedded_cards, verify_log
from protocol.cli import fatal, run_cli
from protocol.errors import AuditError
from protocol.keys import IdentityCard, load_card

if TYPE_CHECKING:
    from collections.abc import Callable

    from rich.console import Console
    from rich.text import Text

PROG = "owner.audit"
NO_OWNER = (
    "no owner card pinned: pass --owner CARD (the card recorded in the log is whatever its writer put there; "
    "--trust-embedded-cards checks against it anyway, a weaker check)"
)


def _fatal(message: str) -> NoReturn:
    fatal(PROG, message)


def _cards(args: argparse.Namespace) -> tuple[IdentityCard | None, IdentityCard | dict[str, IdentityCard], bool, bool]:
    """(owner, entity cards, owner pinned, entity pinned); owner is None when it is neither
    pinned nor explicitly trusted from the log (``--trust-embedded-cards``)."""
    log = Path(args.log)
    if not log.exists():
        _fatal(f"audit log {log} not found")
    if not log.is_file():
        _fatal(f"audit log {log} is not a regular file; give the path of the log file")
    owner = load_card(args.owner) if args.owner else None
    pinned = [load_card(path) for path in args.entity or []]
    entity: IdentityCard | dict[str, IdentityCard] | None = None
    if len(pinned) == 1:
        entity = pinned[0]
    elif pinned:
        entity = {card.fingerprint: card for card in pinned}
    if owner is not None and entity is not None:
        return owner, entity, True, True
    if owner is None and not args.trust_embedded_cards:
        return None, entity or {}, False, bool(pinned)
    embedded_owner, peers = embedded_cards(log)
    if owner is None:
        if embedded_owner is None:
            _fatal(f"{log} names no owner card; pass --owner CARD")
        owner = embedded_owner
    if entity is None:
        entity = peers
    return owner, entity, args.owner is not None, bool(pinned)


def _verify(args: argparse.Namespace) -> tuple[AuditVerdict, IdentityCard | None, bool, bool]:
    owner, entity, owner_pinned, entity_pinned = _cards(args)
    if owner is None:
        return AuditVerdict(False, 0, 0, 0, 0, 0, error=NO_OWNER, first_bad=0), None, False, entity_pinned
    checkpoint = None
    if args.checkpoint:
        checkpoint = read_regular(Path(args.checkpoint), limit=MAX_RECORD_BYTES, error=AuditError, what="checkpoint")
    verdict = verify_log(
        Path(args.log),
        owner=owner,
        entity=entity,
        checkpoint=checkpoint,
        every_signature=args.every_signature,
        allow_unanchored=args.allow_unanchored,
    )
    return verdict, owner, owner_pinned, entity_pinned


def _cmd_verify(args: argparse.Namespace) -> int:
    verdict, owner, owner_pinned, entity_pinned = _verify(args)
    print(verdict_text(verdict, owner_pinned=owner_pinned, where=printable(str(args.log))))
    warnings = list(verdict.warnings)
    if owner is not None and not owner_pinned:
        warnings.append("owner key taken from the log itself; pin it with --owner CARD")
    if owner is not None and not entity_pinned:
        warnings.append("entity key taken from the log itself; pin it with --entity CARD")
    for warning in warnings:
        print(f"warning: {printable(warning)}", file=sys.stderr)
    return 0 if verdict.ok else 1


def _render_terminal(report: Report, console: Console | None = None) -> None:
    """Render with rich. Every string from the log goes in as a ``Text`` built by ``_t``, never as
    a str (rich would read ``[...]`` in a str as markup, in table cells and titles too), with
    control characters shown as visible escapes (rich passes ESC through to the terminal)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    def _t(value: object, style: str = "") -> Text:
        return Text(printable(str(value)), style=style)

    def _lines(values: list[str]) -> Text:  # one cell, one escaped value per line
        return Text("\n".join(printable(str(value)) for value in values))

    console = console or Console()
    v = report.verdict
    console.print(Text.assemble(("Audit report", "bold"), " ", _t(report.log_path)), highlight=False)
    console.print(_t(verdict_line(report), "bold green" if v.ok else "bold red"))
    for warning in report.warnings:
        console.print(_t(f"warning: {warning}", "yellow"))
    a = report.art30
    art = Table(title="Record of processing (GDPR Art. 30)", show_header=False, expand=True)
    art.add_column("field", style="bold", no_wrap=True)
    art.add_column("value")
    art.add_row("Controller", _t(f"{a['controller']['name']} (key {a['controller']['key_fingerprint']}); contact: {a['controller']['contact']}"))
    art.add_row("Purposes", _t(a["purposes"]))
    art.add_row("Data subjects", _t(a["categories_of_data_subjects"]))
    art.add_row("Categories of data", _lines(a["categories_of_data"]))
    art.add_row("Not transferred", _t(a["data_not_transferred"]))
    recipients = [f"{r['name']} ({str(r['key_fingerprint'])[:16]})" for r in a["recipients"]]
    art.add_row("Recipients", _lines(recipients or ["none"]))
    art.add_row("Transfers", _t(a["transfers"]))
    art.add_row("Third countries", _t(a["third_country_transfers"]))
    art.add_row("Security measures", _lines([f"- {m}" for m in a["security_measures"]]))
    console.print(art)
    jobs: dict[str, list] = {}
    for t in report.transfers:
        jobs.setdefault(t.job_id, []).append(t)
    for job_id, items in jobs.items():
        # Five columns that fit 80 characters: rich shrinks the widest columns first and would
        # squeeze "#" and "direction" to nothing, so those carry minimum widths and the files wrap.
        table = Table(title=_t(f"Job {job_id} with {items[0].peer_name} ({items[0].peer[:16]})"), expand=True)
        table.add_column("#", justify="right", no_wrap=True, min_width=max(len(str(t.seq)) for t in items))
        table.add_column("time / direction", no_wrap=True, min_width=20)
        table.add_column("files (SHA-256 prefix)", ratio=1, overflow="fold")
        table.add_column("bytes", justify="right", no_wrap=True, min_width=7)
        table.add_column("receipt / countersigned", min_width=12)
        for t in items:
            receipt = ("yes" if t.receipt else "no") if t.direction == "sent" else "-"
            table.add_row(
                _t(t.seq),
                _lines([t.time, t.direction]),
                _lines([f"{n} {h.split(':', 1)[-1][:12]}" for n, h in sorted(t.files.items())]),
                _t(f"{t.bytes:,}"),
                _lines([f"receipt {receipt}", f"countersigned {'yes' if t.countersigned else 'not yet'}"]),
            )
        console.print(table)
    console.print(
        "receipt: the entity signed for exactly these files; countersigned: a checkpoint covering the record was countersigned by the entity",
        style="dim",
        markup=False,
        highlight=False,
    )
    for fact in report.data_facts:
        console.print(_t(f"data facts sent (job {fact['job_id']}): {fact['input_spec']}"), highlight=False)
    for blocked in report.blocked:
        console.print(_t(f"egress blocked {blocked.get('time')}: {blocked.get('reason')}", "red"), highlight=False)
    for refused in report.refused:
        console.print(_t(f"refused {refused.get('time')}: {refused.get('reason')}", "red"), highlight=False)
    _render_privacy_terminal(report, console, _t, _lines)
    console.print("[bold]What this trail proves[/bold]")
    for line in report.proves:
        console.print(f"- {line}", markup=False, highlight=False)
    console.print("[bold]What it cannot prove[/bold]")
    for line in report.cannot_prove:
        console.print(f"- {line}", markup=False, highlight=False)


def _render_privacy_terminal(report: Report, console: Console, _t: Callable[..., Text], _lines: Callable[[list[str]], Text]) -> None:
    """The membership-inference audits: one table per audit (intervals on a second line, so it
    fits 80 columns), the plain reading, and what the numbers do and do not mean."""
    from rich.table import Table

    from owner.privacy.reading import WHAT_THE_NUMBERS_MEAN, WHAT_THEY_DO_NOT_PROVE

    for audit in report.privacy:
        where = "local only, nothing sent" if audit.local_only else "NOT marked local-only"
        table = Table(title=_t(f"Membership-inference audit, record {audit.seq}, {audit.time} ({where})"), expand=True)
        for name in ("model", "attack", "AUC", "bal. acc.", "TPR@1%FPR", "TPR@0.1%FPR"):
            table.add_column(name, no_wrap=name in ("model", "attack"), min_width=len(name) if name in ("model", "attack") else 6)
        for model, accuracy, attack, *values in audit.rows:
            table.add_row(_lines([model, accuracy]), _t(attack), *(_lines(v.split(" ", 1)) for v in values))
        console.print(table)
        for line in audit.reading:
            console.print(_t(f"- {line}"), highlight=False)
        console.print(_t(audit.plot_note), style="dim", highlight=False)
    if report.privacy:
        console.print("[bold]What the membership-inference numbers mean[/bold]")
        for line in WHAT_THE_NUMBERS_MEAN:
            console.print(f"- {line}", markup=False, highlight=False)
        console.print("[bold]What they do not prove[/bold]")
        for line in WHAT_THEY_DO_NOT_PROVE:
            console.print(f"- {line}", markup=False, highlight=False)


def _cmd_report(args: argparse.Namespace) -> int:
    verdict, owner, owner_pinned, entity_pinned = _verify(args)
    report = build_report(
        Path(args.log),
        verdict,
        owner=owner,
        owner_pinned=owner_pinned,
        entity_pinned=entity_pinned,
        purpose=args.purpose,
        controller_contact=args.contact,
        recipient_location=args.recipient_location,
    )
    fmt = Format(args.format)
    renderer = RENDERERS[fmt]
    if renderer is None:
        _render_terminal(report)
    else:
        text = renderer(report)
        if args.output and args.output != "-":
            from protocol._files import atomic_write

            try:
                atomic_write(Path(args.output), text.encode("utf-8"))
            except OSError as exc:
                _fatal(f"cannot write {args.output}: {exc.strerror}")
            print(verdict_line(report), file=sys.stderr)
        else:
            sys.stdout.write(text)
    return 0 if verdict.ok else 1


def main(argv: list[str] | None = None) -> int:
    from owner._audit_report import DEFAULT_PURPOSE

    parser = argparse.ArgumentParser(prog="python -m owner.audit", description="Verify and report the owner's audit trail.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("verify", "check the trail; exit 1 naming the first broken record"),
        ("report", "render the trail for a compliance officer"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("log", help="the audit log (JSONL)")
        p.add_argument("--owner", type=Path, help="the owner's pinned identity card (card.json)")
        p.add_argument(
            "--entity", type=Path, action="append", help="an entity's pinned identity card (repeat for an owner that used several entities)"
        )
        p.add_argument("--checkpoint", type=Path, help="a signed checkpoint held outside the log (detects truncation)")
        p.add_argument(
            "--every-signature",
            action="store_true",
            help="verify the owner's signature on every checkpoint, to name the first bad one (by default only "
            "the last is verified: it signs a Merkle root over every earlier record, checkpoints included, "
            "so this is as strong and about twice as fast); entity signatures are always all verified",
        )
        p.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)  # the default since it became as strong
        p.add_argument(
            "--trust-embedded-cards",
            action="store_true",
            help="WEAKER CHECK: without --owner, verify against the owner card the log names itself "
            "(a log forged wholesale under another key passes); the OK line says so",
        )
        p.add_argument(
            "--allow-unanchored",
            action="store_true",
            help="WEAKER CHECK: accept a log with no signed checkpoint yet (only its hash chain, which anyone "
            "can compute, is checked); the OK line says so",
        )
    report = sub.choices["report"]
    fmt = report.add_mutually_exclusive_group()
    fmt.add_argument("--html", dest="format", action="store_const", const=Format.HTML.value)
    fmt.add_argument("--csv", dest="format", action="store_const", const=Format.CSV.value)
    fmt.add_argument("--json", dest="format", action="store_const", const=Format.JSON.value)
    report.set_defaults(format=Format.TERMINAL.value)
    report.add_argument("-o", "--output", help="write the report to this file (default: stdout)")
    report.add_argument("--purpose", default=DEFAULT_PURPOSE, help="purpose of the processing (Art. 30(1)(b))")
    report.add_argument("--contact", default=None, help="controller's contact details (Art. 30(1)(a))")
    report.add_argument("--recipient-location", default=None, help="where the recipient processes (third-country transfers)")
    args = parser.parse_args(argv)
    return run_cli(PROG, lambda: _cmd_verify(args) if args.command == "verify" else _cmd_report(args))


if __name__ == "__main__":
    sys.exit(main())
