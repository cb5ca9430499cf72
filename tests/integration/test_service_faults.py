"""Faults with real processes: the service holds, and an owner that resumes loses nothing.

The two faults that matter most (issue 10; the whole table is ``benchmarks/service_faults.py``):

* the entity killed with SIGKILL while a job prunes: the owner says in one line that the entity
  is gone and how to resume; the entity restarted with the same ``--home`` prunes the job again
  from its journal, and ``owner.run --resume OUT`` collects the result without sending its model
  again;
* the owner interrupted (SIGINT, as Ctrl-C) during retraining: ``--resume OUT`` goes on from the
  epoch checkpoint without the entity (it is stopped by then), and the audit log shows the
  interruption, the resumption and a single transfer of the model.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from simulations.local import LocalDeployment, OwnerPlan, install_demo_data

pytestmark = pytest.mark.integration

STALL_TIMEOUT = 15.0


def _plan(data: Path, **extra: object) -> OwnerPlan:
    return OwnerPlan("owner", data, epochs=2, train_limit=2000, extra={"batch_size": 64, "stall_timeout": STALL_TIMEOUT, **extra})


def _audit_events(out: Path) -> list[str]:
    return [json.loads(line)["event"] for line in (out / "audit.jsonl").read_text().splitlines() if line.strip()]


def _verify(dep: LocalDeployment, out: Path) -> None:
    from protocol.audit import verify_log
    from protocol.keys import load_card

    verdict = verify_log(out / "audit.jsonl", owner=load_card(dep.work / "owner" / "keys" / "card.json"), entity=load_card(dep.entity_card))
    assert verdict.ok, verdict


def _failure(dep: LocalDeployment) -> str:
    """The owner's one-line error, as it wrote it to OUT/failure.json."""
    return json.loads((dep.work / "owner" / "out" / "failure.json").read_text())["error"]


def _restart_and_resume(dep: LocalDeployment, plan: OwnerPlan, job: str, timeout: float):
    """Restart the entity with the same home (its journal holds the job), then ``owner.run --resume``."""
    dep.start_entity()
    dep.wait_event("recovered", timeout=30, job_id=job)
    return dep.resume(plan, timeout=timeout)


