"""The one CLI boundary: every expected failure is one escaped line and exit 1; bugs keep their traceback."""

from __future__ import annotations

import errno

import pytest

from protocol.cli import EXIT_FAILED, run_cli
from protocol.errors import ArtifactError


class DomainError(RuntimeError):
    pass


def _fail_with(exc: BaseException):
    def body() -> int:
        raise exc

    return body


def _line(capsys: pytest.CaptureFixture[str], body, **kw) -> str:
    with pytest.raises(SystemExit) as stop:
        run_cli("tool", body, **kw)
    assert stop.value.code == EXIT_FAILED
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err.rstrip("\n")


def test_protocol_error_is_its_own_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert _line(capsys, _fail_with(ArtifactError("weights.safetensors: bad header"))) == "tool: error: weights.safetensors: bad header"


def test_full_disk_names_the_path_and_the_fix(capsys: pytest.CaptureFixture[str]) -> None:
    line = _line(capsys, _fail_with(OSError(errno.ENOSPC, "No space left on device", "/out/final")))
    assert line == "tool: error: cannot use /out/final: No space left on device (free some space and run again)"


def test_domain_errors_are_listed_by_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert _line(capsys, _fail_with(DomainError("model has no prunable layer")), errors=(DomainError,)).endswith("no prunable layer")
    with pytest.raises(DomainError):
        run_cli("tool", _fail_with(DomainError("unlisted")))


def test_interrupt_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert _line(capsys, _fail_with(KeyboardInterrupt())) == "tool: error: interrupted"


def test_other_party_text_in_an_error_is_escaped_and_bounded(capsys: pytest.CaptureFixture[str]) -> None:
    line = _line(capsys, _fail_with(ArtifactError("refused: \x1b[2J\u202e" + "x" * 5000)))
    assert "\x1b" not in line and "\u202e" not in line and "\\x1b[2J" in line
    assert len(line) < 800


def test_a_bug_keeps_its_traceback() -> None:
    with pytest.raises(ZeroDivisionError):
        run_cli("tool", _fail_with(ZeroDivisionError("bug")))


def test_success_returns_the_exit_code() -> None:
    assert run_cli("tool", lambda: 0) == 0
