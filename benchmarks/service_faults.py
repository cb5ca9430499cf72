"""The fault table: each fault of issue 10 with real processes, what the user sees, and what was lost.

    python -m benchmarks.service_faults [--only NAME,...] [--stall-timeout 20] [--out benchmarks/results]

Every scenario starts a fresh entity (``entity.serve``) and owner(s) (``owner.run``, 2 epochs of
masked retraining on 2,000 images, so that there is a retraining to interrupt) on 127.0.0.1
through ``simulations.local``, injects one fault at a moment read from the entity's event log or
the owner's ``OUT/job.json``, and records:

* what the user sees: the owner's last line (``owner.run`` prints its one-line error on stderr),
  and how long after the fault it appeared (the owner's exit);
* the recovery a user would do: restart the entity with the same ``--home`` where it went down,
  free the disk where it filled, then ``owner.run --resume OUT``; whether that finishes the job;
* that nothing was lost: the owner's audit log verifies (``protocol.audit.verify_log`` against
  both pinned cards, as ``owner.audit verify``), the finished outputs are intact (``summary.json``
  for the job in ``job.json``, ``final/`` loads with its masks, the masked weights still zero), the
  model crossed once (``transfer.sent`` records), the entity's event log leaves no job open, and
  no process of the scenario is left behind.

The owners run with ``--stall-timeout`` (default here 20 s; the product's default is 60 s) so that
an entity that went silent is noticed within the table's time; ``--timeout`` is 300 s. Pruning
is ``oneshot`` (under a second), except where a fault must land during pruning or while a job
waits behind another: that owner asks for ``refit`` with a small synthetic set, which prunes for
tens of seconds on the demo model.

Writes ``service_faults.md`` and ``service_faults.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from protocol.flower_processes import descendants
from simulations.local import LocalDeployment, OwnerPlan, OwnerRun, SimulationError, audit_verdict, install_demo_data

ROOT = Path(__file__).resolve().parents[1]
SLOW = {"recipe": "refit"}  # an owner whose pruning lasts long enough to be hit (with ENTITY_OPTIONS)
ENTITY_OPTIONS = {"synthetic_images": 16, "synthetic_steps": 10}


@dataclass
class Row:
    scenario: str
    fault: str
    user_sees: str = ""
    seconds_to_see: float | None = None
    recovery: str = ""
    recovered: bool = False
    checks: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Context:
    work: Path
    data: Path
    stall_timeout: float

    def plan(self, name: str = "owner", **extra: Any) -> OwnerPlan:
        settings = {"batch_size": 64, "stall_timeout": self.stall_timeout, "timeout": 300.0, **extra}
        return OwnerPlan(name, self.data, epochs=2, train_limit=2000, extra=settings)

    def deployment(self, name: str, **options: Any) -> LocalDeployment:
        return LocalDeployment(self.work / name, recipe="oneshot", entity_options={**ENTITY_OPTIONS, **options})


# ------------------------------------------------------------------------------------ helpers


def _log_size(dep: LocalDeployment, plan: OwnerPlan) -> int:
    try:
        return (dep.work / plan.name / "owner.log").stat().st_size
    except OSError:
        return 0


def last_line(dep: LocalDeployment, plan: OwnerPlan, since: int = 0) -> str:
    """The owner's last line after byte ``since`` of its log (stdout's JSON summary pointer aside)."""
    try:
        with open(dep.work / plan.name / "owner.log", "rb") as handle:
            handle.seek(since)
            text = handle.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith('{"summary"')]
    return lines[-1] if lines else ""


def wait_exit(proc: subprocess.Popen, timeout: float) -> float | None:
    """Seconds until ``proc`` exits, or None if it is still running after ``timeout``."""
    started = time.monotonic()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    return round(time.monotonic() - started, 1)


def wait_stage(dep: LocalDeployment, plan: OwnerPlan, stage: str, timeout: float) -> dict:
    path = dep.work / plan.name / "out" / "job.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = json.loads(path.read_text())
            if state.get("stage") == stage:
                return state
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise SimulationError(f"{plan.name}'s job did not reach stage {stage!r} within {timeout:.0f} s")


def leftovers(work: Path, grace: float = 10.0) -> dict[int, str]:
    """Processes (other than this one) whose command line or environment names the scenario's folder,
    still there ``grace`` seconds after the scenario stopped everything; pid -> command line."""
    marker = str(work).encode()
    deadline = time.monotonic() + grace
    while True:
        found: dict[int, str] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    cmd = handle.read()
                with open(f"/proc/{entry}/environ", "rb") as handle:
                    env = handle.read()
            except OSError:
                continue
            if marker in cmd or marker in env:
                words = cmd.decode(errors="replace").split("\0")
                if "--token" in words[:-1]:  # a Flower run's secret: not for a results file
                    words[words.index("--token") + 1] = "<redacted>"
                found[int(entry)] = " ".join(words).strip()[:160]
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def check_outputs(dep: LocalDeployment, run: OwnerRun) -> tuple[list[str], list[str]]:
    """What survived for one owner: its audit log, its final outputs, the model sent once."""
    import torch

    from protocol.artifact import load_model_dir

    good: list[str] = []
    bad: list[str] = []
    verdict = audit_verdict(dep, run)
    (good if verdict.startswith("verifies") else bad).append(f"{run.name} audit log {verdict}")
    records = [json.loads(line) for line in (run.out / "audit.jsonl").read_text().splitlines() if line.strip()]
    events = [r["event"] for r in records]
    sent = events.count("transfer.sent")
    (good if sent == 1 else bad).append(f"{run.name}: model sent {sent}x, result received {events.count('transfer.received')}x")
    noted = [e for e in events if e in ("job.interrupted", "job.failed", "job.resumed")]
    if noted:
        good.append(f"{run.name} audit records: {', '.join(noted)}")
    if run.returncode != 0 or run.summary is None:
        bad.append(f"{run.name}: no finished outputs ({run.error})")
        return good, bad
    state = json.loads((run.out / "job.json").read_text())
    if state.get("stage") != "finished" or state.get("job_id") != run.summary.get("job_id"):
        bad.append(f"{run.name}: job.json ({state.get('job_id')}, {state.get('stage')}) does not match summary.json")
    program, masks = load_model_dir(run.out / "final")
    weights = program.state_dict
    zeros = all(int(torch.count_nonzero(weights[name][~mask])) == 0 for name, mask in masks.items())
    if masks and zeros:
        good.append(f"{run.name}: final/ loads, {len(masks)} masks, masked weights zero; summary for job {run.summary['job_id']}")
    else:
        bad.append(f"{run.name}: final/ has {len(masks)} masks, masked weights zero: {zeros}")
    return good, bad


def close_out(row: Row, dep: LocalDeployment, runs: list[OwnerRun]) -> Row:
    """The checks every scenario ends with, once its processes are stopped."""
    from entity.jobs import EventLog

    row.recovered = bool(runs) and all(run.returncode == 0 for run in runs)
    for run in runs:
        good, bad = check_outputs(dep, run)
        row.checks += good
        row.problems += bad
    still_open = EventLog(dep.events).open_jobs()
    (row.problems if still_open else row.checks).append(f"entity event log: {len(still_open)} job(s) left open")
    left = leftovers(dep.work)
    (row.problems if left else row.checks).append("processes left: " + ("; ".join(f"{pid} {cmd}" for pid, cmd in left.items()) or "none"))
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return row


def resume_all(dep: LocalDeployment, plans: list[OwnerPlan], timeout: float = 400.0) -> list[OwnerRun]:
    started = time.monotonic()
    procs = [dep.resume_owner(plan) for plan in plans]
    return [dep.finish_owner(plan, proc, started, timeout) for plan, proc in zip(plans, procs, strict=True)]


@contextlib.contextmanager
def guarded(row: Row, dep: LocalDeployment, procs: list[subprocess.Popen]) -> Iterator[None]:
    """A scenario's body: a failure to reach its next step goes into the row; every process ends."""
    try:
        yield
    except SimulationError as exc:
        row.problems.append(f"scenario stopped: {exc}")
    finally:
        for proc in procs:
            LocalDeployment.kill_owner(proc)
        left = dep.stop()
        if left:
            row.problems.append(f"entity.serve left {left}")


