"""Real processes on 127.0.0.1: entity.serve, owners one after the other, refusal, clean shutdown."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from simulations.local import LocalDeployment, OwnerPlan, install_demo_data

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    work = tmp_path_factory.mktemp("local")
    dep = LocalDeployment(work, recipe="oneshot", start_timeout=120)
    dep.start_entity()
    yield dep
    left = dep.stop()
    assert left == [], f"entity.serve left processes behind: {left}"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return install_demo_data(tmp_path_factory.mktemp("private"))


def _plan(name: str, data: Path, **kw) -> OwnerPlan:
    return OwnerPlan(name, data, epochs=1, train_limit=3000, extra={"batch_size": 64}, **kw)


def test_two_owners_one_after_the_other_against_one_entity(deployment, data):
    from protocol.artifact import load_model_dir
    from protocol.audit import verify_log
    from protocol.keys import load_card

    runs = deployment.run_owners([_plan("owner-a", data), _plan("owner-b", data, rate=4.0)], timeout=400)
    for run in runs:
        assert run.returncode == 0, f"{run.name}: {run.error}"
        summary = run.summary
        assert summary["accuracy"]["dense"] > 0.8  # the shipped pre-trained model
        # One short masked epoch must recover most of what pruning cost.
        assert summary["accuracy"]["retrained"] > max(0.6, summary["accuracy"]["pruned"] + 0.1)
        assert summary["ignored_fabs"], "the entity's FAB should have been received and ignored"
        assert summary["bytes_sent"] > 0 and summary["bytes_received"] > 0
        program, masks = load_model_dir(Path(summary["final_model"]))
        state = program.state_dict
        assert masks, "the final model keeps its masks"
        for name, mask in masks.items():
            assert torch.count_nonzero(state[name][~mask]) == 0, f"{name} lost its zeros"
        owner_card = load_card(deployment.work / run.name / "keys" / "card.json")
        verdict = verify_log(Path(summary["audit_log"]), owner=owner_card, entity=load_card(deployment.entity_card))
        assert verdict.ok, verdict
    rates = [float(r.summary["achieved_rate"]) for r in runs]
    assert rates[0] == pytest.approx(8.0, rel=0.02) and rates[1] == pytest.approx(4.0, rel=0.02)
    finished = [e for e in deployment.entity_events() if e["event"] == "finished"]
    assert len(finished) >= 2


def test_unregistered_owner_is_refused_on_both_sides(deployment, data):
    run = deployment.run_owner(_plan("stranger", data, registered=False), timeout=300)
    assert run.returncode == 1
    assert "not registered" in run.error or "admission" in run.error.lower() or "unknown sender" in run.error, run.error
    refused = [e for e in deployment.entity_events() if e["event"] == "refused"]
    assert refused, "the entity records the refusal"
    records = [json.loads(line) for line in (run.out / "audit.jsonl").read_text().splitlines()]
    assert any(r["event"] == "admission.refused" for r in records)


def test_check_sends_only_the_hello_and_prints_the_plan(deployment, data):
    import subprocess
    import sys

    folder = deployment.prepare_owner(_plan("checker", data))
    done = subprocess.run(
        [sys.executable, "-m", "owner.run", "--config", str(folder / "owner.toml"), "--check", "--quiet"],
        cwd=folder,
        env=deployment.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["check"] == "passed" and report["admitted"] is True
    pruned = [layer for layer in report["layers"] if layer["pruned"]]
    assert pruned and any(layer["why"].startswith("the stem") for layer in report["layers"])
    records = [json.loads(line) for line in (folder / "out" / "audit.jsonl").read_text().splitlines()]
    events = [r["event"] for r in records]
    assert "hello.sent" in events and "admission.received" in events and "check.finished" in events
    assert "transfer.sent" not in events  # nothing but the hello left
    assert not (folder / "out" / "job.json").exists()
    assert any(e["event"] == "checked" for e in deployment.entity_events())
