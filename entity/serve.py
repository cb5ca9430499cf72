"""``python -m entity.serve``: the compression entity as a long-lived service.

Starts a Flower SuperLink (loopback by default), submits the entity's ServerApp as one run that
serves every owner that connects, and shows what happens, job by job, from the service's event
log. SIGTERM or Ctrl-C stops the SuperLink and every process it started.

Settings come from ``entity.toml`` in the working directory (or ``--config``); flags override it.
"""
from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from protocol.errors import ProtocolError
from protocol.flower_processes import (
    ManagedProcess,
    descendants,
    ProcessError,
    flower_command,
    flower_env,
    port_open,
    wait_for_port,
)
from protocol.keys import init_identity, load_identity, load_registry
from protocol.settings import SettingsError, merge_settings

DEFAULT_PORT = 9092


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    home: Path = Path("entity-home")
    owners: Path | None = None
    recipe: str = ""
    device: str = "cpu"
    epochs: int = -1
    synthetic_images: int = 0
    synthetic_steps: int = 0
    start_timeout: float = 60.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None

    @property
    def owners_dir(self) -> Path:
        return self.owners if self.owners is not None else self.home / "owners"

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


class ServeError(RuntimeError):
    """The service cannot start or keep running (one line for the operator)."""


def _fatal(message: str) -> NoReturn:
    print(f"entity.serve: error: {message}", file=sys.stderr)
    raise SystemExit(1)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m entity.serve", description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, help="TOML settings file (default: ./entity.toml if present)")
    p.add_argument("--host", help="address the SuperLink binds (default 127.0.0.1; keep it on loopback or a private network)")
    p.add_argument("--port", type=int, help=f"SuperLink port for owners (default {DEFAULT_PORT})")
    p.add_argument("--home", type=Path, help="service folder: keys/, owners/, events.jsonl, Flower state (default ./entity-home)")
    p.add_argument("--owners", type=Path, help="folder of registered owner identity cards (default HOME/owners)")
    p.add_argument("--recipe", help="pruning recipe (default: the engine's benchmark winner)")
    p.add_argument("--device", help="torch device for pruning: cpu or cuda")
    p.add_argument("--epochs", type=int, help="retraining epochs recommended to owners (default: the recipe's)")
    p.add_argument("--synthetic-images", type=int, help="synthetic images the pruning engine makes per job (default: the engine's)")
    p.add_argument("--synthetic-steps", type=int, help="optimisation steps per synthetic batch (default: the engine's)")
    p.add_argument("--start-timeout", type=float, help="seconds to wait for the SuperLink and ServerApp (default 60)")
    p.add_argument("--tls-cert", type=Path, help="PEM certificate for the SuperLink (enables TLS)")
    p.add_argument("--tls-key", type=Path, help="PEM private key for --tls-cert")
    p.add_argument("--tls-ca", type=Path, help="PEM CA certificate that signed --tls-cert")
    p.add_argument("--quiet", action="store_true", help="no live event display")
    return p


def load_config(args: argparse.Namespace) -> ServeConfig:
    try:
        data = merge_settings(args, section="entity", default_file="entity.toml", known=ServeConfig.__dataclass_fields__,
                              path_keys=("home", "owners", "tls_cert", "tls_key", "tls_ca"))
    except SettingsError as exc:
        raise ServeError(str(exc)) from None
    for key in ("home", "owners"):
        if data.get(key) is not None:
            data[key] = data[key].resolve()
    config = ServeConfig(**data)
    if config.synthetic_images < 0 or config.synthetic_steps < 0:
        raise ServeError("synthetic images and steps must be positive")
    if not 0 < config.port < 65536:
        raise ServeError(f"port {config.port} is out of range")
    if (config.tls_cert is None) != (config.tls_key is None) or (config.tls_cert and config.tls_ca is None):
        raise ServeError("TLS needs --tls-cert, --tls-key and --tls-ca together")
    for key in ("tls_cert", "tls_key", "tls_ca"):
        value = getattr(config, key)
        if value is not None and not value.is_file():
            raise ServeError(f"{key.replace('_', '-')} file {value} does not exist")
    return config


