"""Text from the other party is shown escaped: no terminal control, no bidi trickery, bounded length."""

from __future__ import annotations

import io

import pytest

from protocol.display import TRUNCATED, printable

CLEAR_SCREEN = "\x1b[2J"


@pytest.mark.parametrize(
    "hidden, shown",
    [
        ("\x1b", "\\x1b"),  # ESC: starts every CSI/OSC sequence
        ("\x00", "\\x00"),
        ("\x07", "\\x07"),  # BEL ends an OSC sequence
        ("\n", "\\n"),
        ("\r", "\\r"),  # returns to the line start to overwrite what was printed
        ("\t", "\\t"),
        ("\x7f", "\\x7f"),  # DEL
        ("\x9b", "\\x9b"),  # C1 CSI, a one-byte escape sequence on some terminals
        ("\x85", "\\x85"),  # C1 next line
        ("\u202a", "\\u202a"),
        ("\u202b", "\\u202b"),
        ("\u202c", "\\u202c"),
        ("\u202d", "\\u202d"),
        ("\u202e", "\\u202e"),  # right-to-left override
        ("\u2066", "\\u2066"),
        ("\u2067", "\\u2067"),
        ("\u2068", "\\u2068"),
        ("\u2069", "\\u2069"),
        ("\u200b", "\\u200b"),  # zero-width space
        ("\u2028", "\\u2028"),  # line separator
        ("\ufeff", "\\ufeff"),
        ("\U000e0041", "\\U000e0041"),  # tag character (format)
    ],
)
def test_hidden_characters_become_visible_escapes(hidden, shown):
    assert printable(f"a{hidden}b") == f"a{shown}b"


def test_clear_screen_sequence_is_shown_not_obeyed():
    out = printable(f"refused {CLEAR_SCREEN}gotcha")
    assert out == "refused \\x1b[2Jgotcha" and "\x1b" not in out


def test_ordinary_text_and_unicode_pass_unchanged():
    text = "Grüße, 東京: rate 8.0312x — [bold]not markup here[/] \\x1b stays as typed"
    assert printable(text) == text


def test_long_text_is_cut_at_the_limit_and_marked():
    out = printable("x" * 10_000, limit=50)
    assert out == "x" * 50 + TRUNCATED


def test_cut_never_splits_an_escape():
    out = printable("x" * 48 + "\x1b\x1b", limit=50)
    assert out == "x" * 48 + TRUNCATED


def test_escaping_twice_changes_nothing():
    for text in (f"a{CLEAR_SCREEN}\u202eb", "y" * 500, "z" * 198 + "\x1b" * 5):
        once = printable(text)
        assert printable(once) == once


def test_non_text_is_shown_through_str():
    assert printable(ValueError(f"bad {CLEAR_SCREEN}")) == "bad \\x1b[2J"


# --------------------------------------------------------------------------- where the owner shows it
def test_entity_refusal_with_escape_sequences_is_kept_escaped(tmp_path):
    from owner.session import OwnerSession
    from protocol.audit import AuditLog, read_records
    from protocol.keys import init_identity
    from protocol.spec import InputSpec, PruneRequest
    from simulations.models import small_vgg
    from tests.helpers import export_eval

    owner = init_identity(tmp_path / "owner", "owner", name="owner")
    entity = init_identity(tmp_path / "entity", "entity", name="entity")
    session = OwnerSession(
        owner,
        entity.card,
        export_eval(small_vgg()),
        InputSpec((1, 28, 28), (0.286,), (0.353,)),
        PruneRequest(8.0),
        AuditLog.open(tmp_path / "audit.jsonl", owner),
    )
    session.refused(f"no {CLEAR_SCREEN}\u202etxt.exe" + "!" * 100_000)
    assert session.refusal is not None and "\x1b" not in session.refusal and "\u202e" not in session.refusal
    assert "\\x1b[2J" in session.refusal and len(session.refusal) < 400
    logged = read_records(tmp_path / "audit.jsonl")[-1]["details"]["reason"]
    assert logged.startswith("no \\x1b[2J\\u202etxt.exe") and logged.endswith(TRUNCATED)


def test_cli_error_line_shows_entity_text_escaped(capsys):
    from owner.run import PROG
    from protocol.cli import fatal

    with pytest.raises(SystemExit) as info:
        fatal(PROG, f"job failed: the entity refused the job: {CLEAR_SCREEN}")
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err == "owner.run: error: job failed: the entity refused the job: \\x1b[2J\n"


def test_summary_table_shows_entity_text_without_markup_or_escapes():
    from rich.console import Console

    from owner.run import print_summary

    summary = {
        "job_id": "job-[bold]1[/]",
        "recipe": f"[red]one{CLEAR_SCREEN}shot[/",
        "achieved_rate": "8.0000",
        "target_rate": 8.0,
        "accuracy": {"dense": 0.9, "pruned": 0.5, "retrained": 0.88},
        "epochs": 3,
        "bytes_sent": 1,
        "bytes_received": 2,
        "transfers": [],
        "ignored_fabs": [],
        "final_model": "/tmp/final",
        "audit_log": "/tmp/audit.jsonl",
        "seconds": {"total": 1.0},
    }
    buffer = io.StringIO()
    print_summary(summary, Console(file=buffer, width=200, color_system=None))
    shown = buffer.getvalue()
    assert "\x1b" not in shown
    assert "[red]one\\x1b[2Jshot[/" in shown and "job-[bold]1[/]" in shown
