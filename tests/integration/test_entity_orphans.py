"""An entity killed with SIGKILL leaves no Flower process behind, and a restart finds its ports free.

Found under faults: kill -9 of ``entity.serve`` alone left the SuperLink, SuperExec and ServerApp
running as orphans, so a restart was refused (``port already in use``) until someone found them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from protocol.flower_processes import descendants, flower_env, free_port, pid_alive

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def _port_free(port: int) -> bool:
    """Free as a restarted entity needs it: nothing listening, and a bind (SO_REUSEADDR, as the
    SuperLink binds, so closed connections in TIME_WAIT do not count) succeeds."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def test_sigkill_of_the_entity_takes_every_flower_process_with_it(tmp_path: Path) -> None:
    port, control = free_port(), free_port()
    home = tmp_path / "home"
    command = [sys.executable, "-m", "entity.serve", "--home", str(home), "--port", str(port), "--control-port", str(control), "--quiet"]

    def start() -> subprocess.Popen:
        quiet = subprocess.DEVNULL
        return subprocess.Popen(command, cwd=REPO, env=flower_env(tmp_path / "flwr"), stdin=quiet, stdout=quiet, stderr=quiet, start_new_session=True)

    entity = start()
    tree: list[int] = []
    try:
        events = home / "events.jsonl"
        assert _wait(lambda: events.is_file() and b"service-started" in events.read_bytes(), 120), "the entity did not start"
        tree = descendants(entity.pid)
        names = {Path(os.readlink(f"/proc/{pid}/exe")).name for pid in tree if pid_alive(pid)}
        assert tree and any(name.startswith("python") for name in names)
        os.kill(entity.pid, signal.SIGKILL)
        entity.wait(timeout=10)
        assert _wait(lambda: not any(pid_alive(pid) for pid in tree), 30), [pid for pid in tree if pid_alive(pid)]
        assert _wait(lambda: _port_free(port) and _port_free(control), 10), "a port is still taken"
        # A restart with the same home and ports comes up.
        started = events.read_bytes().count(b"service-started")
        entity = start()
        assert _wait(lambda: events.read_bytes().count(b"service-started") > started, 120), "the restart did not come up"
        tree = descendants(entity.pid)
        entity.terminate()
        assert entity.wait(timeout=30) == 0
        assert _wait(lambda: not any(pid_alive(pid) for pid in tree), 30)
    finally:
        for pid in [entity.pid, *tree]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        entity.wait(timeout=10)
