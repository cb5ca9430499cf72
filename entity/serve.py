"""``python -m entity.serve``: the compression entity as a long-lived service.

Starts a Flower SuperLink, submits the entity's ServerApp as one run that serves every owner that
connects, and shows what happens, job by job, from the service's event log. SIGTERM or Ctrl-C
stops the SuperLink and every process it started.

The owners' address (``--host``/``--port``) serves Flower's Fleet API only; the Control API
(``flwr run``/``ls``/``stop``, which has no authentication of its own) and the ServerApp's
Runtime API are bound to 127.0.0.1 on a port of their own (see ``entity.superlink``). With
``--auth`` (TLS required) only SuperNodes whose public keys lie in ``HOME/nodes/*.pub`` may
connect; the folder is re-read while the service runs. The app bundle (FAB) every owner receives
carries no configuration: the ServerApp's settings are in ``HOME/serverapp.json``, found through
an environment variable the SuperLink passes down to it. The home folder is kept 0700 and the
SuperLink runs with umask 077.

Settings come from ``entity.toml`` in the working directory (or ``--config``); flags override it.
Each is one field of ``entity.settings.EntitySettings``, from which the flags below are made.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from entity.settings import SETTINGS_ENV, SETTINGS_FILE, STOP_FILE, EntitySettings, write_settings
from protocol._files import atomic_write
from protocol.errors import KeyFileError
from protocol.flower_processes import (
    ManagedProcess,
    ProcessError,
    descendants,
    flower_command,
    flower_env,
    free_port,
    port_open,
    wait_for_port,
)
from protocol.keys import init_identity, load_identity, load_registry
from protocol.settings import SettingsError, merge_settings
from protocol.transport import certificate_names, check_node_public_key

CONTROL_HOST = "127.0.0.1"

# The service's name for the entity's settings: one value, from flags and entity.toml to the ServerApp.
ServeConfig = EntitySettings


class ServeError(RuntimeError):
    """The service cannot start or keep running (one line for the operator)."""


class _FoldItems(argparse.Action):
    """A repeatable flag whose uses fold into one nested table (``--recipe-option admm.admm_iters=50``)."""

    def __init__(self, *args: Any, item: Any, **kwargs: Any) -> None:
        self.item = item
        super().__init__(*args, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option_string: str | None = None) -> None:
        try:
            table, key, value = self.item(values)
        except ValueError as exc:
            parser.error(f"{option_string}: {exc}")  # a usage error: exit 2
        folded = {name: dict(entries) for name, entries in (getattr(namespace, self.dest) or {}).items()}
        folded.setdefault(table, {})[key] = value
        setattr(namespace, self.dest, folded)


def _flag_type(hint: Any) -> Any:
    """The argparse ``type`` for a setting annotated ``hint`` (``int | None`` -> ``int``)."""
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)] or [hint]
    return args[0]


def _parser() -> argparse.ArgumentParser:
    """Flags: ``--config`` and ``--quiet``, and one per ``EntitySettings`` field (its help, its type)."""
    p = argparse.ArgumentParser(prog="python -m entity.serve", description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, help="TOML settings file (default: ./entity.toml if present)")
    for spec in dataclasses.fields(EntitySettings):
        meta = spec.metadata
        flag = meta.get("flag") or "--" + spec.name.replace("_", "-")
        kind = _flag_type(EntitySettings.type_of(spec.name))
        common: dict[str, Any] = {"dest": spec.name, "help": meta["help"]}
        if meta.get("metavar"):
            common["metavar"] = meta["metavar"]
        if meta.get("item") is not None:
            p.add_argument(flag, action=_FoldItems, item=meta["item"], **common)
        elif kind is bool:
            p.add_argument(flag, action="store_true", default=None, **common)
        else:
            p.add_argument(flag, type=kind, **common)
    p.add_argument("--quiet", action="store_true", help="no live event display")
    return p


def load_config(args: argparse.Namespace) -> EntitySettings:
    """The settings from ``entity.toml`` (or ``--config``) with the flags over them, checked."""
    try:
        data = merge_settings(
            args,
            section="entity",
            default_file="entity.toml",
            known=[spec.name for spec in dataclasses.fields(EntitySettings)],
            path_keys=EntitySettings.path_settings(),
        )
    except SettingsError as exc:
        raise ServeError(str(exc)) from None
    for key in ("home", "owners", "nodes"):
        if data.get(key) is not None:
            data[key] = data[key].resolve()
    try:
        config = EntitySettings(**data)
    except SettingsError as exc:
        raise ServeError(str(exc)) from None
    for key in ("tls_cert", "tls_key", "tls_ca"):
        value = getattr(config, key)
        if value is not None and not value.is_file():
            raise ServeError(f"{key.replace('_', '-')} file {value} does not exist")
    if config.tls_cert is not None:
        try:
            names = certificate_names(config.tls_cert)
        except KeyFileError as exc:
            raise ServeError(str(exc)) from None
        if CONTROL_HOST not in names:
            raise ServeError(
                f"TLS certificate {config.tls_cert} does not name {CONTROL_HOST}: the entity's own flwr calls and "
                f"its ServerApp connect over loopback; make one with `python -m protocol.transport tls DIR --host NAME`"
            )
    if config.recipe_options:
        _check_recipe_options(config.recipe_options)
    if config.ray:
        from entity.ray_runner import RayUnavailable, check_ray

        try:
            check_ray()
        except RayUnavailable as exc:
            raise ServeError(str(exc)) from None
        host, _, port = config.ray.rpartition(":")
        if not host or not port.isdigit():
            raise ServeError(f"--ray {config.ray!r} must be the Ray head's HOST:PORT (the address `ray start --head` prints)")
    return config


def _check_recipe_options(options: Mapping[str, Mapping[str, Any]]) -> None:
    """Refuse, at start-up, a recipe option no job could use (it needs the engine, so torch)."""
    from entity.pruning import PruneError, recipe_settings

    for recipe, values in options.items():
        try:
            recipe_settings(recipe, values)
        except PruneError as exc:
            raise ServeError(f"recipe option: {exc}") from None


def _app_pyproject() -> str:
    """The FAB the entity submits and every owner receives: no configuration at all.

    The code is the installed ``entity`` package; the settings (paths included) reach the
    ServerApp through ``SETTINGS_ENV``, so the bundle tells an owner nothing about the host.
    """
    return "\n".join(
        [
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
            "# Owners run their own installed ClientApp; this reference is never executed by them.",
            'clientapp = "owner.client_app:app"',
            "",
        ]
    )


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


class EntityService:
    """The SuperLink process and the one long-lived run of the entity's ServerApp."""

    def __init__(self, config: EntitySettings) -> None:
        self.config = config
        self.home = config.home
        self.flwr_home = self.home / "flwr"
        self.superlink: ManagedProcess | None = None
        self.run_id: str | None = None
        self.control_port = config.control_port
        # SuperNode public key bytes -> node id, for keys registered from the nodes folder.
        self.registered: dict[bytes, int] = {}
        self._rejected: dict[Path, bytes] = {}

    @property
    def control_address(self) -> str:
        return f"{CONTROL_HOST}:{self.control_port}"

    def prepare(self) -> list[str]:
        """Keys, owner registry and folders (private to the entity's user); returns notices for the operator."""
        notices = []
        for folder in (self.home, self.flwr_home):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            if folder.stat().st_mode & 0o077:
                os.chmod(folder, 0o700)
                notices.append(f"made {folder} private to this user (mode 0700)")
        for name in ("events.jsonl", "nonces.jsonl", SETTINGS_FILE, "superlink.log"):
            path = self.home / name
            if path.is_file() and path.stat().st_mode & 0o077:
                os.chmod(path, 0o600)
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
        if self.config.auth:
            self.config.nodes_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not any(self.config.nodes_dir.glob("*.pub")):
                notices.append(
                    f"SuperNode authentication is on and {self.config.nodes_dir} holds no *.pub key: no owner can connect until one is added"
                )
        elif not self.config.tls and not _is_loopback(self.config.host):
            notices.append(
                f"serving owners on {self.config.host} without TLS: routing headers and sizes are visible "
                "on the network; use --tls-cert/--tls-key/--tls-ca (and --auth)"
            )
        return notices

    def _connection_toml(self) -> str:
        """The entity's own flwr CLI connection: the loopback control address, never the owners' one."""
        address = self.control_address
        if self.config.tls:
            return f'[superlink]\ndefault = "entity"\n[superlink.entity]\naddress = "{address}"\nroot-certificates = "{self.config.tls_ca}"\n'
        return f'[superlink]\ndefault = "entity"\n[superlink.entity]\naddress = "{address}"\ninsecure = true\n'

    def _fresh_database(self) -> Path:
        """A new SuperLink state file per service start (``:memory:`` breaks under concurrent requests)."""
        path = self.flwr_home / "superlink.db"
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(str(path) + suffix).unlink(missing_ok=True)
        return path

    def superlink_command(self) -> list[str]:
        """``entity.superlink``: Control and Runtime APIs on loopback, the Fleet API on the owners' address."""
        cfg = self.config
        command = [
            sys.executable,
            "-m",
            "entity.superlink",
            "--fleet-host",
            cfg.host,
            "--fleet-port",
            str(cfg.port),
            "--host",
            CONTROL_HOST,
            "--port",
            str(self.control_port),
            "--database",
            str(self._fresh_database()),
            "--disable-runtime-dependency-installation",
        ]
        if cfg.tls:
            command += ["--ssl-certfile", str(cfg.tls_cert), "--ssl-keyfile", str(cfg.tls_key), "--ssl-ca-certfile", str(cfg.tls_ca)]
        else:
            command += ["--insecure"]
        if cfg.auth:
            command += ["--enable-supernode-auth"]
        return command

    def start(self) -> None:
        cfg = self.config
        if port_open(cfg.host, cfg.port):
            raise ServeError(f"port {cfg.port} on {cfg.host} is already in use")
        if not self.control_port:
            self.control_port = free_port(CONTROL_HOST)
        elif port_open(CONTROL_HOST, self.control_port):
            raise ServeError(f"control port {self.control_port} on {CONTROL_HOST} is already in use")
        (self.home / STOP_FILE).unlink(missing_ok=True)  # an earlier run's request to stop
        settings = self.home / SETTINGS_FILE
        write_settings(settings, cfg)
        env = flower_env(self.flwr_home, {SETTINGS_ENV: str(settings)})
        self.superlink = ManagedProcess("SuperLink", self.superlink_command(), self.home / "superlink.log", env, umask=0o077).start()
        wait_for_port(self.superlink, CONTROL_HOST, self.control_port, cfg.start_timeout)
        wait_for_port(self.superlink, cfg.host, cfg.port, cfg.start_timeout)
        atomic_write(self.flwr_home / "config.toml", self._connection_toml().encode(), mode=0o600)
        app_dir = self.home / "app"
        app_dir.mkdir(mode=0o700, exist_ok=True)
        atomic_write(app_dir / "pyproject.toml", _app_pyproject().encode(), mode=0o600)
        self.run_id = self._submit(app_dir, env)

    def _flwr(self, *args: str, timeout: float = 30) -> tuple[int, dict]:
        """One ``flwr`` CLI call against the loopback control address, its JSON answer parsed."""
        done = subprocess.run(
            [flower_command("flwr"), *args, "--format", "json"], env=flower_env(self.flwr_home), capture_output=True, text=True, timeout=timeout
        )
        try:
            answer = json.loads(done.stdout[done.stdout.index("{") :])
        except ValueError:
            answer = {"error-message": (done.stderr or done.stdout).strip() or "no output"}
        return done.returncode, answer if isinstance(answer, dict) else {}

    def sync_nodes(self) -> list[str]:
        """Register each new key in the nodes folder, unregister removed ones; returns notices.

        Called at start-up and then every few seconds, so an operator adds or withdraws an owner's
        SuperNode by copying or deleting its ``.pub`` file. A key that cannot be registered is
        reported once (until its file changes).
        """
        if not self.config.auth:
            return []
        notices = []
        present: dict[bytes, Path] = {}
        for path in sorted(self.config.nodes_dir.glob("*.pub")):
            try:
                key = check_node_public_key(path)
            except KeyFileError as exc:
                if self._rejected.get(path) != b"invalid":
                    self._rejected[path] = b"invalid"
                    notices.append(f"SuperNode key not registered: {exc}")
                continue
            present.setdefault(key, path)
            if key in self.registered or self._rejected.get(path) == key:
                continue
            code, answer = self._flwr("supernode", "register", str(path), "entity")
            if code == 0 and answer.get("success") and "node-id" in answer:
                self.registered[key] = int(answer["node-id"])
                self._rejected.pop(path, None)
                notices.append(f"registered SuperNode key {path.name} as node {answer['node-id']}")
            else:
                self._rejected[path] = key
                reason = str(answer.get("error-message") or answer.get("error") or "no answer").strip().splitlines()[-1:]
                notices.append(f"SuperNode key {path.name} not registered: {reason[0] if reason else 'no answer'}")
        for key, node_id in list(self.registered.items()):
            if key in present:
                continue
            code, answer = self._flwr("supernode", "unregister", str(node_id), "entity")
            if code == 0 and answer.get("success"):
                del self.registered[key]
                notices.append(f"unregistered SuperNode node {node_id} (its key left {self.config.nodes_dir})")
        return notices

    def _submit(self, app_dir: Path, env: dict[str, str]) -> str:
        deadline = time.monotonic() + self.config.start_timeout
        last = ""
        while time.monotonic() < deadline:
            done = subprocess.run(
                [flower_command("flwr"), "run", str(app_dir), "entity", "--format", "json"],
                env=env,
                capture_output=True,
                text=True,
                timeout=self.config.start_timeout,
            )
            try:
                answer = json.loads(done.stdout[done.stdout.index("{") :])
            except ValueError:
                answer = {}
            if done.returncode == 0 and answer.get("success"):
                return str(answer["run-id"])
            lines = str(answer.get("error") or answer.get("error-message") or done.stderr or done.stdout).strip().splitlines()
            last = lines[-1] if lines else "no output"
            time.sleep(1)
        raise ServeError(f"could not submit the entity ServerApp: {last}")

    def run_status(self) -> str:
        """The run's status as Flower reports it (e.g. 'running', 'finished:failed')."""
        _, answer = self._flwr("ls", "entity", "--run-id", str(self.run_id))
        try:
            runs = answer.get("runs", [])
            return str(runs[0].get("status", "unknown")) if runs else "unknown"
        except (IndexError, AttributeError):
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
        done = subprocess.run(
            [flower_command("flwr"), "log", str(self.run_id), "entity", "--show"],
            env=flower_env(self.flwr_home),
            capture_output=True,
            text=True,
            timeout=30,
        )
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
    if kind == "hello":
        return f"[{job}] hello from {event.get('owner_name')} ({str(event.get('owner'))[:23]}): {event.get('intent')}"
    if kind == "queued":
        position = event.get("position")
        return f"[{job}] " + ("pruning starts" if position == 0 else f"queued at position {position} ({event.get('waiting')} waiting)")
    if kind in ("resumed", "recovered"):
        return f"[{job}] {kind} ({event.get('state')})"
    if kind == "checked":
        return f"[{job}] check answered (nothing but the hello crossed)"
    if kind in ("pull-stalled", "unanswered"):
        return f"[{job}] {kind}: {event.get('note') or event.get('stage', '')}"
    if kind == "admitted":
        return f"[{job}] admitted owner {event.get('owner_name')} ({str(event.get('owner'))[:23]}), {event.get('bytes')} bytes"
    if kind == "pruning":
        step = event.get("phase")
        if step == "layer":
            err = event.get("error") or event.get("synthetic_error") or ""
            kept, kernels = event.get("kept"), event.get("kernels")
            # Conv compression of the layer: 9 weights per dense kernel, 4 per kept pattern kernel.
            rate = f"{9 * kernels / (4 * kept):.2f}x" if isinstance(kept, int) and isinstance(kernels, int) and kept > 0 else "?"
            return f"[{job}] layer {event.get('index', '?')}/{event.get('total', '?')} {event.get('layer', '')} rate {rate} error {err}"
        if step in ("start", "done", "synthetic", "distill"):
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
    if kind == "stopping":
        return f"stopping: telling {event.get('told')} connected owner(s) that their jobs are kept"
    if kind == "stopped":
        missed = event.get("unanswered") or []
        return "every owner told" if not missed else f"{len(missed)} owner(s) did not take the stopping notice; they notice the silence"
    if kind == "abandoned":
        return f"[{job}] abandoned: {event.get('reason')}"
    if kind in ("owner-error", "error"):
        return f"[{job}] {kind}: {event.get('reason') or event.get('trace', '')}"
    return None


