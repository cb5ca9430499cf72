"""The owner checks the entity's result as strictly as the entity checks a request.

Each hostile result is a real result (pruned once by the engine, sealed to the owner with the
entity's identity, with a genuine receipt and countersignature for this job) with exactly one
thing changed; the owner must refuse it with a one-line ``SessionError`` naming the problem, and
record it as refused, never as received.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from entity.jobs import EntityJobs, EntitySettings, EventLog
from owner.session import OwnerSession, SessionError
from protocol import canonical
from protocol.artifact import dump_tensors
from protocol.audit import EV_REFUSED, AuditLog, countersign_checkpoint, make_receipt, read_records, verify_log
from protocol.contract import RESULT_KIND
from protocol.keys import Identity, init_identity
from protocol.masks import pack_masks
from protocol.replay import NonceStore
from protocol.sealing import seal_bundle
from protocol.signing import digest, sign_message
from protocol.spec import InputSpec, PruneRequest, RetrainLimits, RetrainRecipe
from tests.helpers import export_eval, sealed_request

SPEC = InputSpec((1, 28, 28), (0.286,), (0.353,))
CENTRE = 4


@dataclass
class Pruned:
    owner: Identity
    entity: Identity
    program: torch.export.ExportedProgram
    state: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    report: dict[str, Any]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, one_thread) -> Pruned:
    """One honest pruning of a small VGG (one-shot recipe), shared by every test."""
    from entity.pruning import PruneConfig, prune
    from simulations.models import small_vgg

    root = tmp_path_factory.mktemp("parties")
    torch.manual_seed(0)
    program = export_eval(small_vgg())
    result = prune(program, SPEC, PruneConfig(rate=8.0, recipe="oneshot", eval_images=4))
    return Pruned(
        init_identity(root / "owner", "owner", name="owner"),
        init_identity(root / "entity", "entity", name="entity"),
        program,
        result.state_dict,
        result.masks,
        dict(result.report),
    )


@dataclass
class Exchange:
    """An owner that has sent its request, and everything the entity needs to answer it."""

    session: OwnerSession
    pruned: Pruned
    receipt: bytes
    countersignature: bytes
    log: Path

    def result(self, mutate: Callable[[dict[str, Any]], None] | None = None, **raw: bytes) -> bytes:
        """The sealed result, after ``mutate`` edits its decoded parts (state, masks, report, recipe)
        and ``raw`` replaces whole files by name."""
        parts = {
            "state": {k: v.clone() for k, v in self.pruned.state.items()},
            "masks": {k: v.clone() for k, v in self.pruned.masks.items()},
            "report": {**copy.deepcopy(self.pruned.report), "job_id": self.session.job_id},
            "recipe": RetrainRecipe().to_json(),
        }
        if mutate is not None:
            mutate(parts)
        files = {
            "weights.safetensors": dump_tensors(parts["state"]),
            "masks.bin": pack_masks(parts["masks"]),
            "report.json": canonical.dumps(parts["report"]),
            "recipe.json": canonical.dumps(parts["recipe"]),
            "receipt.json": self.receipt,
            "countersignature.json": self.countersignature,
        }
        files.update({name.replace("_", "."): data for name, data in raw.items()})
        return seal_bundle(
            files,
            kind=RESULT_KIND,
            job_id=self.session.job_id,
            request_hash=digest(self.session.request_blob),
            sender=self.pruned.entity,
            recipient=self.pruned.owner.card,
        )

    def refused(self, blob: bytes, match: str) -> str:
        """Refused with a message matching ``match``; on record as refused, not received; log valid."""
        with pytest.raises(SessionError, match=match) as info:
            self.session.receive_result(blob)
        message = str(info.value)
        assert "\n" not in message and len(message) < 600
        assert self.session.outcome is None
        events = [r["event"] for r in read_records(self.log)]
        assert events[-1] == EV_REFUSED and "transfer.received" not in events
        self.session.audit.checkpoint()
        verdict = verify_log(self.log, owner=self.pruned.owner.card, entity=self.pruned.entity.card)
        assert verdict.ok, verdict
        return message


def _session(pruned: Pruned, tmp_path: Path, **kwargs: Any) -> OwnerSession:
    audit = AuditLog.open(tmp_path / "audit.jsonl", pruned.owner)
    return OwnerSession(pruned.owner, pruned.entity.card, pruned.program, SPEC, PruneRequest(8.0), audit, **kwargs)


def _exchange(pruned: Pruned, tmp_path: Path, **kwargs: Any) -> Exchange:
    tmp_path.mkdir(parents=True, exist_ok=True)
    registry = {pruned.owner.card.fingerprint: pruned.owner.card}
    jobs = EntityJobs(
        pruned.entity,
        lambda: registry,
        NonceStore(tmp_path / "entity-nonces.jsonl"),
        EventLog(tmp_path / "events.jsonl"),
        EntitySettings(recipe="oneshot"),
    )
    session = _session(pruned, tmp_path, **kwargs)
    offer = jobs.make_offer(node_id=1)
    request = sealed_request(session, jobs, offer)
    opened = jobs.open_request(offer, request)
    receipt = make_receipt(opened, entity=pruned.entity, job_id=offer.job_id)
    counter = countersign_checkpoint(session.sent_checkpoint, owner=opened.sender, entity=pruned.entity)
    return Exchange(session, pruned, receipt, counter, tmp_path / "audit.jsonl")


@pytest.fixture()
def exchange(pruned, tmp_path) -> Exchange:
    return _exchange(pruned, tmp_path)


def _first_mask(parts: dict[str, Any]) -> str:
    return sorted(parts["masks"])[0]


def _set_kernel(parts: dict[str, Any], name: str, keep: list[int]) -> None:
    """Give kernel (0, 0) of mask ``name`` exactly the kept positions ``keep`` (weights follow)."""
    kernel = torch.zeros(9, dtype=torch.bool)
    kernel[keep] = True
    parts["masks"][name][0, 0] = kernel.reshape(3, 3)
    weight = parts["state"][name]
    weight[0, 0] = torch.where(kernel.reshape(3, 3), torch.full((3, 3), 0.5), torch.zeros(3, 3))


# --------------------------------------------------------------------------- the honest baseline
def test_honest_result_passes_every_check_and_keeps_only_checked_report_fields(exchange):
    exchange.session.receive_result(exchange.result())
    outcome = exchange.session.outcome
    assert outcome is not None and outcome.recipe_name == "oneshot"
    assert outcome.achieved_rate == exchange.pruned.report["achieved_rate"]
    exchange.session.audit.close()
    verdict = verify_log(exchange.log, owner=exchange.pruned.owner.card, entity=exchange.pruned.entity.card)
    assert verdict.ok and verdict.receipts == 1, verdict


# --------------------------------------------------------------------------- the recipe
def test_recipe_with_a_million_epochs_is_refused_naming_the_flag(exchange):
    blob = exchange.result(lambda p: p["recipe"].update(epochs=10**6))
    assert "--max-epochs" in exchange.refused(blob, "1000000 retraining epochs")


def test_recipe_with_a_huge_batch_is_refused_naming_the_flag(exchange):
    blob = exchange.result(lambda p: p["recipe"].update(batch_size=10**12))
    assert "--max-batch-size" in exchange.refused(blob, "batch size 1000000000000")


def test_raised_epoch_limit_accepts_the_longer_recipe(pruned, tmp_path):
    exchange = _exchange(pruned, tmp_path, limits=RetrainLimits(max_epochs=100))
    exchange.session.receive_result(exchange.result(lambda p: p["recipe"].update(epochs=60)))
    assert exchange.session.outcome is not None and exchange.session.outcome.recipe.epochs == 60


def test_recipe_with_an_unknown_key_is_refused(exchange):
    exchange.refused(exchange.result(lambda p: p["recipe"].update(run_after="rm -rf ~")), "unknown key.*run_after")


def test_recipe_missing_a_key_is_refused(exchange):
    exchange.refused(exchange.result(lambda p: p["recipe"].pop("lr")), "missing key.*lr")


def test_recipe_numbers_of_the_wrong_json_type_are_refused(exchange):
    exchange.refused(exchange.result(lambda p: p["recipe"].update(epochs="3")), "epochs must be an integer")


# --------------------------------------------------------------------------- tensors
def test_nan_in_an_unmasked_batchnorm_weight_is_refused(exchange):
    def nan_bn(parts):
        assert "features.1.weight" not in parts["masks"]
        parts["state"]["features.1.weight"][0] = float("nan")

    exchange.refused(exchange.result(nan_bn), "features.1.weight.*NaN")


def test_negative_running_variance_is_refused(exchange):
    exchange.refused(
        exchange.result(lambda p: p["state"]["features.4.running_var"].__setitem__(3, -1.0)), "running variance 'features.4.running_var'"
    )


# --------------------------------------------------------------------------- masks
def test_mask_on_a_linear_weight_is_refused_when_no_model_rate_was_asked(exchange):
    def linear(parts):
        parts["masks"]["classifier.weight"] = torch.ones_like(parts["state"]["classifier.weight"], dtype=torch.bool)

    exchange.refused(exchange.result(linear), "classifier.weight.*request named no whole-model rate")


def test_mask_on_a_batchnorm_weight_is_refused(exchange):
    def batchnorm(parts):
        parts["masks"]["features.4.weight"] = torch.ones_like(parts["state"]["features.4.weight"], dtype=torch.bool)

    exchange.refused(exchange.result(batchnorm), "features.4.weight.*not on a prunable weight")


def test_kernel_keeping_five_entries_is_refused(exchange):
    def five(parts):
        _set_kernel(parts, _first_mask(parts), [0, 1, 2, 3, CENTRE])

    exchange.refused(exchange.result(five), r"keeps kernel entries \[1, 1, 1, 1, 1, 0, 0, 0, 0\]")


def test_kernel_without_its_centre_is_refused(exchange):
    def no_centre(parts):
        _set_kernel(parts, _first_mask(parts), [0, 1, 2, 3])

    exchange.refused(exchange.result(no_centre), "including the centre")


def _pattern_outside(library: list[list[int]]) -> list[int]:
    from entity.pruning.patterns import candidate_patterns

    for row in candidate_patterns().to(torch.int64).tolist():
        if row not in library:
            return [i for i, v in enumerate(row) if v]
    raise AssertionError("the library holds every pattern")


def test_pattern_outside_the_stated_library_is_refused(exchange):
    outside = _pattern_outside(exchange.pruned.report["library"])
    exchange.refused(exchange.result(lambda p: _set_kernel(p, _first_mask(p), outside)), "not in the report's pattern library")


def test_without_a_stated_library_more_than_eight_patterns_are_refused(exchange):
    from entity.pruning.patterns import candidate_patterns

    def nine_patterns(parts):
        del parts["report"]["library"]
        name = _first_mask(parts)
        for i, row in enumerate(candidate_patterns()[:9]):
            kernel = row.reshape(3, 3)
            parts["masks"][name][i // 4, i % 4] = kernel  # the first kernels, whatever they kept before
            parts["state"][name][i // 4, i % 4] = kernel.float() * 0.5
        masks = parts["masks"].values()
        total, kept = sum(m.numel() for m in masks), sum(int(m.sum()) for m in masks)
        parts["report"]["achieved_rate"] = f"{total / kept:.4f}"
        parts["report"]["kept_weights"] = kept

    exchange.refused(exchange.result(nine_patterns), "distinct patterns, more than a library of 8")


def test_rate_off_the_claim_is_refused(exchange):
    exchange.refused(
        exchange.result(lambda p: p["report"].update(achieved_rate="16.0000")), "claims an achieved rate of 16.0000, the masks achieve 8.0"
    )


# --------------------------------------------------------------------------- report.json
def test_deeply_nested_report_is_refused_cleanly(exchange):
    exchange.refused(exchange.result(report_json=b"[" * 10000 + b"]" * 10000), "report.json is not valid canonical JSON")


def test_oversized_report_is_refused_before_parsing(exchange):
    big = canonical.dumps({**exchange.pruned.report, "notes": "x" * (2 * 1024 * 1024)})
    exchange.refused(exchange.result(report_json=big), "report.json is .* over the 1048576-byte limit")


def test_result_with_an_extra_file_is_refused(exchange):
    exchange.refused(exchange.result(run_sh=b"#!/bin/sh\n"), "files the owner does not accept: run.sh")


def test_receipt_the_audit_log_refuses_is_a_refusal_and_leaves_the_log_valid(pruned, tmp_path):
    """A receipt signed by the entity but for another job: the log's own check refuses it."""
    other = _exchange(pruned, tmp_path / "other")
    exchange = _exchange(pruned, tmp_path / "this")
    exchange.receipt = other.receipt
    with pytest.raises(SessionError, match="receipt or countersignature is invalid"):
        exchange.session.receive_result(exchange.result())
    assert exchange.session.outcome is None
    assert read_records(exchange.log)[-1]["event"] == EV_REFUSED
    exchange.session.audit.checkpoint()
    assert verify_log(exchange.log, owner=pruned.owner.card, entity=pruned.entity.card).ok