def see(row: Row, dep: LocalDeployment, procs: list[tuple[OwnerPlan, subprocess.Popen]], bound: float, since: float | None = None) -> list[int]:
    """Wait for the owners to give up on their own (bounded); what they said and how long after ``since`` (the fault)."""
    started = time.monotonic() if since is None else since
    lines, seconds, sizes = [], [], []
    for plan, proc in procs:
        took = wait_exit(proc, max(1.0, bound - (time.monotonic() - started)))
        if took is None:
            row.problems.append(f"{plan.name} still waiting {bound:.0f} s after the fault (killed)")
            LocalDeployment.kill_owner(proc)
        else:
            seconds.append(round(time.monotonic() - started, 1))
        line = last_line(dep, plan)
        lines.append(f"{plan.name}: {line or '(nothing)'} [exit {proc.returncode}]")
        if proc.returncode is not None and proc.returncode > 0 and not line.startswith("owner.run: error:"):
            row.problems.append(f"{plan.name} ended with a traceback, not owner.run's one-line error")
        sizes.append(_log_size(dep, plan))
    row.user_sees = " / ".join(lines)
    row.seconds_to_see = max(seconds) if seconds and len(seconds) == len(procs) else None
    return sizes


# ------------------------------------------------------------------------------ entity faults


def _entity_fault(
    ctx: Context,
    name: str,
    fault: str,
    plans: list[OwnerPlan],
    wait_for: Callable[[LocalDeployment], None],
    inject: Callable[[LocalDeployment], str],
    options: dict[str, Any] | None = None,
) -> Row:
    row = Row(name, fault)
    dep = ctx.deployment(name, **(options or {}))
    procs: list[tuple[OwnerPlan, subprocess.Popen]] = []
    started: list[subprocess.Popen] = []
    runs: list[OwnerRun] = []
    with guarded(row, dep, started):
        dep.start_entity()
        for plan in plans:
            procs.append((plan, dep.start_owner(plan)))
            started.append(procs[-1][1])
            time.sleep(1.0)  # in this order at the entity
        wait_for(dep)
        fault_at = time.monotonic()
        row.checks.append(inject(dep))
        see(row, dep, procs, bound=ctx.stall_timeout + 90, since=fault_at)
        if all(proc.poll() == 0 for _, proc in procs):  # nothing to recover: the owners finished on their own
            dep.stop()
            dep.start_entity()  # the operator's restart: it closes in its event log the job the kill left open
            dep.stop()
            row.recovery = "none needed: the owner kept its verified result and finished on its own (entity restarted, same --home)"
            runs = [dep.finish_owner(plan, proc, time.monotonic(), 10) for plan, proc in procs]
            return close_out(row, dep, runs)
        if dep.entity is not None and dep.entity.poll() is None:
            row.checks.append("entity.serve was still running after the fault; stopped it (SIGTERM) before the restart")
        dep.stop()
        dep.start_entity()
        recovered = [e for e in dep.entity_events() if e.get("event") in ("recovered", "refused") and "node_id" not in e]
        row.checks.append("restart: " + (", ".join(f"{e['event']} {e.get('state', e.get('reason', ''))}" for e in recovered) or "nothing recovered"))
        row.recovery = "restart the entity (same --home), then `owner.run --resume OUT`"
        runs = resume_all(dep, plans)
        row.recovery += ": " + "; ".join(f"{r.name} exit {r.returncode} in {r.seconds:.0f} s" + (f" ({r.error})" if r.error else "") for r in runs)
    return close_out(row, dep, runs)


