"""The owner/entity exchange without Flower: offer -> sealed request -> prune -> sealed result."""

from __future__ import annotations

import json

import pytest
import torch

from entity.jobs import EntityJobs, EntitySettings, EventLog, JobError
from owner.session import OwnerSession, SessionError
from protocol.audit import AuditLog, verify_log
from protocol.errors import AdmissionError, ProtocolError, ReplayError
from protocol.keys import init_identity
from protocol.replay import NonceStore
from protocol.spec import InputSpec, PruneRequest
from tests.helpers import export_eval, sealed_request

SPEC = InputSpec((1, 28, 28), (0.286,), (0.353,))


@pytest.fixture()
def parties(tmp_path):
    from simulations.models import small_vgg

    torch.manual_seed(0)
    entity = init_identity(tmp_path / "entity", "entity", name="entity")
    owner = init_identity(tmp_path / "owner", "owner", name="owner")
    registry = {owner.card.fingerprint: owner.card}
    jobs = EntityJobs(
        entity, lambda: registry, NonceStore(tmp_path / "nonces.jsonl"), EventLog(tmp_path / "events.jsonl"), EntitySettings(recipe="oneshot")
    )
    program = export_eval(small_vgg())
    audit = AuditLog.open(tmp_path / "audit.jsonl", owner)
    session = OwnerSession(owner, entity.card, program, SPEC, PruneRequest(8.0), audit)
    return jobs, session, registry, tmp_path


def test_exchange_delivers_masked_weights_at_the_requested_rate(parties):
    jobs, session, _, tmp_path = parties
    offer = jobs.make_offer(node_id=1)
    request = sealed_request(session, jobs, offer, session.entity_card.to_bytes())
    opened = jobs.open_request(offer, request)
    result, summary = jobs.prune(offer, opened, request, checkpoint=session.sent_checkpoint)
    assert summary["bytes_sent"] == len(result)
    session.receive_result(result)
    outcome = session.outcome
    assert outcome is not None and outcome.report["recipe"] == "oneshot"
    assert outcome.report["achieved_rate"].startswith("8.0")
    for name, mask in outcome.masks.items():
        assert torch.count_nonzero(outcome.state_dict[name][~mask]) == 0
    session.audit.close()
    verdict = verify_log(tmp_path / "audit.jsonl", owner=session.identity.card, entity=session.entity_card)
    assert verdict.ok, verdict
    # The countersigned checkpoint covers the record of the request that was sent.
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    sent = next(r["seq"] for r in records if r["event"] == "transfer.sent")
    assert verdict.countersigned > sent


def test_training_step_counters_leave_as_zeros(parties):
    from protocol.artifact import load_tensors
    from simulations.models import small_vgg

    _, session, _, _ = parties
    model = small_vgg()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.num_batches_tracked.fill_(1876)  # what training on 60,000 images leaves
    trained = OwnerSession(session.identity, session.entity_card, export_eval(model), SPEC, PruneRequest(8.0), session.audit)
    counters = [k for k in trained.program.state_dict if k.endswith("num_batches_tracked")]
    assert counters and all(int(trained.program.state_dict[k]) == 1876 for k in counters)
    sent = load_tensors(trained._artifact["weights.safetensors"])
    assert all(int(sent[k]) == 0 for k in counters)


def test_replayed_request_is_refused(parties):
    jobs, session, _, _ = parties
    offer = jobs.make_offer(node_id=1)
    request = sealed_request(session, jobs, offer)
    jobs.open_request(offer, request)
    with pytest.raises(ReplayError):
        jobs.open_request(offer, request)


def test_request_for_another_offer_is_refused(parties):
    jobs, session, _, _ = parties
    first, second = jobs.make_offer(node_id=1), jobs.make_offer(node_id=2)
    request = sealed_request(session, jobs, first)
    with pytest.raises((ProtocolError, JobError)):
        jobs.open_request(second, request)


def test_unregistered_owner_is_refused_at_its_hello_before_its_model_is_sealed(parties):
    jobs, session, registry, _ = parties
    registry.clear()
    offer = jobs.make_offer(node_id=1)
    hello = session.answer_offer(offer.blob, None)
    with pytest.raises(AdmissionError, match="protocol.keys register"):
        jobs.check_hello(offer, hello, session.identity.fingerprint)
    assert session.request_blob is None