# --------------------------------------------------------------------------- offers
@pytest.mark.parametrize(
    "payload, problem",
    [
        ({"nonce": "n-1"}, "lacks a job_id or nonce"),
        ({"job_id": "job-1"}, "lacks a job_id or nonce"),
        ({"job_id": 7, "nonce": "n-1"}, "lacks a job_id or nonce"),
        ({"job_id": "job-1", "nonce": "n-1", "asks_for": "everything"}, "asks_for is not a list"),
    ],
)
def test_malformed_offer_is_a_clear_refusal(pruned, tmp_path, payload, problem):
    session = _session(pruned, tmp_path)
    offer = sign_message(payload, kind="offer", signer=pruned.entity)
    with pytest.raises(SessionError, match=problem):
        session.answer_offer(offer, None)
    assert session.job_id is None and session.request_blob is None
    assert read_records(tmp_path / "audit.jsonl")[-1]["event"] == EV_REFUSED


# --------------------------------------------------------------------------- the ClientApp
def _message(kind: str, content) -> Any:
    from flwr.app import Message, Metadata

    meta = Metadata(
        run_id=1, message_id="m-1", src_node_id=0, dst_node_id=2, reply_to_message_id="", group_id="", created_at=0.0, ttl=3600.0, message_type=kind
    )
    return Message(metadata=meta, content=content)


