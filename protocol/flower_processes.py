"""Starting and stopping the Flower processes each side runs, with nothing left behind.

Flower's SuperLink starts a SuperExec in a session of its own, which starts one ServerApp process
per run; a stopped parent is noticed by its children only after a delay. So stopping walks the
whole process tree (via /proc) and signals every descendant, not just the process group.
Every Flower process gets the environment DESIGN.md asks for: no telemetry, no update check, and
a FLWR_HOME of its own. Logs are created 0600 (they name paths, node ids and run ids), and a
process may be started with a umask (the entity's SuperLink runs with 077 so that its database
and everything its ServerApp writes are private to the entity's user).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ManagedProcess", "ProcessError", "descendants", "flower_command", "flower_env", "free_port", "pid_alive", "port_open", "wait_for_port"]


class ProcessError(RuntimeError):
    """A Flower process failed to start, died, or did not become ready in time."""


def flower_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a Flower process: quiet, offline, with its own FLWR_HOME."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["FLWR_HOME"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


def flower_command(name: str) -> str:
    """Path of a Flower console script installed next to this interpreter."""
    candidate = Path(sys.executable).parent / name
    if not candidate.exists():
        raise ProcessError(f"{name} not found next to {sys.executable}: is flwr installed in this environment?")
    return str(candidate)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                stat = handle.read().decode(errors="replace")
        except OSError:
            continue
        # Field 4 (ppid) follows the parenthesised command, which may hold spaces.
        try:
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        except (ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    return children


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (children first, then theirs)."""
    tree = _children_map()
    out: list[int] = []
    stack = list(tree.get(pid, []))
    while stack:
        child = stack.pop(0)
        out.append(child)
        stack.extend(tree.get(child, []))
    return out


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return b") Z " not in handle.read()
    except OSError:
        return False


@dataclass
class ManagedProcess:
    """A child process in its own session, logged to a file, stopped with its whole tree."""

    name: str
    command: Sequence[str]
    log_path: Path
    env: Mapping[str, str]
    cwd: Path | None = None
    umask: int | None = None
    process: subprocess.Popen | None = field(default=None, init=False)

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        except OSError as exc:
            raise ProcessError(f"cannot open the {self.name} log {self.log_path}: {exc.strerror}") from exc
        try:
            os.fchmod(fd, 0o600)  # an older log may have been created with wider permissions
        except OSError as exc:
            os.close(fd)
            raise ProcessError(f"cannot make the {self.name} log {self.log_path} private (mode 0600): {exc.strerror}") from exc
        try:
            self.process = subprocess.Popen(
                list(self.command),
                stdout=fd,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(self.env),
                cwd=self.cwd,
                start_new_session=True,
                umask=-1 if self.umask is None else self.umask,
            )
        except OSError as exc:
            raise ProcessError(f"cannot start {self.name}: {exc}") from exc
        finally:
            os.close(fd)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        # Flower colours its log lines: the codes would show as escapes in a one-line error.
        return " | ".join(" ".join(re.sub(r"\x1b\[[0-9;]*m", "", line).split()) for line in text[-lines:])

    def exit_reason(self) -> str:
        """Flower's own explanation of why the process exited, else the log's last lines.

        Flower ends a fatal error with ``Exit Code: N``, its reason, and a documentation link,
        then logs its shutdown; the last lines alone would show only the shutdown.
        """
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        starts = [i for i, line in enumerate(text) if "Exit Code:" in line]
        if not starts:
            return self.log_tail()
        reason = []
        for line in text[starts[-1] :]:
            line = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", line).split())
            if line.startswith("For more information"):
                break
            if line:
                reason.append(line)
        return " | ".join(reason)

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the process and every descendant, then SIGKILL whatever is left after ``grace``."""
        if self.process is None:
            return
        tree = [self.process.pid] + descendants(self.process.pid)
        for pid in tree:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            self.process.poll()
            tree = [pid for pid in tree if pid_alive(pid)]
            if not tree:
                break
            time.sleep(0.1)
        for pid in [self.process.pid] + descendants(self.process.pid) + tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass


def wait_for_port(proc: ManagedProcess, host: str, port: int, timeout: float) -> None:
    """Wait until ``host:port`` accepts connections, failing early if ``proc`` dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.running():
            raise ProcessError(f"{proc.name} exited during start-up: {proc.exit_reason() or 'no output'} (log: {proc.log_path})")
        if port_open(host, port):
            return
        time.sleep(0.1)
    raise ProcessError(f"{proc.name} did not listen on {host}:{port} within {timeout:.0f} s (log: {proc.log_path})")