def test_hello_for_another_offer_or_signed_by_another_owner_is_refused(parties, tmp_path):
    jobs, session, registry, _ = parties
    first, second = jobs.make_offer(node_id=1), jobs.make_offer(node_id=2)
    hello = session.answer_offer(first.blob, None)
    with pytest.raises(JobError, match="does not answer the offer"):
        jobs.check_hello(second, hello, session.identity.fingerprint)
    other = init_identity(tmp_path / "other", "owner", name="other")
    registry[other.card.fingerprint] = other.card
    with pytest.raises(ProtocolError):
        jobs.check_hello(first, hello, other.card.fingerprint)


def test_offer_signed_by_another_entity_is_refused(parties, tmp_path):
    jobs, session, _, _ = parties
    impostor = init_identity(tmp_path / "impostor", "entity", name="impostor")
    jobs.identity = impostor
    offer = jobs.make_offer(node_id=1)
    with pytest.raises(SessionError, match="verification|card"):
        session.answer_offer(offer.blob, impostor.card.to_bytes())


def test_tampered_result_is_refused_and_second_result_too(parties):
    jobs, session, _, _ = parties
    offer = jobs.make_offer(node_id=1)
    request = sealed_request(session, jobs, offer)
    result, _ = jobs.prune(offer, jobs.open_request(offer, request), request)
    tampered = bytearray(result)
    tampered[-10] ^= 1
    with pytest.raises(SessionError, match="verification"):
        session.receive_result(bytes(tampered))
    session.receive_result(result)
    with pytest.raises(SessionError, match="second result"):
        session.receive_result(result)


def test_restarted_owner_refuses_an_offer_it_already_answered(parties, tmp_path):
    from protocol.replay import NonceStore

    jobs, session, _, _ = parties
    offer = jobs.make_offer(node_id=1)
    store = tmp_path / "seen.jsonl"
    session.nonces = NonceStore(store)
    session.answer_offer(offer.blob, None)
    restarted = OwnerSession(session.identity, session.entity_card, session.program, SPEC, PruneRequest(8.0), session.audit, nonces=NonceStore(store))
    with pytest.raises(SessionError, match="replay"):
        restarted.answer_offer(offer.blob, None)


def test_program_that_leaves_carries_no_trace_of_the_owners_code(parties):
    _, session, _, _ = parties
    graph = session._artifact["program.json"].decode()
    assert "stack_trace" not in graph and "nn_module_stack" not in graph and "simulations" not in graph


def test_default_recipe_runs_through_the_job_with_progress_events(parties):
    """The engine's default recipe (not just one-shot) behind the job interface, events logged."""
    from entity.pruning import PruneConfig

    jobs, session, _, tmp_path = parties
    jobs.settings = EntitySettings(synthetic_images=32, synthetic_steps=5)
    events = []
    offer = jobs.make_offer(node_id=1)
    request = sealed_request(session, jobs, offer)
    result, summary = jobs.prune(
        offer, jobs.open_request(offer, request), request, lambda e: jobs.events.write("pruning", {**e, "phase": e.get("event")}) or events.append(e)
    )
    assert summary["recipe"] == PruneConfig.__dataclass_fields__["recipe"].default
    assert events and all("event" in e for e in events)
    logged = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert any(rec["event"] == "pruning" and rec.get("phase") == "done" for rec in logged)
    session.receive_result(result)


def test_operator_settings_reach_the_pruning_process(parties, monkeypatch):
    """The entity's settings decide the engine config and the sandbox limits of the child process."""
    import entity.jobs
    from entity.sandbox import GiB, PruningRefused, SandboxLimits

    jobs, session, _, _ = parties
    jobs.settings = EntitySettings(
        recipe="admm",
        synthetic_images=16,
        prune_memory_gib=3,
        prune_timeout=90,
        recipe_options={"admm": {"admm_iters": 5}, "refit": {"damping": 0.1}},
    )
    seen: dict = {}

    def no_child(files, spec_json, config, progress, limits, on_confined=None, torch_threads=None):
        seen.update(config=config, limits=limits)
        raise PruningRefused("stopped before a child was started")

    monkeypatch.setattr(entity.jobs, "run_pruning", no_child)
    offer = jobs.make_offer(node_id=1)
    request = sealed_request(session, jobs, offer)
    with pytest.raises(JobError, match="stopped before"):
        jobs.prune(offer, jobs.open_request(offer, request), request)
    assert seen["limits"] == SandboxLimits(memory_bytes=3 * GiB, seconds=90)
    assert seen["config"]["recipe"] == "admm" and seen["config"]["synthetic_images"] == 16
    assert seen["config"]["options"] == {"admm_iters": 5}  # only the running recipe's options