def _exit_status(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


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
    from protocol.cli import run_cli

    return run_cli("entity.serve", lambda: _serve(args), errors=(ServeError, ProcessError, subprocess.TimeoutExpired))


def _shown(text: str) -> str:
    """An event line for the operator's terminal: owner-supplied parts (names, reasons) can hold
    anything, so hidden characters are escaped and rich markup is not interpreted."""
    from rich.markup import escape

    from protocol.display import printable

    return escape(printable(text, 500))


STOP_NOTICE_SECONDS = 10.0  # the loop itself gives up on unanswered notices after 5 s


def _tell_owners_stopping(service: EntityService, events_path: Path, offset: int, console: Any) -> int:
    """Ask the ServerApp to tell its connected owners that it stops, and wait (bounded) until it has.

    The jobs themselves are safe either way (they are in the journal); the notice only saves each
    owner from waiting out its ``--stall-timeout`` to learn that the entity is gone.
    """
    try:
        atomic_write(service.home / STOP_FILE, f"{time.time():.0f}\n".encode(), mode=0o600)
    except OSError as exc:
        console.print(f"[yellow]entity:[/] cannot ask the ServerApp to tell the owners ({exc.strerror}); stopping anyway")
        return offset
    deadline = time.monotonic() + STOP_NOTICE_SECONDS
    while time.monotonic() < deadline and service.serverapp_running():
        events, offset = _follow(events_path, offset)
        for event in events:
            text = _describe(event) if event.get("event") in ("stopping", "stopped") else None
            if text:
                console.print(f"[cyan]entity:[/] {_shown(text)}")
            if event.get("event") == "stopped":
                return offset
        time.sleep(0.1)
    return offset


def _serve(args: argparse.Namespace) -> int:
    """Start the service and follow its event log until SIGTERM or Ctrl-C."""
    from rich.console import Console

    console = Console(stderr=True, quiet=args.quiet)
    config = load_config(args)
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
            for notice in service.sync_nodes():
                console.print(f"[cyan]entity:[/] {notice}")
        scheme = ("TLS, SuperNode authentication" if config.auth else "TLS") if config.tls else "no TLS"
        console.print(
            f"[green]entity:[/] serving owners on {config.host}:{config.port} (Fleet API only, {scheme}); "
            f"Control API on {service.control_address} (loopback only, "
            f'FLWR_HOME={service.flwr_home}, connection "entity"); run {service.run_id}; events in {events_path}'
        )
        started = time.monotonic()
        seen_start = False
        last_check = time.monotonic()
        while not stopping:
            events, offset = _follow(events_path, offset)
            for event in events:
                seen_start = seen_start or event.get("event") == "service-started"
                text = _describe(event)
                if text:
                    console.print(f"[green]entity:[/] {_shown(text)}")
            if service.superlink is not None and not service.superlink.running():
                raise ServeError(
                    f"the SuperLink stopped ({_exit_status(service.superlink.process.poll() if service.superlink.process else None)}): "
                    f"{service.superlink.exit_reason()}; "
                    "restart with the same --home: unfinished jobs resume from the journal"
                )
            now = time.monotonic()
            if not seen_start and now - started > config.start_timeout:
                raise ServeError(f"the entity ServerApp did not start within {config.start_timeout:.0f} s: {service.serverapp_log()}")
            if seen_start and now - last_check > 2:
                last_check = now
                if not service.serverapp_running():
                    raise ServeError(f"the entity ServerApp stopped ({service.run_status()}): {service.serverapp_log()}")
                for notice in service.sync_nodes():
                    console.print(f"[cyan]entity:[/] {notice}")
            time.sleep(0.2)
        console.print("[cyan]entity:[/] stopping")
        if seen_start:
            offset = _tell_owners_stopping(service, events_path, offset, console)
        return 0
    finally:
        service.stop()


if __name__ == "__main__":
    raise SystemExit(main())