def _wait_stage(out: Path, stage: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = json.loads((out / "job.json").read_text())
        except (OSError, ValueError):
            state = {}
        if state.get("stage") == stage:
            return state
        time.sleep(0.1)
    raise AssertionError(f"the owner's job did not reach stage {stage!r} within {timeout:.0f} s")


def test_entity_killed_while_pruning_then_restarted_and_owner_resume_gets_the_result(tmp_path: Path) -> None:
    dep = LocalDeployment(tmp_path / "work", recipe="oneshot")
    data = install_demo_data(tmp_path / "private")
    plan = _plan(data)
    owner = None
    try:
        dep.start_entity()
        owner = dep.start_owner(plan)
        queued = dep.wait_event("queued", timeout=180)
        job = queued["job_id"]
        dep.kill_entity(signal.SIGKILL)
        killed = time.monotonic()
        events = [e["event"] for e in dep.entity_events() if e.get("job_id") == job]
        assert "pruned" not in events, f"the job was pruned before the kill; nothing was cut short: {events}"
        # The owner notices on its own, within its stall timeout, and says how to go on.
        assert owner.wait(timeout=STALL_TIMEOUT + 60) == 1
        noticed = time.monotonic() - killed
        error = _failure(dep)
        assert "--resume" in error, error
        assert noticed < STALL_TIMEOUT + 30, f"the owner took {noticed:.0f} s to notice"
        state = json.loads((dep.work / "owner" / "out" / "job.json").read_text())
        assert state["job_id"] == job and state["stage"] == "requested"

        run = _restart_and_resume(dep, plan, job, timeout=300)
    finally:
        dep.kill_owner(owner)
        left = dep.stop()
    assert run.returncode == 0, run.error
    assert left == []
    assert run.summary is not None and run.summary["job_id"] == job
    assert float(run.summary["achieved_rate"]) == pytest.approx(8.0, rel=0.02)
    audit = _audit_events(run.out)
    assert audit.count("transfer.sent") == 1, "the model crossed once: the restarted entity pruned its stored request"
    assert audit.count("transfer.received") == 1
    assert "job.resumed" in audit
    _verify(dep, run.out)
    job_events = [e["event"] for e in dep.entity_events() if e.get("job_id") == job]
    assert job_events.count("admitted") == 1
    assert "resumed" in job_events and "delivered" in job_events


def test_owner_interrupted_during_retraining_resumes_from_its_epoch_checkpoint_without_the_entity(tmp_path: Path) -> None:
    from owner.job_state import CHECKPOINT_FILE, load_checkpoint, save_checkpoint

    # The owner takes Ctrl-C as in a terminal even when the suite runs in the background (a shell
    # then ignores SIGINT for it, and an ignored signal stays ignored in every child).
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    dep = LocalDeployment(tmp_path / "work", recipe="oneshot")
    data = install_demo_data(tmp_path / "private")
    plan = _plan(data)
    out = dep.work / "owner" / "out"
    owner = None
    try:
        dep.start_entity()
        owner = dep.start_owner(plan)
        state = _wait_stage(out, "retraining", timeout=300)
        assert state["epoch"] == 1
        os.killpg(owner.pid, signal.SIGINT)  # what Ctrl-C in its terminal sends
        assert owner.wait(timeout=60) == 1, "the run was interrupted during its second epoch"
        error = json.loads((out / "failure.json").read_text())["error"]
        assert "interrupted" in error and "--resume" in error, error
        # From here on the entity is gone: the resumed run must need nothing from it.
        assert dep.stop() == []
        # Mark epoch 1's recorded loss, so that the summary shows whether epoch 1 was kept or run again.
        checkpoint = load_checkpoint(out)
        assert checkpoint is not None and checkpoint["epoch"] == 1
        marked = {**checkpoint["evaluated"][0], "loss": 123.0}
        save_checkpoint(out, {**checkpoint, "evaluated": [marked]})
        run = dep.resume(plan, timeout=300)
    finally:
        dep.kill_owner(owner)
        dep.stop()
    assert run.returncode == 0, run.error
    assert run.summary is not None
    history = run.summary["history"]
    assert [h["epoch"] for h in history] == [1, 2] and history[0] == marked, history
    assert not (out / CHECKPOINT_FILE).exists()
    audit = _audit_events(out)
    interrupted, resumed_at = audit.index("job.interrupted"), audit.index("job.resumed")
    assert interrupted < resumed_at
    assert audit.count("transfer.sent") == 1 and audit.count("transfer.received") == 1 and audit.count("offer.received") == 1
    assert audit[resumed_at:].count("hello.sent") == 0, "the resumed run did not contact the entity"
    _verify(dep, out)
    state = json.loads((out / "job.json").read_text())
    assert state["stage"] == "finished"


def test_entity_killed_right_after_the_owner_acknowledged_the_result_loses_nothing(tmp_path: Path) -> None:
    """Once acknowledged, the entity deletes its copy: the owner must have kept the result by then,
    and a finish that never comes must not turn the delivered job into a failure."""
    dep = LocalDeployment(tmp_path / "work", recipe="oneshot")
    data = install_demo_data(tmp_path / "private")
    plan = _plan(data, epochs=1)
    out = dep.work / "owner" / "out"
    owner = None
    try:
        dep.start_entity()
        owner = dep.start_owner(plan)
        delivered = dep.wait_event("delivered", timeout=300)
        dep.kill_entity(signal.SIGKILL)  # the SuperLink goes with it: the finish is never pulled
        code = owner.wait(timeout=300)
    finally:
        dep.kill_owner(owner)
        left = dep.stop()
    assert code == 0, (out / "failure.json").read_text() if (out / "failure.json").exists() else "no failure.json"
    assert left == []
    summary = json.loads((out / "summary.json").read_text())
    assert summary["job_id"] == delivered["job_id"]
    assert (out / "received" / "weights.safetensors").is_file()
    audit = _audit_events(out)
    assert audit.count("transfer.received") == 1 and "retrain.finished" in audit
    _verify(dep, out)


def test_entity_stopped_by_its_operator_tells_the_owner_at_once_and_the_job_resumes(tmp_path: Path) -> None:
    """SIGTERM (or Ctrl-C) of entity.serve: the owner hears a signed 'stopping' status, not silence."""
    dep = LocalDeployment(tmp_path / "work", recipe="oneshot", entity_options={"synthetic_images": 16, "synthetic_steps": 10})
    data = install_demo_data(tmp_path / "private")
    plan = _plan(data, recipe="refit", stall_timeout=120.0)  # silence alone would take two minutes to notice
    owner = None
    try:
        dep.start_entity()
        owner = dep.start_owner(plan)
        job = dep.wait_event("pruning", timeout=240)["job_id"]
        assert dep.kill_entity(signal.SIGTERM) == 0
        stopped = time.monotonic()
        assert owner.wait(timeout=60) == 1
        noticed = time.monotonic() - stopped
        error = _failure(dep)
        assert "shutting down" in error and "--resume" in error and job in error, error
        assert noticed < 30, f"the owner took {noticed:.0f} s to hear that the entity stops"
        told = [e for e in dep.entity_events() if e["event"] in ("stopping", "stopped")]
        assert [e["event"] for e in told] == ["stopping", "stopped"] and told[0]["told"] == 1, told
        run = _restart_and_resume(dep, plan, job, timeout=400)
    finally:
        dep.kill_owner(owner)
        left = dep.stop()
    assert run.returncode == 0, run.error
    assert left == []
    audit = _audit_events(run.out)
    assert audit.count("transfer.sent") == 1 and "job.resumed" in audit
    _verify(dep, run.out)
