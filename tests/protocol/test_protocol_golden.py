"""Golden vectors: the wire formats are stable, and our Merkle tree is RFC 9162's.

The identities come from fixed seeds; Ed25519 signatures are deterministic, so a signed message
and a packed mask must reproduce byte for byte (``golden/vectors.json``). HPKE is randomised, so
sealed bundles and audit logs are golden *inputs* (``golden/compat/``): bytes written by earlier
versions that every later version must still open and verify. ``pytest --update-goldens``
rewrites ``vectors.json`` from this version and adds this version's own bundle and log to
``compat/`` (older ones are never rewritten); say so in the commit when a format changes.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, save

from protocol._wire.merkle import root_of
from protocol.audit import AuditLog, countersign_checkpoint, verify_log
from protocol.keys import Identity
from protocol.masks import pack_masks, unpack_masks
from protocol.sealing import open_bundle, seal_bundle
from protocol.signing import digest, sign_message, verify_message

GOLDEN = Path(__file__).parent / "golden"
VECTORS = GOLDEN / "vectors.json"
COMPAT = GOLDEN / "compat"


def _ident(role: str, name: str, tag: bytes) -> Identity:
    return Identity.from_private_bytes(role, name, hashlib.sha256(tag + b"sign").digest(), hashlib.sha256(tag + b"seal").digest())


OWNER = _ident("owner", "golden-owner", b"owner")
ENTITY = _ident("entity", "golden-entity", b"entity")
MASKS = {"a.weight": torch.tensor([[1, 0, 1], [0, 1, 1]], dtype=torch.bool), "b": torch.tensor([True] * 9)}
REQUEST_HASH = digest(b"golden offer")


def _signed_message() -> bytes:
    return sign_message({"job_id": "job-golden", "nonce": "00" * 16, "n": 7}, kind="offer", signer=ENTITY)


def _job_control() -> dict[str, str]:
    """The hello, the admission and a status, signed: the job-control messages of ``protocol.contract``."""
    from protocol.contract import ADMISSION_KIND, HELLO_KIND, STATUS_KIND, Admission, Hello, JobStatus

    hello = Hello("job-golden", "00" * 16, OWNER.fingerprint, "resume", 123456, "job-earlier")
    admission = Admission("job-golden", OWNER.fingerprint, "request", 3, 2, 1 << 30)
    status = JobStatus("job-golden", 4, "pruning", phase="layer", layer="features.3.weight", percent=40, elapsed_s=12)
    return {
        "hello": sign_message(hello.to_json(), kind=HELLO_KIND, signer=OWNER).decode(),
        "admission": sign_message(admission.to_json(), kind=ADMISSION_KIND, signer=ENTITY).decode(),
        "status": sign_message(status.to_json(), kind=STATUS_KIND, signer=ENTITY).decode(),
    }


def _sealed_bundle() -> bytes:
    files = {"request.json": b'{"job_id":"job-golden"}', "weights.safetensors": save({"w": torch.arange(4, dtype=torch.float32)})}
    return seal_bundle(files, kind="model", job_id="job-golden", request_hash=REQUEST_HASH, sender=OWNER, recipient=ENTITY.card, claims={"k": "v"})


def _audit_log(path: Path) -> bytes:
    with AuditLog.open(path, OWNER) as log:
        log.append("job.started", {"job_id": "job-golden"})
        checkpoint = log.checkpoint()
        log.record_countersignature(countersign_checkpoint(checkpoint, owner=OWNER.card, entity=ENTITY), entity=ENTITY.card)
    return path.read_bytes()


def _vectors() -> dict[str, str]:
    return json.loads(VECTORS.read_text())


def _compat(kind: str) -> list[Path]:
    found = sorted(COMPAT.glob(f"{kind}-*.b64"))
    assert found, f"no golden {kind} in {COMPAT}"
    return found


def test_update_goldens(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Only with ``--update-goldens``: regenerate the vectors, add this version's compat inputs."""
    if not request.config.getoption("--update-goldens"):
        pytest.skip("golden files are regenerated only with --update-goldens")
    vectors = {
        "owner_fingerprint": OWNER.fingerprint,
        "entity_fingerprint": ENTITY.fingerprint,
        "signed_message": _signed_message().decode(),
        "packed_masks_hex": pack_masks(MASKS).hex(),
        "job_control": _job_control(),
    }
    VECTORS.write_text(json.dumps(vectors, indent=2, sort_keys=True) + "\n")
    today = datetime.date.today().isoformat()
    for kind, data in (("sealed-bundle", _sealed_bundle()), ("audit-log", _audit_log(tmp_path / "audit.jsonl"))):
        target = COMPAT / f"{kind}-{today}.b64"
        if not target.exists():
            target.write_text(base64.b64encode(data).decode() + "\n")


