"""``python -m simulations.local``: the entity and one or more owners as real processes on 127.0.0.1.

Writes each side's keys and TOML settings into a work folder, registers the owners' cards with
the entity and pins the entity's card at each owner, starts ``python -m entity.serve`` and then
``python -m owner.run`` for every owner (one after the other, or side by side), waits with time
limits, reports, and stops everything it started. ``--demo`` runs the full flow on the embedded
Fashion-MNIST subset with the shipped pre-trained small VGG (the ``make demo`` target).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol.flower_processes import descendants, flower_env, free_port, pid_alive

ASSETS = Path(__file__).resolve().parent / "assets"
REPO = Path(__file__).resolve().parents[1]


class SimulationError(RuntimeError):
    """A simulated party failed (one line)."""


def install_demo_data(target: Path) -> Path:
    """Unpack the embedded Fashion-MNIST subset into ``target/FashionMNIST/raw`` (the owner's private data)."""
    raw = target / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for gz in sorted((ASSETS / "FashionMNIST" / "raw").glob("*.gz")):
        out = raw / gz.name[:-3]
        if not out.exists():
            with gzip.open(gz, "rb") as src:
                out.write_bytes(src.read())
    return target


@dataclass(frozen=True)
class OwnerPlan:
    """One simulated owner: its model, data and request."""

    name: str
    data: Path
    model: str = "simulations.models:small_vgg"
    weights: Path | None = ASSETS / "small_vgg.safetensors"
    input_shape: tuple[int, int, int] = (1, 28, 28)
    mean: tuple[float, ...] = (0.2860,)
    std: tuple[float, ...] = (0.3530,)
    rate: float = 8.0
    epochs: int | None = None
    train_limit: int | None = None
    registered: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def _toml_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def write_toml(path: Path, section: str, values: dict[str, Any]) -> None:
    lines = [f"[{section}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
    path.write_text("\n".join(lines) + "\n")


@dataclass
class OwnerRun:
    name: str
    returncode: int
    seconds: float
    summary: dict | None
    error: str
    out: Path


class LocalDeployment:
    """An entity service plus owners, all as child processes of this one, on loopback by default.

    For two sites on one machine (network namespaces, say) the entity can serve on another
    ``host`` (owners connect there, and a TLS certificate names it, with any ``tls_names``), and
    each side's command can start behind a prefix (``["ip", "netns", "exec", NS]``), which must
    exec the command in place so that the process started is the party itself. Readiness is read
    from the entity's event log, a file, so it works whatever network the entity is in.
    """

    def __init__(
        self,
        work: Path,
        *,
        recipe: str | None = None,
        entity_epochs: int | None = None,
        env: dict[str, str] | None = None,
        start_timeout: float = 120.0,
        tls: bool = False,
        entity_options: dict[str, Any] | None = None,
        host: str = "127.0.0.1",
        tls_names: Sequence[str] = (),
        entity_prefix: Sequence[str] = (),
        owner_prefix: Sequence[str] = (),
    ):
        from protocol.keys import init_identity

        self.work = work.resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.entity_home = self.work / "entity-home"
        self.host = host
        self.port = free_port()
        self.entity_prefix = list(entity_prefix)
        self.owner_prefix = list(owner_prefix)
        self.recipe = recipe
        self.entity_epochs = entity_epochs
        self.start_timeout = start_timeout
        self.entity_options = dict(entity_options or {})
        self.env = flower_env(self.work / "flwr-cli", env)
        self.env["PYTHONPATH"] = str(REPO) + os.pathsep + self.env.get("PYTHONPATH", "")
        self.entity: subprocess.Popen | None = None
        self.tls = None
        if tls:
            from protocol.transport import make_tls_files

            names = list(dict.fromkeys(["127.0.0.1", "localhost", host, *tls_names]))
            self.tls = make_tls_files(self.work / "tls", names)
        if not (self.entity_home / "keys" / "card.json").is_file():
            init_identity(self.entity_home / "keys", "entity", name="blindprune-entity")
        (self.entity_home / "owners").mkdir(parents=True, exist_ok=True)

    @property
    def entity_card(self) -> Path:
        return self.entity_home / "keys" / "card.json"

    @property
    def events(self) -> Path:
        return self.entity_home / "events.jsonl"

    def start_entity(self) -> None:
        values = {
            "home": str(self.entity_home),
            "port": self.port,
            "host": self.host,
            "recipe": self.recipe or "",
            "start_timeout": self.start_timeout,
        }
        if self.entity_epochs is not None:
            values["epochs"] = self.entity_epochs
        values.update(self.entity_options)
        if self.tls is not None:
            values.update(tls_cert=str(self.tls.server_cert), tls_key=str(self.tls.server_key), tls_ca=str(self.tls.ca_cert))
        write_toml(self.work / "entity.toml", "entity", values)
        # A restart with the same home is ready when it has logged a start of its own.
        starts = self._service_starts()
        log = open(self.work / "entity.log", "ab")
        self.entity = subprocess.Popen(
            [*self.entity_prefix, sys.executable, "-m", "entity.serve", "--config", str(self.work / "entity.toml")],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            cwd=self.work,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.entity.poll() is not None:
                raise SimulationError(f"entity.serve exited ({self.entity.returncode}): {self._entity_log_tail()}")
            if self._service_starts() > starts:
                return
            time.sleep(0.2)
        raise SimulationError(f"entity.serve not ready within {self.start_timeout:.0f} s: {self._entity_log_tail()}")

    def _service_starts(self) -> int:
        """How many times the entity's event log says the service started."""
        return sum(1 for record in self.entity_events() if record.get("event") == "service-started")

    def _entity_log_tail(self) -> str:
        try:
            lines = (self.work / "entity.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no output"
        return " | ".join(lines[-3:]) or "no output"

    def prepare_owner(self, plan: OwnerPlan) -> Path:
        """Keys, registration (if planned) and owner.toml for one owner; returns its folder."""
        from protocol.keys import init_identity

        folder = self.work / plan.name
        folder.mkdir(parents=True, exist_ok=True)
        # Each simulation is a new job: an owner's OUT holds one job and refuses a second one.
        shutil.rmtree(folder / "out", ignore_errors=True)
        keys = folder / "keys"
        if not (keys / "card.json").is_file():
            init_identity(keys, "owner", name=plan.name)
        if plan.registered:
            shutil.copyfile(keys / "card.json", self.entity_home / "owners" / f"{plan.name}.json")
        values: dict[str, Any] = {
            "data": str(plan.data.resolve()),
            "model": plan.model,
            "weights": str(plan.weights) if plan.weights else None,
            "input_shape": list(plan.input_shape),
            "mean": list(plan.mean),
            "std": list(plan.std),
            "entity": f"{self.host}:{self.port}",
            "entity_card": str(self.entity_card),
            "keys": str(keys),
            "rate": plan.rate,
            "epochs": plan.epochs,
            "train_limit": plan.train_limit,
            "out": str(folder / "out"),
            "connect_timeout": 60.0,
            "timeout": 900.0,
        }
        if self.tls is not None:
            values["tls_ca"] = str(self.tls.ca_cert)
        values.update(plan.extra)
        write_toml(folder / "owner.toml", "owner", values)
        return folder

    def start_owner(self, plan: OwnerPlan) -> subprocess.Popen:
        folder = self.prepare_owner(plan)
        return self._owner_process(folder, ["--config", str(folder / "owner.toml")])

    def resume_owner(self, plan: OwnerPlan) -> subprocess.Popen:
        """``owner.run --resume OUT`` on the owner's unfinished job, with the settings it started with."""
        folder = self.work / plan.name
        return self._owner_process(folder, ["--resume", str(folder / "out")])

    def resume(self, plan: OwnerPlan, timeout: float = 900.0) -> OwnerRun:
        """Run ``owner.run --resume OUT`` for ``plan`` to its end (see :meth:`resume_owner`)."""
        started = time.monotonic()
        return self.finish_owner(plan, self.resume_owner(plan), started, timeout)

    @staticmethod
    def kill_owner(proc: subprocess.Popen | None) -> None:
        """SIGKILL an owner process that is still running, with everything it started (its SuperNode)."""
        if proc is not None and proc.poll() is None:
            _stop_tree(proc)

    def _owner_process(self, folder: Path, args: list[str]) -> subprocess.Popen:
        log = open(folder / "owner.log", "ab")
        proc = subprocess.Popen(
            [*self.owner_prefix, sys.executable, "-m", "owner.run", *args, "--quiet"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            cwd=folder,
            start_new_session=True,
        )
        log.close()
        return proc

    def finish_owner(self, plan: OwnerPlan, proc: subprocess.Popen, started: float, timeout: float) -> OwnerRun:
        folder = self.work / plan.name
        try:
            proc.wait(timeout=max(1.0, timeout - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            _stop_tree(proc)
            return OwnerRun(plan.name, -1, time.monotonic() - started, None, f"timed out after {timeout:.0f} s", folder / "out")
        summary_path = folder / "out" / "summary.json"
        summary = json.loads(summary_path.read_text()) if proc.returncode == 0 and summary_path.is_file() else None
        return OwnerRun(
            plan.name,
            proc.returncode,
            time.monotonic() - started,
            summary,
            _owner_failure(folder / "out", proc.returncode, folder / "owner.log"),
            folder / "out",
        )

    def kill_entity(self, sig: int = signal.SIGKILL, timeout: float = 30.0) -> int:
        """Send ``sig`` to ``entity.serve`` alone (a crash, or an operator's signal); its exit status."""
        if self.entity is None:
            raise SimulationError("the entity was not started")
        if self.entity.poll() is None:
            self.entity.send_signal(sig)
        try:
            return self.entity.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise SimulationError(f"entity.serve did not exit within {timeout:.0f} s of signal {sig}") from None

    def wait_event(self, event: str, timeout: float, **match: Any) -> dict:
        """The first entity event named ``event`` whose fields equal ``match``, waiting up to ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            for record in self.entity_events():
                if record.get("event") == event and all(record.get(k) == v for k, v in match.items()):
                    return record
            if time.monotonic() > deadline:
                raise SimulationError(f"no entity event {event!r} {match or ''} within {timeout:.0f} s")
            time.sleep(0.05)

    def run_owner(self, plan: OwnerPlan, timeout: float = 900.0) -> OwnerRun:
        started = time.monotonic()
        return self.finish_owner(plan, self.start_owner(plan), started, timeout)

    def run_owners(self, plans: list[OwnerPlan], *, parallel: bool = False, timeout: float = 900.0) -> list[OwnerRun]:
        if not parallel:
            return [self.run_owner(plan, timeout) for plan in plans]
        started = time.monotonic()
        procs = [(plan, self.start_owner(plan)) for plan in plans]
        return [self.finish_owner(plan, proc, started, timeout) for plan, proc in procs]

    def stop(self) -> list[int]:
        """Stop the entity with SIGTERM (as an operator would); return any pids left behind."""
        if self.entity is None:
            return []
        tree = [self.entity.pid] + descendants(self.entity.pid)
        if self.entity.poll() is None:
            self.entity.send_signal(signal.SIGTERM)
            try:
                self.entity.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _stop_tree(self.entity)
        time.sleep(0.5)
        left = [pid for pid in tree if pid_alive(pid)]
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return left

    def entity_events(self) -> list[dict]:
        """The entity's event log so far (a line torn by a killed writer is skipped)."""
        try:
            lines = self.events.read_text().splitlines()
        except OSError:
            return []
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        return records


def _owner_failure(out: Path, returncode: int, log: Path) -> str:
    """Why an owner.run failed, from the ``failure.json`` it writes (never parsed from its stderr)."""
    if returncode == 0:
        return ""
    try:
        return str(json.loads((out / "failure.json").read_text())["error"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"owner.run exited {returncode} before it could say why (see {log})"


def _stop_tree(proc: subprocess.Popen) -> None:
    for pid in [proc.pid] + descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def audit_verdict(deployment: LocalDeployment, run: OwnerRun) -> str:
    """What ``python -m owner.audit verify`` would say about this owner's log."""
    from protocol.audit import verify_log
    from protocol.errors import ProtocolError
    from protocol.keys import load_card

    try:
        verdict = verify_log(
            run.out / "audit.jsonl", owner=load_card(deployment.work / run.name / "keys" / "card.json"), entity=load_card(deployment.entity_card)
        )
    except ProtocolError as exc:
        return f"FAILS: {exc}"
    if not verdict.ok:
        return f"FAILS at record {verdict.first_bad}: {verdict.error}"
    return (
        f"verifies: {verdict.records} records, {verdict.checkpoints} signed checkpoints, "
        f"{verdict.countersigned} records countersigned by the entity, {verdict.receipts} receipt(s)"
    )


def _print_report(runs: list[OwnerRun], deployment: LocalDeployment, wall: float, console) -> None:
    from rich.table import Table

    from owner.run import print_summary

    for run in runs:
        if run.summary is not None:
            print_summary(run.summary, console)
    table = Table(title="local deployment", show_header=True)
    for column in ("owner", "exit", "seconds", "compression", "dense", "pruned", "retrained", "outcome"):
        table.add_column(column)
    for run in runs:
        s = run.summary or {}
        acc = s.get("accuracy", {})
        table.add_row(
            run.name,
            str(run.returncode),
            f"{run.seconds:.1f}",
            f"{s.get('achieved_rate', '-')}x",
            *(f"{acc[k]:.2%}" if k in acc else "-" for k in ("dense", "pruned", "retrained")),
            "ok" if run.returncode == 0 else run.error,
        )
    console.print(table)
    delivered = sum(1 for e in deployment.entity_events() if e.get("event") == "delivered")
    refused = sum(1 for e in deployment.entity_events() if e.get("event") == "refused")
    console.print(f"entity: {delivered} result(s) delivered, {refused} request(s) refused; events {deployment.events}")
    for run in runs:
        if run.summary is not None:
            console.print(f"{run.name}: audit log {audit_verdict(deployment, run)}")
    console.print(f"wall time {wall:.1f} s; work folder {deployment.work}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.local", description=__doc__.splitlines()[0])
    parser.add_argument("--demo", action="store_true", help="the full flow on the embedded Fashion-MNIST subset")
    parser.add_argument("--owners", type=int, default=1, help="number of owners (default 1)")
    parser.add_argument("--parallel", action="store_true", help="run the owners side by side (default: one after the other)")
    parser.add_argument("--work", type=Path, default=Path("runs/local"), help="work folder (default runs/local; runs/demo with --demo)")
    parser.add_argument("--data", type=Path, help="owner data folder (default: the embedded subset)")
    parser.add_argument("--rate", type=float, default=8.0, help="conv compression rate each owner asks for (default 8)")
    parser.add_argument("--epochs", type=int, help="retraining epochs at each owner (default: the entity's recipe)")
    parser.add_argument("--recipe", help="entity pruning recipe (default: the engine's default)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per owner (default 900)")
    parser.add_argument("--synthetic-images", type=int, help="synthetic images per job at the entity (default: the engine's; demo 64)")
    parser.add_argument("--synthetic-steps", type=int, help="optimisation steps per synthetic batch (default: the engine's; demo 50)")
    args = parser.parse_args(argv)
    if args.owners < 1:
        parser.error("--owners must be at least 1")
    from protocol.cli import run_cli

    return run_cli("simulations.local", lambda: _simulate(args), errors=(SimulationError,))


def _simulate(args: argparse.Namespace) -> int:
    """The whole local run: entity, owners, report; ``SimulationError`` for what stops it."""
    from rich.console import Console

    console = Console(stderr=True)
    work = Path("runs/demo") if args.demo and args.work == Path("runs/local") else args.work
    if work.exists():
        shutil.rmtree(work)
    started = time.monotonic()
    data = args.data or install_demo_data(work / "private")
    if not data.is_dir():
        raise SimulationError(f"data folder {data} does not exist; pass --data DIR or leave it out for the embedded subset")
    epochs = args.epochs if args.epochs is not None else (2 if args.demo else None)
    # The embedded subset has 6,000 training images: smaller batches give retraining enough steps.
    extra = {"batch_size": 64} if args.demo else {}
    # The demo trades some synthetic-image quality for a run of about three minutes on 2 cores.
    synthetic = {
        "synthetic_images": args.synthetic_images or (64 if args.demo else None),
        "synthetic_steps": args.synthetic_steps or (50 if args.demo else None),
    }
    deployment = LocalDeployment(work, recipe=args.recipe, entity_options={k: v for k, v in synthetic.items() if v})
    plans = [OwnerPlan(f"owner-{i + 1}", data, rate=args.rate, epochs=epochs, extra=extra) for i in range(args.owners)]
    for plan in plans:
        deployment.prepare_owner(plan)
    runs: list[OwnerRun] = []
    try:
        with console.status("starting the entity (SuperLink + ServerApp)..."):
            deployment.start_entity()
        console.print(f"entity serving on 127.0.0.1:{deployment.port}")
        with console.status(f"running {len(plans)} owner(s): export, prune at the entity, retrain locally..."):
            runs = deployment.run_owners(plans, parallel=args.parallel, timeout=args.timeout)
    finally:
        left = deployment.stop()
        if left:
            console.print(f"[red]processes left behind and killed: {left}[/]")
    _print_report(runs, deployment, time.monotonic() - started, console)
    return 0 if runs and all(r.returncode == 0 for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
