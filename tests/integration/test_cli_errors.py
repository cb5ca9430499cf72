"""Bad flags and bad inputs give one-line errors (no traceback) and exit 1; bad usage exits 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from protocol.flower_processes import free_port
from simulations.local import REPO
from tests.helpers import owner_run_args


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"},
    )


@pytest.fixture()
def owner_args(tmp_path) -> list[str]:
    data = tmp_path / "private"
    (data / "FashionMNIST" / "raw").mkdir(parents=True)
    return ["-m", "owner.run", *owner_run_args(tmp_path, data)]


def _one_line_error(done: subprocess.CompletedProcess, needle: str) -> None:
    assert done.returncode == 1, done.stderr
    lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
    assert "Traceback" not in done.stderr, done.stderr
    assert lines[-1].startswith("owner.run: error:") and needle in lines[-1], lines


def test_missing_data_dir(tmp_path, owner_args):
    args = list(owner_args)
    args[args.index("--data") + 1] = str(tmp_path / "nowhere")
    _one_line_error(_run(args, tmp_path), "does not exist")


def test_bad_model_path(tmp_path, owner_args):
    args = list(owner_args)
    args[args.index("--model") + 1] = "no_such_package.models:net"
    _one_line_error(_run(args, tmp_path), "cannot import")


def test_data_dir_without_a_dataset(tmp_path, owner_args):
    args = list(owner_args)
    empty = tmp_path / "empty"
    empty.mkdir()
    args[args.index("--data") + 1] = str(empty)
    _one_line_error(_run(args, tmp_path), "no dataset found")


def test_entity_unreachable_within_timeout(tmp_path, owner_args, fashion_root):
    args = list(owner_args)
    args[args.index("--data") + 1] = str(fashion_root)
    args += ["--entity", f"127.0.0.1:{free_port()}", "--connect-timeout", "2"]
    _one_line_error(_run(args, tmp_path), "unreachable within 2 s")


def test_bad_usage_exits_2(tmp_path):
    done = _run(["-m", "owner.run", "--rate", "fast"], tmp_path)
    assert done.returncode == 2 and "invalid float value" in done.stderr


def test_entity_serve_refuses_a_busy_port(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        done = _run(["-m", "entity.serve", "--port", str(port), "--home", str(tmp_path / "home"), "--quiet"], tmp_path)
    assert done.returncode == 1 and "already in use" in done.stderr.strip().splitlines()[-1], done.stderr