def _facts(reply) -> dict:
    from protocol.flower_records import facts_of

    return facts_of(reply.content)


def test_client_app_declines_a_message_type_it_does_not_serve(pruned, tmp_path):
    from flwr.app import Context, RecordDict

    from owner.client_app import build_client_app
    from protocol.flower_records import pack

    app = build_client_app(_session(pruned, tmp_path))
    context = Context(run_id=1, node_id=2, node_config={}, state=RecordDict(), run_config={})
    for kind in ("query.install_fab", "train", "evaluate.default"):
        reply = app(_message(kind, pack({"x": "y"})), context)
        assert _facts(reply)["status"] == "declined" and kind in _facts(reply)["reason"]


def test_client_app_declines_a_second_offer_and_keeps_the_job(pruned, tmp_path):
    from flwr.app import Context, RecordDict

    from owner.client_app import build_client_app
    from protocol.flower_records import pack

    registry = {pruned.owner.card.fingerprint: pruned.owner.card}
    jobs = EntityJobs(pruned.entity, lambda: registry, NonceStore(tmp_path / "n.jsonl"), EventLog(tmp_path / "e.jsonl"))
    session = _session(pruned, tmp_path)
    app = build_client_app(session)
    context = Context(run_id=1, node_id=2, node_config={}, state=RecordDict(), run_config={})
    first = app(_message("query.offer", pack({}, jobs.make_offer(1).blob)), context)
    assert _facts(first)["status"] == "hello" and session.request_blob is None  # nothing but the hello before the admission
    job = session.job_id
    second = app(_message("query.offer", pack({}, jobs.make_offer(1).blob)), context)
    assert _facts(second)["status"] == "declined" and "under way" in _facts(second)["reason"]
    assert session.job_id == job and session.refusal is None
    malformed = app(_message("query.refused", RecordDict()), context)  # no facts at all
    assert _facts(malformed)["status"] == "noted" and session.refusal == "the entity refused the job: no reason given"


# --------------------------------------------------------------------------- the owner's limits
def test_limit_flags_reach_the_owner_config(tmp_path, monkeypatch):
    from owner.run import _parser, load_config

    monkeypatch.chdir(tmp_path)  # no owner.toml here
    args = _parser().parse_args(
        [
            "--data",
            "d",
            "--model",
            "m:f",
            "--entity-card",
            "c.json",
            "--input-shape",
            "1,28,28",
            "--mean",
            "0.5",
            "--std",
            "0.25",
            "--max-epochs",
            "120",
            "--max-batch-size",
            "512",
        ]
    )
    config = load_config(args)
    assert (config.max_epochs, config.max_batch_size) == (120, 512)
    assert RetrainLimits(config.max_epochs, config.max_batch_size) == RetrainLimits(120, 512)


@pytest.mark.parametrize("kwargs, flag", [({"max_epochs": 0}, "--max-epochs"), ({"max_batch_size": -1}, "--max-batch-size")])
def test_non_positive_limit_is_a_clear_error_naming_its_flag(kwargs, flag):
    from protocol.spec import SpecError

    with pytest.raises(SpecError, match=f"^{flag} must be a positive integer"):
        RetrainLimits(**kwargs)
