"""One job end to end through the protocol API exactly as the Flower flow calls it, and the
hostile variants of each step (no Flower here: the bytes are handed over directly)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from protocol import canonical
from protocol.artifact import program_to_files
from protocol.audit import EV_REFUSED, AuditLog, countersign_checkpoint, make_receipt, verify_log
from protocol.egress import EgressGuard
from protocol.errors import AdmissionError, ArtifactError, MaskError, ReplayError, SealError
from protocol.keys import Identity, init_identity, load_identity, load_registry
from protocol.masks import pack_masks, unpack_masks
from protocol.program_guard import strip_program
from protocol.replay import NonceStore
from protocol.sealing import open_bundle, peek_header, seal_bundle, seal_bundle_detailed, sender_fingerprint
from protocol.signing import digest, sign_message, verify_message
from protocol.spec import InputSpec, PruneRequest, RetrainRecipe
from protocol.tensors import check_masks, check_safetensors, schema_of


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 26 * 26, 10)).eval()


@dataclass
class World:
    owner: Identity
    entity: Identity
    owners_dir: Path
    owner_log: AuditLog
    entity_nonces: NonceStore
    owner_nonces: NonceStore


@pytest.fixture()
def world(tmp_path: Path):
    owner = init_identity(tmp_path / "owner-keys", "owner", "clinic")
    entity = init_identity(tmp_path / "entity-keys", "entity", "service")
    owners_dir = tmp_path / "owners"
    owners_dir.mkdir()
    (owners_dir / "clinic.json").write_bytes(owner.card.to_bytes())
    log = AuditLog.open(tmp_path / "audit.jsonl", owner)
    yield World(owner, entity, owners_dir, log, NonceStore(tmp_path / "entity-nonces"), NonceStore(tmp_path / "owner-nonces"))
    log.close()


def _offer(w: World) -> tuple[bytes, str, str]:
    job_id, nonce = w.entity_nonces.issue()
    offer = sign_message({"job_id": job_id, "nonce": nonce, "options": {"rates": ["2", "4", "8"]}}, kind="offer", signer=w.entity)
    return offer, job_id, nonce


def _owner_request(w: World, offer: bytes) -> tuple[bytes, bytes, str]:
    """Owner: verify offer, build artifact, egress guard, seal, log, checkpoint."""
    body = verify_message(offer, kind="offer", signer=w.entity.card)  # the entity card is pinned
    model = _model()
    files = program_to_files(torch.export.export(model, (torch.zeros(1, 1, 28, 28),)))
    files["program.json"] = strip_program(files["program.json"])
    request = {
        "job_id": body["job_id"],
        "nonce": body["nonce"],
        "prune": PruneRequest(rate=4.0).to_json(),
        "input_spec": InputSpec(shape=(1, 28, 28), mean=(0.2860,), std=(0.3530,)).to_json(),
    }
    files["request.json"] = canonical.dumps(request)
    guard = EgressGuard(schema=schema_of(model.state_dict()), max_bytes=10_000_000, on_violation=w.owner_log.record_blocked)
    guard.check(files, {})
    sealed = seal_bundle_detailed(files, kind="model", job_id=body["job_id"], request_hash=digest(offer), sender=w.owner, recipient=w.entity.card)
    w.owner_log.record_sent(sealed, recipient=w.entity.card, request=request)
    checkpoint = w.owner_log.checkpoint()
    return sealed.blob, checkpoint, body["job_id"]


def _entity_answer(w: World, offer: bytes, blob: bytes, checkpoint: bytes, *, tamper=None) -> tuple[bytes, bytes, bytes, str]:
    """Entity: admit, open, redeem the offer, 'prune', seal the result to the owner."""
    registry = load_registry(w.owners_dir)
    header = peek_header(blob)
    opened = open_bundle(blob, kind="model", job_id=header["job_id"], request_hash=digest(offer), recipient=w.entity, senders=registry)
    request = canonical.loads(opened.files["request.json"])
    w.entity_nonces.redeem(request["job_id"], request["nonce"])
    from safetensors.torch import load

    state = load(opened.files["weights.safetensors"])
    masks = {"0.weight": (state["0.weight"].abs() > 0.1)}
    state["0.weight"] = state["0.weight"] * masks["0.weight"]
    if tamper:
        state, masks = tamper(state, masks)
    result = {
        "weights.safetensors": save(state),
        "masks.bin": pack_masks(masks),
        "report.json": canonical.dumps({"achieved_rate": "4"}),
        "recipe.json": canonical.dumps(RetrainRecipe().to_json()),
    }
    request_hash = digest(opened.files["request.json"])
    sealed = seal_bundle(
        result, kind="result", job_id=request["job_id"], request_hash=request_hash, sender=w.entity, recipient=registry[opened.sender.fingerprint]
    )
    receipt = make_receipt(opened, entity=w.entity, job_id=request["job_id"])
    counter = countersign_checkpoint(checkpoint, owner=opened.sender, entity=w.entity)
    return sealed, receipt, counter, request_hash


def _owner_receive(w: World, blob: bytes, request_hash: str, job_id: str, nonce: str):
    opened = open_bundle(
        blob, kind="result", job_id=job_id, request_hash=request_hash, recipient=w.owner, senders={w.entity.fingerprint: w.entity.card}
    )
    schema = schema_of(_model().state_dict())
    weights = check_safetensors(opened.files["weights.safetensors"], schema)
    masks = unpack_masks(opened.files["masks.bin"])
    check_masks(masks, schema)
    w.owner_nonces.accept_once(job_id, nonce)
    w.owner_log.record_received(opened, size=len(blob))
    w.owner_log.checkpoint()
    return weights, masks


def _job(w: World, *, tamper=None):
    offer, job_id, nonce = _offer(w)
    blob, checkpoint, _ = _owner_request(w, offer)
    result, receipt, counter, request_hash = _entity_answer(w, offer, blob, checkpoint, tamper=tamper)
    w.owner_log.record_countersignature(counter, entity=w.entity.card)
    w.owner_log.record_receipt(receipt, entity=w.entity.card)
    return result, request_hash, job_id, nonce


def test_one_honest_job_verifies_end_to_end(world: World, tmp_path: Path) -> None:
    result, request_hash, job_id, nonce = _job(world)
    weights, masks = _owner_receive(world, result, request_hash, job_id, nonce)
    assert masks["0.weight"].dtype == torch.bool and not masks["0.weight"].all()
    assert bool((weights["0.weight"][~masks["0.weight"]] == 0).all())
    verdict = verify_log(tmp_path / "audit.jsonl", owner=world.owner.card, entity=world.entity.card)
    assert verdict.ok and verdict.receipts == 1 and verdict.countersigned > 0, verdict
    assert load_identity(tmp_path / "owner-keys").fingerprint == world.owner.fingerprint


def test_replayed_result_is_refused_by_the_owner(world: World) -> None:
    result, request_hash, job_id, nonce = _job(world)
    _owner_receive(world, result, request_hash, job_id, nonce)
    with pytest.raises(ReplayError, match="already accepted"):
        _owner_receive(world, result, request_hash, job_id, nonce)


def test_replayed_request_is_refused_by_the_entity(world: World) -> None:
    offer, _, _ = _offer(world)
    blob, checkpoint, _ = _owner_request(world, offer)
    _entity_answer(world, offer, blob, checkpoint)
    with pytest.raises(ReplayError, match="already answered"):
        _entity_answer(world, offer, blob, checkpoint)


def test_result_of_an_old_job_is_refused(world: World) -> None:
    old_result, old_hash, old_job, _ = _job(world)
    _, request_hash, job_id, nonce = _job(world)
    with pytest.raises(ReplayError):
        _owner_receive(world, old_result, request_hash, job_id, nonce)


def test_unregistered_owner_is_refused_with_a_clear_message_and_logged(world: World) -> None:
    (world.owners_dir / "clinic.json").unlink()
    offer, _, _ = _offer(world)
    blob, checkpoint, _ = _owner_request(world, offer)
    assert sender_fingerprint(blob) == world.owner.fingerprint
    with pytest.raises(AdmissionError, match=f"{world.owner.fingerprint[:16]} is not registered") as info:
        _entity_answer(world, offer, blob, checkpoint)
    record = world.owner_log.record_refused(str(info.value), peer=world.entity.fingerprint)
    assert record["event"] == EV_REFUSED and "\n" not in str(info.value)


def test_result_with_nan_weights_is_refused(world: World) -> None:
    def nan(state, masks):
        state["3.bias"] = torch.full_like(state["3.bias"], float("nan"))
        return state, masks

    result, request_hash, job_id, nonce = _job(world, tamper=nan)
    with pytest.raises(ArtifactError, match="NaN"):
        _owner_receive(world, result, request_hash, job_id, nonce)
    assert not world.owner_nonces.seen(job_id, nonce)  # nothing recorded: the result can be re-sent


def test_result_with_wrong_shapes_or_extra_tensors_is_refused(world: World) -> None:
    def reshape(state, masks):
        state["3.weight"] = state["3.weight"][:, :100].contiguous()
        return state, masks

    result, request_hash, job_id, nonce = _job(world, tamper=reshape)
    with pytest.raises(ArtifactError, match="3.weight"):
        _owner_receive(world, result, request_hash, job_id, nonce)

    def extra(state, masks):
        state["smuggled"] = torch.zeros(4)
        return state, masks

    result, request_hash, job_id, nonce = _job(world, tamper=extra)
    with pytest.raises(ArtifactError, match="smuggled"):
        _owner_receive(world, result, request_hash, job_id, nonce)


def test_mask_not_matching_the_weights_is_refused(world: World) -> None:
    def bad_mask(state, masks):
        return state, {"0.weight": torch.ones(4, 1, 3, 2, dtype=torch.bool)}

    result, request_hash, job_id, nonce = _job(world, tamper=bad_mask)
    with pytest.raises(MaskError, match="shape"):
        _owner_receive(world, result, request_hash, job_id, nonce)


def test_result_sealed_to_another_owner_cannot_be_opened(world: World) -> None:
    result, request_hash, job_id, nonce = _job(world)
    other = Identity.generate("owner")
    with pytest.raises(SealError):
        open_bundle(
            result, kind="result", job_id=job_id, request_hash=request_hash, recipient=other, senders={world.entity.fingerprint: world.entity.card}
        )
