"""The entity as a service under load: 1, 2, 4 and 8 owners at once on the demo model.

    python -m benchmarks.service_load [--owners 1,2,4,8] [--recipe oneshot] [--out benchmarks/results]

For each N a fresh entity (``entity.serve`` with its default worker pool, one worker per core)
and N owners (``owner.run``) started at the same moment, all real processes on 127.0.0.1
(``simulations.local``). The owners retrain for 0 epochs, so an owner's run is export, the
exchange and the final save: what is measured is the entity's service, not the owners' compute.
The recipe is ``oneshot`` by default (magnitude projection, well under a second of pruning on
the demo model): with the default recipe each job's data-free pruning takes minutes on 2 cores
and the figures would measure the pruning engine (``benchmarks.paper_table`` does that), not
the queue, the messages, the sandbox start and the sealing.

Per N: wall time (first owner started -> last owner exited), throughput (jobs per minute over
that wall time), per job the queue wait, pruning and service time, the entity's peak RSS
(entity.serve plus every descendant: SuperLink, SuperExec, ServerApp, pruning children; the sum
of ``VmRSS`` sampled every 0.2 s from /proc), failures (owners that did not exit 0, or whose
audit log does not verify) and the time to first offer for every owner.

Times come from watching the files as they grow, every 0.1 s (the logs' own time stamps have
one-second resolution): the entity's ``HOME/events.jsonl`` (``offered``, ``hello``, ``admitted``,
``queued``, the first ``pruning`` event, ``pruned``, ``delivered``, ``finished``) and each owner's
``OUT/supernode.log`` (created when its SuperNode starts) and ``OUT/audit.jsonl``
(``offer.received``). Queue wait: ``queued`` -> first ``pruning`` event (it includes the start
of the job's sandboxed pruning process); pruning: first ``pruning`` -> ``pruned``; service time:
``admitted`` -> ``delivered`` (the request stored, queued, pruned, sealed and acknowledged).
Time to first offer is measured two ways: from the owner's SuperNode start (its log file appears)
to its ``offer.received`` audit record (the target, under 5 s: that is the service's part), and
from the owner process's start (it exports its model and loads its data first).

Writes ``service_load.json`` and ``service_load.md`` under ``--out``, with the load average
(a machine shared with other work makes every figure slower; the report says so).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol.flower_processes import descendants
from simulations.local import LocalDeployment, OwnerPlan, audit_verdict, install_demo_data

ROOT = Path(__file__).resolve().parents[1]
FIRST_OFFER_TARGET_S = 5.0
LOADED = 3.0  # a 1-minute load average above this (on 2 cores) marks the figures as from a loaded machine
EVENTS = ("offered", "hello", "admitted", "queued", "pruning", "pruned", "delivered", "finished")


def tree_rss(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants, in bytes (0 for a process gone)."""
    total = 0
    for member in [pid, *descendants(pid)]:
        try:
            with open(f"/proc/{member}/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except (OSError, ValueError):
            continue
    return total


def _records(path: Path) -> list[dict]:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line being written
        if isinstance(record, dict):
            out.append(record)
    return out


@dataclass
class Watch:
    """What a watcher thread saw, stamped with ``time.time()`` when it first saw it."""

    events: dict[tuple[str, str], float] = field(default_factory=dict)  # (event, job_id) -> first seen
    node_started: dict[str, float] = field(default_factory=dict)  # owner -> its supernode.log appeared
    offer_received: dict[str, tuple[str, float]] = field(default_factory=dict)  # owner -> (job id, seen)
    positions: dict[str, int] = field(default_factory=dict)  # job id -> its queue position when queued
    peak_rss: int = 0
    peak_load: float = 0.0


class Watcher(threading.Thread):
    """Polls the entity's event log, the owners' output folders, the entity tree's RSS and the load."""

    def __init__(self, dep: LocalDeployment, owners: list[str], interval: float = 0.1):
        super().__init__(daemon=True)
        self.dep, self.owners, self.interval = dep, owners, interval
        self.seen = Watch()
        self._halt = threading.Event()
        self._lines = 0

    def run(self) -> None:
        tick = 0
        while not self._halt.is_set():
            self.poll(rss=tick % 2 == 0)
            tick += 1
            self._halt.wait(self.interval)
        self.poll(rss=False)

    def poll(self, rss: bool = True) -> None:
        now = time.time()
        records = _records(self.dep.events)
        for record in records[self._lines :]:
            key = (str(record.get("event")), str(record.get("job_id", "")))
            self.seen.events.setdefault(key, now)
            if key[0] == "queued" and isinstance(record.get("position"), int):
                self.seen.positions.setdefault(key[1], record["position"])
        self._lines = len(records)
        for name in self.owners:
            out = self.dep.work / name / "out"
            if name not in self.seen.node_started and (out / "supernode.log").exists():
                self.seen.node_started[name] = now
            if name not in self.seen.offer_received:
                for record in _records(out / "audit.jsonl"):
                    if record.get("event") == "offer.received":
                        self.seen.offer_received[name] = (str(record.get("details", {}).get("job_id")), now)
                        break
        if rss and self.dep.entity is not None:
            self.seen.peak_rss = max(self.seen.peak_rss, tree_rss(self.dep.entity.pid))
        self.seen.peak_load = max(self.seen.peak_load, os.getloadavg()[0])

    def stop(self) -> Watch:
        self._halt.set()
        self.join(timeout=10)
        return self.seen


def _span(seen: Watch, job: str, start: str, end: str) -> float | None:
    a, b = seen.events.get((start, job)), seen.events.get((end, job))
    return None if a is None or b is None else round(b - a, 2)


def measure(n: int, work: Path, data: Path, recipe: str, timeout: float) -> dict[str, Any]:
    """One round: a fresh entity, ``n`` owners at once; every figure of that round."""
    dep = LocalDeployment(work / f"n{n}", recipe=recipe)
    plans = [OwnerPlan(f"owner-{i + 1}", data, epochs=0) for i in range(n)]
    for plan in plans:
        dep.prepare_owner(plan)
    load_before = os.getloadavg()
    watcher = Watcher(dep, [p.name for p in plans])
    dep.start_entity()
    watcher.start()
    try:
        started = time.time()
        procs = [(plan, dep.start_owner(plan), time.time(), time.monotonic()) for plan in plans]
        runs = [dep.finish_owner(plan, proc, mono, timeout) for plan, proc, _, mono in procs]
        wall = time.time() - started
    finally:
        left = dep.stop()
        seen = watcher.stop()
    owners = []
    for (plan, _, t0, _), run in zip(procs, runs, strict=True):
        verdict = audit_verdict(dep, run) if run.returncode == 0 else "not checked (the run failed)"
        job, offer_seen = seen.offer_received.get(plan.name, ("", None))
        node = seen.node_started.get(plan.name)
        offered = seen.events.get(("offered", job))
        owners.append(
            {
                "owner": plan.name,
                "returncode": run.returncode,
                "error": run.error,
                "seconds": round(run.seconds, 2),
                "job_id": (run.summary or {}).get("job_id", job),
                "audit": verdict,
                "first_offer_from_supernode_s": None if offer_seen is None or node is None else round(offer_seen - node, 2),
                "first_offer_from_start_s": None if offer_seen is None else round(offer_seen - t0, 2),
                "supernode_to_entity_offered_s": None if offered is None or node is None else round(offered - node, 2),
                "entity_offered_to_owner_s": None if offered is None or offer_seen is None else round(offer_seen - offered, 2),
            }
        )
    jobs = []
    for owner in owners:
        job = owner["job_id"]
        jobs.append(
            {
                "job_id": job,
                "owner": owner["owner"],
                "queue_position": seen.positions.get(job),
                "queue_wait_s": _span(seen, job, "queued", "pruning"),
                "pruning_s": _span(seen, job, "pruning", "pruned"),
                "service_s": _span(seen, job, "admitted", "delivered"),
                "offered_to_finished_s": _span(seen, job, "offered", "finished"),
            }
        )
    failures = [o for o in owners if o["returncode"] != 0 or not str(o["audit"]).startswith("verifies")]
    first = [o["first_offer_from_supernode_s"] for o in owners]
    return {
        "owners": n,
        "wall_s": round(wall, 2),
        "jobs_per_minute": round(60 * (n - len(failures)) / wall, 2),
        "entity_peak_rss_mib": round(seen.peak_rss / 2**20, 1),
        "failures": len(failures),
        "first_offer_max_s": max((f for f in first if f is not None), default=None),
        "first_offer_all_under_target": all(f is not None and f < FIRST_OFFER_TARGET_S for f in first),
        "load_before": [round(x, 2) for x in load_before],
        "load_peak_1min": round(seen.peak_load, 2),
        "processes_left": left,
        "per_owner": owners,
        "per_job": jobs,
    }


def _stats(values: list[float | None]) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "-"
    return f"{statistics.median(present):.1f} / {max(present):.1f}"


def render(result: dict[str, Any]) -> str:
    rounds = result["rounds"]
    loaded = any(r["load_before"][0] > LOADED or r["load_peak_1min"] > LOADED for r in rounds)
    lines = [
        "# Service load: N owners at once on the demo model",
        "",
        f"`{result['command']}`, {result['date']}; {result['machine']['cpu_count']} cores, {result['machine']['platform']}.",
        f"Recipe `{result['recipe']}`, owners retrain 0 epochs (the figures are the entity's service: offer, admission, queue, "
        "sandboxed pruning, sealing, delivery); entity with its default pool (one worker per core). "
        "Times watched from the files as they grow (0.1 s): queue wait is `queued` -> the job's first `pruning` event, so it includes "
        "the start of the job's sandboxed pruning process (at queue position 0 that start is all of it); pruning is first `pruning` -> "
        "`pruned`; service is `admitted` -> `delivered`; RSS is entity.serve plus all its descendants.",
        "",
    ]
    if loaded:
        lines += [
            f"**Measured on a loaded machine** (1-minute load average above {LOADED:g} on {result['machine']['cpu_count']} cores, "
            "shared with other work; see the load columns): every time below is slower than on a quiet machine.",
            "",
        ]
    lines += [
        "| owners | wall s | jobs/min | failures | entity peak RSS MiB | queue wait s (median / max) | pruning s | service s "
        "| first offer s from SuperNode start (max) | all < 5 s | load before / peak (1 min) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rounds:
        jobs = r["per_job"]
        lines.append(
            f"| {r['owners']} | {r['wall_s']:.1f} | {r['jobs_per_minute']:.2f} | {r['failures']} | {r['entity_peak_rss_mib']:.0f} "
            f"| {_stats([j['queue_wait_s'] for j in jobs])} | {_stats([j['pruning_s'] for j in jobs])} | {_stats([j['service_s'] for j in jobs])} "
            f"| {r['first_offer_max_s']} | {'yes' if r['first_offer_all_under_target'] else 'no'} "
            f"| {r['load_before'][0]:.1f} / {r['load_peak_1min']:.1f} |"
        )
    lines += [
        "",
        "Time to first offer, every owner at every N (seconds): from its SuperNode's start to its `offer.received` audit record "
        "(= SuperNode start -> the entity's `offered` event + `offered` -> the owner has it), and from the owner process's start.",
        "",
        "| owners | owner | SuperNode start -> offer | = SuperNode -> entity offered | + offered -> owner | process start -> offer "
        "| exit | audit log |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rounds:
        for o in r["per_owner"]:
            audit = o["audit"] if o["returncode"] == 0 else f"run failed: {o['error']}"
            lines.append(
                f"| {r['owners']} | {o['owner']} | {o['first_offer_from_supernode_s']} | {o['supernode_to_entity_offered_s']} "
                f"| {o['entity_offered_to_owner_s']} | {o['first_offer_from_start_s']} | {o['returncode']} | {audit} |"
            )
    lines += ["", "Per job: queue position when queued (0: a worker was free) and seconds of queue wait, pruning, service, offer to finish.", ""]
    lines += ["| owners | owner | position | queue wait | pruning | service | offered -> finished |", "|---|---|---|---|---|---|---|"]
    for r in rounds:
        for j in r["per_job"]:
            spans = (j["queue_position"], j["queue_wait_s"], j["pruning_s"], j["service_s"], j["offered_to_finished_s"])
            lines.append(f"| {r['owners']} | {j['owner']} | " + " | ".join(str(v) for v in spans) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.service_load", description=__doc__.split("\n")[0])
    parser.add_argument("--owners", default="1,2,4,8", help="comma-separated owner counts (default 1,2,4,8)")
    parser.add_argument("--recipe", default="oneshot", help="entity pruning recipe (default oneshot; see the module docstring)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "service-load", help="work folder (emptied first)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per owner (default 900)")
    args = parser.parse_args(argv)
    try:
        counts = [int(x) for x in args.owners.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--owners {args.owners!r} is not a comma-separated list of numbers")
    if not counts or min(counts) < 1:
        parser.error("--owners needs counts of at least 1")
    from protocol.cli import run_cli
    from simulations.local import SimulationError

    return run_cli("benchmarks.service_load", lambda: _run(args, counts), errors=(SimulationError,))


def _run(args: argparse.Namespace, counts: list[int]) -> int:
    import shutil
    import sys

    shutil.rmtree(args.work, ignore_errors=True)
    data = install_demo_data(args.work / "private")
    rounds = []
    for n in counts:
        print(f"service_load: {n} owner(s)...", file=sys.stderr)
        rounds.append(measure(n, args.work, data, args.recipe, args.timeout))
        r = rounds[-1]
        print(f"  wall {r['wall_s']} s, {r['jobs_per_minute']} jobs/min, {r['failures']} failures", file=sys.stderr)
    result = {
        "command": " ".join(["python -m benchmarks.service_load", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "recipe": args.recipe,
        "owner_epochs": 0,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count()},
        "rounds": rounds,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "service_load.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "service_load.md").write_text(render(result))
    print(f"service_load: wrote {args.out / 'service_load.md'}", file=sys.stderr)
    return 0 if all(r["failures"] == 0 and not r["processes_left"] for r in rounds) else 1


if __name__ == "__main__":
    raise SystemExit(main())