# RFC 6962 / 9162 reference vectors (certificate-transparency merkle_tree_test): tree heads over
# the first n of these leaves.
CT_LEAVES = [bytes.fromhex(h) for h in ["", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f"]]
CT_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


def test_merkle_tree_heads_match_the_rfc_reference_vectors() -> None:
    assert root_of([]).hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    for n, expected in enumerate(CT_ROOTS, start=1):
        assert root_of(CT_LEAVES[:n]).hex() == expected, n


def test_fingerprints_are_stable() -> None:
    vectors = _vectors()
    assert OWNER.fingerprint == vectors["owner_fingerprint"] and ENTITY.fingerprint == vectors["entity_fingerprint"]


def test_signed_message_is_byte_for_byte_stable() -> None:
    golden = _vectors()["signed_message"]
    assert _signed_message().decode() == golden
    assert verify_message(golden.encode(), kind="offer", signer=ENTITY.card)["n"] == 7


def test_job_control_messages_are_byte_for_byte_stable_and_read_back() -> None:
    from protocol.contract import ADMISSION_KIND, HELLO_KIND, STATUS_KIND, Admission, Hello, JobStatus

    golden = _vectors()["job_control"]
    assert _job_control() == golden
    assert Hello.from_json(verify_message(golden["hello"].encode(), kind=HELLO_KIND, signer=OWNER.card)).resume_job == "job-earlier"
    assert Admission.from_json(verify_message(golden["admission"].encode(), kind=ADMISSION_KIND, signer=ENTITY.card)).queued == 3
    assert JobStatus.from_json(verify_message(golden["status"].encode(), kind=STATUS_KIND, signer=ENTITY.card)).percent == 40


def test_packed_masks_are_byte_for_byte_stable() -> None:
    golden = _vectors()["packed_masks_hex"]
    assert pack_masks(MASKS).hex() == golden
    assert torch.equal(unpack_masks(bytes.fromhex(golden))["a.weight"], MASKS["a.weight"])


@pytest.mark.parametrize("path", _compat("sealed-bundle"), ids=lambda p: p.stem)
def test_golden_sealed_bundle_still_opens(path: Path) -> None:
    opened = open_bundle(
        base64.b64decode(path.read_text()),
        kind="model",
        job_id="job-golden",
        request_hash=REQUEST_HASH,
        recipient=ENTITY,
        senders={OWNER.fingerprint: OWNER.card},
    )
    assert opened.files["request.json"] == b'{"job_id":"job-golden"}'
    assert torch.equal(load(opened.files["weights.safetensors"])["w"], torch.arange(4, dtype=torch.float32))
    assert dict(opened.claims) == {"k": "v"}


@pytest.mark.parametrize("path", _compat("audit-log"), ids=lambda p: p.stem)
def test_golden_audit_log_still_verifies(path: Path, tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    log.write_bytes(base64.b64decode(path.read_text()))
    verdict = verify_log(log, owner=OWNER.card, entity=ENTITY.card)
    assert verdict.ok, verdict.error
    assert (verdict.records, verdict.checkpoints, verdict.countersigned) == (4, 1, 2)


def test_this_versions_bundle_and_log_open_like_the_golden_ones(tmp_path: Path) -> None:
    """What ``--update-goldens`` would add is itself valid (so the flag never stores a broken input)."""
    opened = open_bundle(
        _sealed_bundle(), kind="model", job_id="job-golden", request_hash=REQUEST_HASH, recipient=ENTITY, senders={OWNER.fingerprint: OWNER.card}
    )
    assert dict(opened.claims) == {"k": "v"}
    _audit_log(tmp_path / "audit.jsonl")
    verdict = verify_log(tmp_path / "audit.jsonl", owner=OWNER.card, entity=ENTITY.card)
    assert verdict.ok and (verdict.records, verdict.checkpoints, verdict.countersigned) == (4, 1, 2)