def _kill_entity(sig: int) -> Callable[[LocalDeployment], str]:
    def inject(dep: LocalDeployment) -> str:
        code = dep.kill_entity(sig)
        return f"entity.serve got {signal.Signals(sig).name}, exit {code}"

    return inject


def _kill_superlink(dep: LocalDeployment) -> str:
    assert dep.entity is not None
    for pid in descendants(dep.entity.pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                cmd = handle.read().split(b"\0")
        except OSError:
            continue
        if b"entity.superlink" in cmd:
            os.kill(pid, signal.SIGKILL)
            time.sleep(5.0)
            after = "still running" if dep.entity.poll() is None else f"gone (exit {dep.entity.returncode})"
            return f"SuperLink (pid {pid}) got SIGKILL; 5 s later entity.serve is {after}"
    raise SimulationError("no entity.superlink process under entity.serve")


def _event(name: str, **match: Any) -> Callable[[LocalDeployment], None]:
    def wait(dep: LocalDeployment) -> None:
        dep.wait_event(name, timeout=300, **match)

    return wait


@dataclass(frozen=True)
class EntityFault:
    fault: str
    slow_first_owner: bool  # the first owner asks for refit, so that pruning lasts
    owners: int
    wait_for: Callable[[LocalDeployment], None]
    inject: Callable[[LocalDeployment], str]
    options: dict[str, Any] = field(default_factory=dict)
    owner_settings: dict[str, Any] = field(default_factory=dict)

    def __call__(self, ctx: Context, name: str) -> Row:
        names = ["owner"] if self.owners == 1 else [f"owner-{chr(ord('a') + i)}" for i in range(self.owners)]
        plans = [ctx.plan(n, **self.owner_settings, **(SLOW if i == 0 and self.slow_first_owner else {})) for i, n in enumerate(names)]
        return _entity_fault(ctx, name, self.fault, plans, self.wait_for, self.inject, self.options)


AT_PRUNING = "at the job's first pruning progress event (refit)"
ENTITY_FAULTS = {
    "entity-kill9-queued": EntityFault(
        "entity.serve SIGKILL while one job waits behind the other (1 worker; owner-a asks for refit)",
        True,
        2,
        _event("queued", position=1),
        _kill_entity(signal.SIGKILL),
        {"workers": 1},
    ),
    "entity-kill9-pruning": EntityFault(f"entity.serve SIGKILL {AT_PRUNING}", True, 1, _event("pruning"), _kill_entity(signal.SIGKILL)),
    "entity-kill9-sending": EntityFault(
        "entity.serve SIGKILL when the job is pruned and its sealed result is being sent", False, 1, _event("pruned"), _kill_entity(signal.SIGKILL)
    ),
    "entity-kill9-delivered": EntityFault(
        "entity.serve SIGKILL once the owner has acknowledged the result, before the finish message (owner --timeout 120)",
        False,
        1,
        _event("delivered"),
        _kill_entity(signal.SIGKILL),
        owner_settings={"timeout": 120.0},
    ),
    "entity-sigterm": EntityFault(
        f"entity.serve SIGTERM (an operator stops it) {AT_PRUNING}", True, 1, _event("pruning"), _kill_entity(signal.SIGTERM)
    ),
    "superlink-kill9": EntityFault(f"the SuperLink alone gets SIGKILL {AT_PRUNING}", True, 1, _event("pruning"), _kill_superlink),
}


# ------------------------------------------------------------------------------- owner faults


def _owner_interrupted(ctx: Context, name: str, sig: int) -> Row:
    how = "SIGINT to its process group, as Ctrl-C" if sig == signal.SIGINT else "SIGKILL"
    row = Row(name, f"owner.run {how} during its second retraining epoch")
    dep = ctx.deployment(name)
    plan = ctx.plan()
    procs: list[subprocess.Popen] = []
    runs: list[OwnerRun] = []
    with guarded(row, dep, procs):
        dep.start_entity()
        proc = dep.start_owner(plan)
        procs.append(proc)
        wait_stage(dep, plan, "retraining", timeout=400)
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
        see(row, dep, [(plan, proc)], bound=60)
        if sig == signal.SIGKILL:
            row.user_sees += " (the shell shows `Killed`)"
        size = _log_size(dep, plan)
        # The entity is stopped first: a resumed retraining must need nothing from it.
        dep.stop()
        row.recovery = "`owner.run --resume OUT` with the entity stopped"
        runs = resume_all(dep, [plan])
        row.recovery += f": exit {runs[0].returncode} in {runs[0].seconds:.0f} s; last line: {last_line(dep, plan, size) or '(none: --quiet)'}"
        history = (runs[0].summary or {}).get("history", [])
        row.checks.append(f"epochs in the summary: {[h.get('epoch') for h in history]}")
    return close_out(row, dep, runs)


def owner_kill9_retraining(ctx: Context) -> Row:
    return _owner_interrupted(ctx, "owner-kill9-retraining", signal.SIGKILL)


def owner_sigint_retraining(ctx: Context) -> Row:
    return _owner_interrupted(ctx, "owner-sigint-retraining", signal.SIGINT)


def owner_before_entity(ctx: Context) -> Row:
    row = Row("owner-before-entity", "owner.run started 10 s before entity.serve")
    dep = ctx.deployment("owner-before-entity")
    plan = ctx.plan()
    runs: list[OwnerRun] = []
    procs: list[subprocess.Popen] = []
    with guarded(row, dep, procs):
        started = time.monotonic()
        proc = dep.start_owner(plan)
        procs.append(proc)
        time.sleep(10.0)
        if proc.poll() is not None:
            row.user_sees = last_line(dep, plan)
            row.problems.append(f"the owner gave up before the entity started (exit {proc.returncode})")
        dep.start_entity()
        up = time.monotonic()
        runs = [dep.finish_owner(plan, proc, started, 400)]
        offered = dep.wait_event("offered", timeout=1)
        row.user_sees = row.user_sees or f"{last_line(dep, plan) or '(nothing: --quiet; the job ran)'} [exit {runs[0].returncode}]"
        row.seconds_to_see = round(time.monotonic() - up, 1)
        row.recovery = "none needed" if runs[0].returncode == 0 else "-"
        row.checks.append(f"entity ready {up - started:.0f} s after the owner started; first offer {offered['time']}")
    return close_out(row, dep, runs)


def owner_disk_full(ctx: Context) -> Row:
    row = Row("owner-disk-full", "the owner's OUT is a 768 KiB tmpfs: the result fits, the first retraining checkpoint does not")
    dep = ctx.deployment("owner-disk-full")
    plan = ctx.plan()
    out = dep.work / plan.name / "out"
    out.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=768k,mode=0700", "tmpfs", str(out)], capture_output=True, text=True)
    if mounted.returncode != 0:
        row.problems.append(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
        return row
    runs: list[OwnerRun] = []
    procs: list[subprocess.Popen] = []
    try:
        with guarded(row, dep, procs):
            dep.start_entity()
            proc = dep.start_owner(plan)
            procs.append(proc)
            started = time.monotonic()
            see(row, dep, [(plan, proc)], bound=400)
            row.seconds_to_see = None  # the fault has no moment of its own: the disk fills when it fills
            row.checks.append(f"the owner exited {time.monotonic() - started:.0f} s after it started")
            audit = [json.loads(line)["event"] for line in (out / "audit.jsonl").read_text().splitlines() if line.strip()]
            if "job.failed" not in audit:
                row.problems.append("the audit log records no failure (no job.failed record)")
            state = json.loads((out / "job.json").read_text()) if (out / "job.json").is_file() else {}
            row.checks.append(f"job.json after the failure: stage {state.get('stage')}, received/ kept: {(out / 'received').is_dir()}")
            size = _log_size(dep, plan)
            subprocess.run(["mount", "-o", "remount,size=64m", str(out)], check=True)
            row.recovery = "grow the disk (remount 64 MiB), then `owner.run --resume OUT`"
            runs = resume_all(dep, [plan])
            row.recovery += f": exit {runs[0].returncode} in {runs[0].seconds:.0f} s; {last_line(dep, plan, size) or 'no error'}"
            if runs:
                good, bad = check_outputs(dep, runs[0])
                row.checks += good
                row.problems += bad
                runs = []  # checked here, on the tmpfs, before it goes
    finally:
        subprocess.run(["umount", str(out)], capture_output=True)
    row = close_out(row, dep, runs)
    row.recovered = not any("no finished outputs" in p for p in row.problems) and "exit 0" in row.recovery
    return row


SCENARIOS: dict[str, Callable[[Context], Row]] = {
    **{name: functools.partial(fault, name=name) for name, fault in ENTITY_FAULTS.items()},
    "owner-kill9-retraining": owner_kill9_retraining,
    "owner-sigint-retraining": owner_sigint_retraining,
    "owner-before-entity": owner_before_entity,
    "owner-disk-full": owner_disk_full,
}


def render(result: dict[str, Any]) -> str:
    def cell(text: Any) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = [
        "# Service faults: what the user sees, and what is lost",
        "",
        f"{os.cpu_count()} cores; a 1-minute load average above 3 means the machine was shared and every time is slower than on a quiet one.",
        f"Owners: 2 epochs on 2,000 images, `--stall-timeout {result['stall_timeout']:g}` (default 60), `--timeout 300`; "
        "entity recipe `oneshot` (refit with 16 synthetic images where pruning must last). Paths shortened to OUT.",
        "",
        "| run | command | date | load average at start / end |",
        "|---|---|---|---|",
        *(f"| {i} | `{r['command']}` | {r['date']} | {r['load_start']} / {r['load_end']} |" for i, r in enumerate(result["runs"])),
        "",
        "| fault | what the user sees (owner's last line) | s until seen | recovery | recovered | nothing lost? | run |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lost = "yes" if not r["problems"] else "NO: " + "; ".join(r["problems"])
        lines.append(
            f"| **{r['scenario']}**: {cell(r['fault'])} | {cell(r['user_sees'])} | {r['seconds_to_see'] if r['seconds_to_see'] is not None else '-'} "
            f"| {cell(r['recovery'])} | {'yes' if r['recovered'] else 'no'} | {cell(lost)} | {r.get('run', 0)} |"
        )
    lines += ["", "## Checks per scenario", ""]
    for r in result["rows"]:
        lines.append(f"- **{r['scenario']}** ({r['seconds']:.0f} s): " + "; ".join(cell(c) for c in r["checks"] + r["problems"]))
    return "\n".join(lines) + "\n"


def _shorten(row: Row, work: Path) -> Row:
    def short(text: str) -> str:
        text = text.replace(str(work / row.scenario) + "/", "")
        for owner in ("owner", "owner-a", "owner-b"):
            text = text.replace(f"{owner}/out", "OUT")
        return text

    row.user_sees, row.recovery = short(row.user_sees), short(row.recovery)
    row.checks, row.problems = [short(c) for c in row.checks], [short(p) for p in row.problems]
    return row


def _earlier(path: Path) -> dict[str, Any]:
    """The results an earlier run wrote (for ``--only``: its other rows are kept), or nothing."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        return {}
    if not isinstance(data.get("runs"), list):  # one run's file: its run is run 0
        data["runs"] = [{k: data.get(k) for k in ("command", "date", "load_start", "load_end")}]
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.service_faults", description=__doc__.split("\n")[0])
    parser.add_argument("--only", help=f"comma-separated scenarios (default all: {', '.join(SCENARIOS)}); their rows replace those in --out")
    parser.add_argument("--stall-timeout", type=float, default=20.0, help="the owners' --stall-timeout (default 20)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "service-faults", help="work folder (emptied first)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    names = [n.strip() for n in (args.only or ",".join(SCENARIOS)).split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
    if os.geteuid() != 0 and "owner-disk-full" in names:
        parser.error("owner-disk-full mounts a tmpfs and needs root; leave it out with --only")
    from protocol.cli import run_cli

    return run_cli("benchmarks.service_faults", lambda: _run(args, names), errors=(SimulationError,))


def _run(args: argparse.Namespace, names: list[str]) -> int:
    import shutil

    # Owners get Ctrl-C as in a terminal, even when this runs in the background (a shell then
    # ignores SIGINT for it, and an ignored signal stays ignored in every child).
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)

    work = args.work.resolve()
    for name in names:  # a rerun of some scenarios keeps the others' folders
        shutil.rmtree(work / name, ignore_errors=True)
    ctx = Context(work, install_demo_data(work / "private"), args.stall_timeout)
    load_start = [round(x, 2) for x in os.getloadavg()]
    rows = []
    for name in names:
        print(f"service_faults: {name}...", file=sys.stderr)
        started = time.monotonic()
        row = SCENARIOS[name](ctx)
        row.seconds = round(time.monotonic() - started, 1)
        rows.append(_shorten(row, work))
        print(f"  recovered: {row.recovered}; problems: {row.problems or 'none'}", file=sys.stderr)
    run = {
        "command": " ".join(["python -m benchmarks.service_faults", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "stall_timeout": args.stall_timeout,
        "load_start": load_start,
        "load_end": [round(x, 2) for x in os.getloadavg()],
        "scenarios": names,
    }
    earlier = _earlier(args.out / "service_faults.json") if args.only else {}
    kept = [r for r in earlier.get("rows", []) if r.get("scenario") not in names]
    mine = [{**asdict(r), "run": len(earlier.get("runs", []))} for r in rows]
    order = list(SCENARIOS)
    result = {
        "stall_timeout": args.stall_timeout,
        "runs": [*earlier.get("runs", []), run],
        "rows": sorted(kept + mine, key=lambda r: order.index(r["scenario"]) if r["scenario"] in order else len(order)),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "service_faults.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "service_faults.md").write_text(render(result))
    print(f"service_faults: wrote {args.out / 'service_faults.md'}", file=sys.stderr)
    return 0 if all(r.recovered and not r.problems for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