def _app_pyproject(config: ServeConfig) -> str:
    """The FAB the entity submits: only configuration; the code is the installed ``entity`` package."""
    values = {
        "home": str(config.home.resolve()),
        "owners": str(config.owners_dir.resolve()),
        "recipe": config.recipe,
        "device": config.device,
        "epochs": config.epochs,
        "synthetic_images": config.synthetic_images,
        "synthetic_steps": config.synthetic_steps,
    }
    lines = [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    return "\n".join([
        "[build-system]",
        'requires = ["setuptools"]',
        'build-backend = "setuptools.build_meta"',
        "[project]",
        'name = "blindprune-entity"',
        'version = "1.0.0"',
        'description = "blindprune compression entity: data-free pattern pruning"',
        'license = "Apache-2.0"',
        "dependencies = []",
        "[tool.flwr.app]",
        'publisher = "blindprune"',
        "[tool.flwr.app.components]",
        'serverapp = "entity.server_app:app"',
        '# Owners run their own installed ClientApp; this reference is never executed by them.',
        'clientapp = "owner.client_app:app"',
        "[tool.flwr.app.config]",
        *lines,
        "",
    ])


class EntityService:
    """The SuperLink process and the one long-lived run of the entity's ServerApp."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.home = config.home
        self.flwr_home = self.home / "flwr"
        self.superlink: ManagedProcess | None = None
        self.run_id: str | None = None

    def prepare(self) -> list[str]:
        """Keys, owner registry and folders; returns notices for the operator."""
        notices = []
        self.home.mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        keys = self.home / "keys"
        if not (keys / "card.json").is_file():
            init_identity(keys, "entity", name="blindprune-entity")
            notices.append(f"created the entity identity; give owners its card: {keys / 'card.json'}")
        load_identity(keys)
        self.config.owners_dir.mkdir(parents=True, exist_ok=True)
        registry = load_registry(self.config.owners_dir)
        if not registry:
            notices.append(f"no owner card registered in {self.config.owners_dir}: every request will be refused")
        else:
            notices.append(f"{len(registry)} owner(s) registered in {self.config.owners_dir}")
        return notices

    def _connection_toml(self) -> str:
        address = f"{self.config.host}:{self.config.port}"
        if self.config.tls:
            return f'[superlink]\ndefault = "entity"\n[superlink.entity]\naddress = "{address}"\nroot-certificates = "{self.config.tls_ca}"\n'
        return f'[superlink]\ndefault = "entity"\n[superlink.entity]\naddress = "{address}"\ninsecure = true\n'

    def _fresh_database(self) -> Path:
        """A new SuperLink state file per service start (``:memory:`` breaks under concurrent requests)."""
        path = self.flwr_home / "superlink.db"
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(str(path) + suffix).unlink(missing_ok=True)
        return path

    def start(self) -> None:
        cfg = self.config
        if port_open(cfg.host, cfg.port):
            raise ServeError(f"port {cfg.port} on {cfg.host} is already in use")
        command = [flower_command("flower-superlink"), "--host", cfg.host, "--port", str(cfg.port),
                   "--database", str(self._fresh_database()), "--disable-runtime-dependency-installation"]
        if cfg.tls:
            command += ["--ssl-certfile", str(cfg.tls_cert), "--ssl-keyfile", str(cfg.tls_key), "--ssl-ca-certfile", str(cfg.tls_ca)]
        else:
            command += ["--insecure"]
        env = flower_env(self.flwr_home)
        self.superlink = ManagedProcess("SuperLink", command, self.home / "superlink.log", env).start()
        wait_for_port(self.superlink, cfg.host, cfg.port, cfg.start_timeout)
        app_dir = self.home / "app"
        app_dir.mkdir(exist_ok=True)
        (app_dir / "pyproject.toml").write_text(_app_pyproject(cfg))
        (self.flwr_home / "config.toml").write_text(self._connection_toml())
        self.run_id = self._submit(app_dir, env)

    def _submit(self, app_dir: Path, env: dict[str, str]) -> str:
        deadline = time.monotonic() + self.config.start_timeout
        last = ""
        while time.monotonic() < deadline:
            done = subprocess.run([flower_command("flwr"), "run", str(app_dir), "entity", "--format", "json"],
                                  env=env, capture_output=True, text=True, timeout=self.config.start_timeout)
            try:
                answer = json.loads(done.stdout[done.stdout.index("{"):])
            except ValueError:
                answer = {}
            if done.returncode == 0 and answer.get("success"):
                return str(answer["run-id"])
            last = (answer.get("error") or done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            last = last[0] if isinstance(last, list) else str(last)
            time.sleep(1)
        raise ServeError(f"could not submit the entity ServerApp: {last}")

    def run_status(self) -> str:
        """The run's status as Flower reports it (e.g. 'running', 'finished:failed')."""
        done = subprocess.run([flower_command("flwr"), "ls", "entity", "--run-id", str(self.run_id), "--format", "json"],
                              env=flower_env(self.flwr_home), capture_output=True, text=True, timeout=30)
        try:
            runs = json.loads(done.stdout[done.stdout.index("{"):]).get("runs", [])
            return str(runs[0].get("status", "unknown")) if runs else "unknown"
        except (ValueError, IndexError, AttributeError):
            return "unknown"

    def serverapp_running(self) -> bool:
        """Whether a ServerApp process is alive under the SuperLink (a /proc scan, no Flower call)."""
        if self.superlink is None:
            return False
        for pid in descendants(self.superlink.pid):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as handle:
                    if b"flwr-serverapp" in handle.read():
                        return True
            except OSError:
                continue
        return False

    def serverapp_log(self) -> str:
        done = subprocess.run([flower_command("flwr"), "log", str(self.run_id), "entity", "--show"],
                              env=flower_env(self.flwr_home), capture_output=True, text=True, timeout=30)
        text = re.sub(r"\x1b\[[0-9;]*m", "", done.stdout)
        lines = [" ".join(ln.split()) for ln in text.splitlines() if ln.strip()]
        return " | ".join(lines[-3:])

    def stop(self) -> None:
        if self.superlink is not None:
            self.superlink.stop()


def _describe(event: dict) -> str | None:
    kind = event.get("event")
    job = str(event.get("job_id", ""))[:12]
    if kind == "service-started":
        return f"ServerApp running; {event.get('owners')} owner(s) registered"
    if kind == "offered":
        return f"[{job}] offer sent to node {event.get('node_id')}"
    if kind == "admitted":
        return f"[{job}] admitted owner {event.get('owner_name')} ({str(event.get('owner'))[:23]}), {event.get('bytes')} bytes"
    if kind == "pruning":
        step = event.get("phase")
        if step == "layer":
            err = event.get("error") or event.get("synthetic_error") or ""
            return f"[{job}] layer {event.get('index', '?')}/{event.get('total', '?')} {event.get('layer', '')} rate {event.get('rate', '')} error {err}"
        if step in ("start", "done", "synthetic"):
            details = {k: v for k, v in event.items() if k not in ("event", "time", "job_id", "phase")}
            return f"[{job}] {step}: {details}"
        return None
    if kind == "pruned":
        return f"[{job}] pruned with {event.get('recipe')} to {event.get('achieved_rate')}x; sealed result {event.get('bytes_sent')} bytes"
    if kind in ("refused", "declined"):
        return f"[{job}] {kind}: {event.get('reason')}"
    if kind == "delivered":
        return f"[{job}] result delivered"
    if kind == "finished":
        return f"[{job}] job finished"
    if kind in ("owner-error", "error"):
        return f"[{job}] {kind}: {event.get('reason') or event.get('trace', '')}"
    return None


def _follow(path: Path, offset: int) -> tuple[list[dict], int]:
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    events = []
    for line in data[:end].splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events, offset + end


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from rich.console import Console

    console = Console(stderr=True, quiet=args.quiet)
    try:
        config = load_config(args)
    except ServeError as exc:
        _fatal(str(exc))
    service = EntityService(config)
    stopping = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    events_path = config.home / "events.jsonl"
    offset = events_path.stat().st_size if events_path.exists() else 0
    try:
        for notice in service.prepare():
            console.print(f"[cyan]entity:[/] {notice}")
        with console.status("starting SuperLink and the entity ServerApp..."):
            service.start()
        scheme = "TLS" if config.tls else "insecure, loopback only"
        console.print(f"[green]entity:[/] serving on {config.host}:{config.port} ({scheme}); run {service.run_id}; "
                      f"events in {events_path}")
        started = time.monotonic()
        seen_start = False
        last_check = time.monotonic()
        while not stopping:
            events, offset = _follow(events_path, offset)
            for event in events:
                seen_start = seen_start or event.get("event") == "service-started"
                text = _describe(event)
                if text:
                    console.print(f"[green]entity:[/] {text}")
            if service.superlink is not None and not service.superlink.running():
                raise ServeError(f"SuperLink exited: {service.superlink.log_tail()}")
            now = time.monotonic()
            if not seen_start and now - started > config.start_timeout:
                raise ServeError(f"the entity ServerApp did not start within {config.start_timeout:.0f} s: {service.serverapp_log()}")
            if seen_start and now - last_check > 2:
                last_check = now
                if not service.serverapp_running():
                    raise ServeError(f"the entity ServerApp stopped ({service.run_status()}): {service.serverapp_log()}")
            time.sleep(0.2)
        console.print("[cyan]entity:[/] stopping")
        return 0
    except (ServeError, ProcessError, ProtocolError, OSError, subprocess.TimeoutExpired) as exc:
        service.stop()
        _fatal(str(exc))
    finally:
        service.stop()


if __name__ == "__main__":
    raise SystemExit(main())
