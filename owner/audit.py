"""``python -m owner.audit``: verify the owner's audit trail and report it to a compliance officer.

    python -m owner.audit verify LOG [--owner CARD] [--entity CARD] [--checkpoint FILE]
    python -m owner.audit report LOG [--html | --csv | --json] [-o FILE] [--purpose TEXT] ...

``verify`` exits 0 when the chain, every checkpoint, countersignature and receipt hold, else 1
with one line naming the first broken record. ``report`` renders the verified trail (terminal via
rich, or HTML / CSV / JSON) with the GDPR Art. 30 fields and what the trail proves and cannot;
it exits 1 when verification failed (the report then covers the verified prefix only).
Without ``--owner`` / ``--entity`` the keys recorded in the log itself are used, with a warning:
pinning the cards is what rules out a log rewritten wholesale under another key.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from owner._audit_report import RENDERERS, Format, Report, build_report, verdict_line
from protocol.audit import AuditVerdict, embedded_cards, verify_log
from protocol.errors import ProtocolError
from protocol.keys import IdentityCard, load_card


def _fatal(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(1)


def _cards(args: argparse.Namespace) -> tuple[IdentityCard, IdentityCard | dict[str, IdentityCard], bool, bool]:
    log = Path(args.log)
    if not log.is_file():
        _fatal(f"audit log {log} not found")
    owner = load_card(args.owner) if args.owner else None
    pinned = [load_card(path) for path in args.entity or []]
    entity: IdentityCard | dict[str, IdentityCard] | None = None
    if len(pinned) == 1:
        entity = pinned[0]
    elif pinned:
        entity = {card.fingerprint: card for card in pinned}
    if owner is not None and entity is not None:
        return owner, entity, True, True
    embedded_owner, peers = embedded_cards(log)
    if owner is None:
        if embedded_owner is None:
            _fatal(f"{log} names no owner card; pass --owner CARD")
        owner = embedded_owner
    if entity is None:
        entity = peers
    return owner, entity, args.owner is not None, bool(pinned)


def _verify(args: argparse.Namespace) -> tuple[AuditVerdict, IdentityCard, bool, bool]:
    owner, entity, owner_pinned, entity_pinned = _cards(args)
    checkpoint = None
    if args.checkpoint:
        try:
            checkpoint = Path(args.checkpoint).read_bytes()
        except OSError as exc:
            _fatal(f"cannot read checkpoint {args.checkpoint}: {exc.strerror}")
    verdict = verify_log(Path(args.log), owner=owner, entity=entity, checkpoint=checkpoint, every_signature=not args.quick)
    return verdict, owner, owner_pinned, entity_pinned


def _cmd_verify(args: argparse.Namespace) -> int:
    verdict, _, owner_pinned, entity_pinned = _verify(args)
    if verdict.ok:
        print(
            f"OK: {args.log}: {verdict.records} records, {verdict.checkpoints} signed checkpoints, "
            f"{verdict.receipts} receipts; first {verdict.anchored} records signed, "
            f"first {verdict.countersigned} countersigned by the entity"
        )
    else:
        print(f"FAIL: {args.log}: {verdict.error}")
    warnings = list(verdict.warnings)
    if not owner_pinned:
        warnings.append("owner key taken from the log itself; pin it with --owner CARD")
    if not entity_pinned:
        warnings.append("entity key taken from the log itself; pin it with --entity CARD")
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0 if verdict.ok else 1


def _render_terminal(report: Report) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    v = report.verdict
    console.print(f"[bold]Audit report[/bold] {report.log_path}", markup=True, highlight=False)
    console.print(verdict_line(report), style="bold green" if v.ok else "bold red", markup=False)
    for warning in report.warnings:
        console.print(f"warning: {warning}", style="yellow", markup=False)
    a = report.art30
    art = Table(title="Record of processing (GDPR Art. 30)", show_header=False, expand=True)
    art.add_column("field", style="bold", no_wrap=True)
    art.add_column("value")
    art.add_row("Controller", f"{a['controller']['name']} (key {a['controller']['key_fingerprint']}); contact: {a['controller']['contact']}")
    art.add_row("Purposes", a["purposes"])
    art.add_row("Data subjects", a["categories_of_data_subjects"])
    art.add_row("Categories of data", "\n".join(a["categories_of_data"]))
    art.add_row("Not transferred", a["data_not_transferred"])
    art.add_row("Recipients", "\n".join(f"{r['name']} ({r['key_fingerprint'][:16]})" for r in a["recipients"]) or "none")
    art.add_row("Transfers", str(a["transfers"]))
    art.add_row("Third countries", a["third_country_transfers"])
    art.add_row("Security measures", "\n".join(f"- {m}" for m in a["security_measures"]))
    console.print(art)
    jobs: dict[str, list] = {}
    for t in report.transfers:
        jobs.setdefault(t.job_id, []).append(t)
    for job_id, items in jobs.items():
        table = Table(title=f"Job {job_id} with {items[0].peer_name} ({items[0].peer[:16]})", expand=True)
        table.add_column("#", justify="right")
        table.add_column("time", no_wrap=True)
        table.add_column("direction")
        table.add_column("files (SHA-256 prefix)", no_wrap=True)
        table.add_column("bytes", justify="right", no_wrap=True)
        table.add_column("receipt", no_wrap=True)
        table.add_column("countersigned", no_wrap=True)
        for t in items:
            table.add_row(
                str(t.seq), t.time, t.direction,
                "\n".join(f"{n} {h.removeprefix('sha256:')[:12]}" for n, h in sorted(t.files.items())),
                f"{t.bytes:,}", ("yes" if t.receipt else "no") if t.direction == "sent" else "-",
                "yes" if t.countersigned else "not yet",
            )
        console.print(table)
    console.print(
        "receipt: the entity signed for exactly these files; countersigned: a checkpoint covering the record "
        "was countersigned by the entity", style="dim", markup=False, highlight=False,
    )
    for fact in report.data_facts:
        console.print(f"data facts sent (job {fact['job_id']}): {fact['input_spec']}", markup=False, highlight=False)
    for blocked in report.blocked:
        console.print(f"egress blocked {blocked.get('time')}: {blocked.get('reason')}", style="red", markup=False)
    for refused in report.refused:
        console.print(f"admission refused {refused.get('time')}: {refused.get('reason')}", style="red", markup=False)
    console.print("[bold]What this trail proves[/bold]")
    for line in report.proves:
        console.print(f"- {line}", markup=False, highlight=False)
    console.print("[bold]What it cannot prove[/bold]")
    for line in report.cannot_prove:
        console.print(f"- {line}", markup=False, highlight=False)


def _cmd_report(args: argparse.Namespace) -> int:
    verdict, owner, owner_pinned, entity_pinned = _verify(args)
    report = build_report(
        Path(args.log), verdict, owner=owner, owner_pinned=owner_pinned, entity_pinned=entity_pinned,
        purpose=args.purpose, controller_contact=args.contact, recipient_location=args.recipient_location,
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
    for name, help_text in (("verify", "check the trail; exit 1 naming the first broken record"),
                            ("report", "render the trail for a compliance officer")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("log", help="the audit log (JSONL)")
        p.add_argument("--owner", type=Path, help="the owner's pinned identity card (card.json)")
        p.add_argument("--entity", type=Path, action="append",
                       help="an entity's pinned identity card (repeat for an owner that used several entities)")
        p.add_argument("--checkpoint", type=Path, help="a signed checkpoint held outside the log (detects truncation)")
        p.add_argument("--quick", action="store_true",
                       help="verify the owner's signature on the last checkpoint only (earlier ones are covered by its "
                            "Merkle root); entity signatures are always verified")
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
    try:
        return _cmd_verify(args) if args.command == "verify" else _cmd_report(args)
    except ProtocolError as exc:
        _fatal(str(exc))
    except OSError as exc:
        _fatal(f"{exc.filename or args.log}: {exc.strerror}")


if __name__ == "__main__":
    sys.exit(main())
