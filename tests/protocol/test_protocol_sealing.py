"""Signed + sealed bundles: round trip, and every refusal the brief lists."""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
from typing import Any

import pytest
import torch
from safetensors.torch import save

from protocol import canonical
from protocol._wire import dsse as _dsse
from protocol.errors import AdmissionError, ArtifactError, ReplayError, SealError, SignatureError
from protocol.keys import Identity
from protocol.sealing import _seal_frames, open_bundle, peek_header, seal_bundle, seal_bundle_detailed, sender_fingerprint
from protocol.signing import digest, make_statement, message_signer, sign_message, verify_message

OWNER = Identity.generate("owner", "clinic")
ENTITY = Identity.generate("entity", "service")
MALLORY = Identity.generate("owner", "mallory")
REQ = digest(b"offer-bytes")


def _files() -> dict[str, bytes]:
    torch.manual_seed(0)
    weights = save({"conv.weight": torch.randn(4, 3, 3, 3), "fc.bias": torch.zeros(10)})
    return {"program.json": b'{"graph": []}', "weights.safetensors": weights, "request.json": b'{"job_id":"j1"}'}


def _seal(files: dict[str, bytes] | None = None, **kw: Any) -> bytes:
    args: dict[str, Any] = dict(kind="model", job_id="j1", request_hash=REQ, sender=OWNER, recipient=ENTITY.card)
    args.update(kw)
    return seal_bundle(files or _files(), **args)


def _open(blob: bytes, **kw: Any):
    args: dict[str, Any] = dict(kind="model", job_id="j1", request_hash=REQ, recipient=ENTITY, senders={OWNER.fingerprint: OWNER.card})
    args.update(kw)
    return open_bundle(blob, **args)


def test_round_trip_returns_exact_files_claims_and_sender() -> None:
    files = _files()
    opened = _open(_seal(files, claims={"rate": "8", "layers": 3}))
    assert dict(opened.files) == files
    assert dict(opened.claims) == {"rate": "8", "layers": 3}
    assert opened.sender == OWNER.card
    tensors = opened.statement["predicate"]["tensors"]["weights.safetensors"]
    assert [(t["name"], t["dtype"], t["shape"]) for t in tensors] == [("conv.weight", "F32", [4, 3, 3, 3]), ("fc.bias", "F32", [10])]
    assert opened.file_digests()["program.json"] == digest(files["program.json"])


def test_sealed_bytes_do_not_contain_the_plaintext() -> None:
    files = _files()
    blob = _seal(files)
    assert files["weights.safetensors"][64:128] not in blob
    assert b"graph" not in blob


def test_detailed_seal_reports_what_the_receiver_will_see() -> None:
    sealed = seal_bundle_detailed(_files(), kind="model", job_id="j1", request_hash=REQ, sender=OWNER, recipient=ENTITY.card)
    opened = _open(sealed.blob)
    assert sealed.statement_hash == opened.statement_hash
    assert sealed.file_digests() == opened.file_digests()


@pytest.mark.parametrize("position", [0, 40, 200, -1, -20, -300])
def test_any_tampered_byte_is_refused(position: int) -> None:
    blob = bytearray(_seal())
    blob[position] ^= 0x01
    with pytest.raises((SealError, ReplayError, AdmissionError)):
        _open(bytes(blob))


def test_truncated_bundle_is_refused() -> None:
    blob = _seal()
    for cut in (5, 30, len(blob) // 2, len(blob) - 1):
        with pytest.raises(SealError):
            _open(blob[:cut])


def test_unregistered_sender_is_refused_by_fingerprint() -> None:
    blob = _seal(sender=MALLORY)
    assert sender_fingerprint(blob) == MALLORY.fingerprint
    with pytest.raises(AdmissionError, match=MALLORY.fingerprint[:16]):
        _open(blob)


def test_sender_claiming_another_identity_is_a_wrong_signer() -> None:
    impostor = Identity(card=OWNER.card, signing_key=MALLORY.signing_key, sealing_key=MALLORY.sealing_key)
    with pytest.raises(SignatureError, match="does not verify"):
        _open(_seal(sender=impostor))


def test_statement_signed_by_another_key_is_refused() -> None:
    files = _files()
    statement = make_statement(files, kind="model", job_id="j1", request_hash=REQ, sender=OWNER.card, recipient=ENTITY.card, claims={})
    env = _dsse.sign(_dsse.INTOTO_PAYLOAD_TYPE, canonical.dumps(statement), MALLORY.signing_key, MALLORY.fingerprint).to_bytes()
    blob = _seal_frames(env, files, "model", "j1", REQ, OWNER.fingerprint, ENTITY.card)
    with pytest.raises(SignatureError, match="wrong signer"):
        _open(blob)


def test_bundle_for_another_recipient_is_refused() -> None:
    other = Identity.generate("entity")
    with pytest.raises(SealError, match="recipient"):
        _open(_seal(recipient=other.card))


def test_replayed_bundle_from_an_old_job_or_request_is_refused() -> None:
    blob = _seal()
    with pytest.raises(ReplayError, match="job"):
        _open(blob, job_id="j2")
    with pytest.raises(ReplayError, match="another request"):
        _open(blob, request_hash=digest(b"new offer"))


def test_edited_routing_header_cannot_be_opened() -> None:
    blob = _seal()
    (n,) = struct.unpack(">I", blob[8:12])
    header = canonical.loads(blob[12 : 12 + n])
    header["request_hash"] = digest(b"other")
    new = canonical.dumps(header)
    forged = blob[:8] + struct.pack(">I", len(new)) + new + blob[12 + n :]
    with pytest.raises(SealError, match="cannot open"):
        _open(forged, request_hash=digest(b"other"))
    assert peek_header(blob)["job_id"] == "j1"


def _forge(files: dict[str, bytes], tensors: dict[str, Any] | None = None, subjects: list[Any] | None = None) -> bytes:
    """A bundle correctly signed by OWNER whose statement lists what the caller says."""
    import hashlib

    statement = {
        "_type": "https://in-toto.io/Statement/v1",
        "subject": subjects
        if subjects is not None
        else [{"name": n, "digest": {"sha256": hashlib.sha256(b).hexdigest()}} for n, b in sorted(files.items())],
        "predicateType": "https://blindprune.dev/bundle/v1",
        "predicate": {
            "kind": "model",
            "job_id": "j1",
            "request_hash": REQ,
            "sender": OWNER.fingerprint,
            "recipient": ENTITY.fingerprint,
            "claims": {},
            "tensors": tensors or {},
        },
    }
    env = _dsse.sign(_dsse.INTOTO_PAYLOAD_TYPE, canonical.dumps(statement), OWNER.signing_key, OWNER.fingerprint).to_bytes()
    return _seal_frames(env, files, "model", "j1", REQ, OWNER.fingerprint, ENTITY.card)


class _Boom:
    def __reduce__(self):  # pragma: no cover - must never run
        return (print, ("PAYLOAD RAN",))


def test_pickled_file_is_refused_on_both_sides(capsys: pytest.CaptureFixture[str]) -> None:
    evil = pickle.dumps(_Boom(), protocol=4)
    with pytest.raises(ArtifactError, match="pickle"):
        _seal({"model.bin": evil})
    with pytest.raises(ArtifactError, match="pickle"):
        _open(_forge({"model.bin": evil}))
    assert "PAYLOAD RAN" not in capsys.readouterr().out


def test_zip_archive_holding_a_pickle_is_refused() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("model/data.pkl", pickle.dumps({"a": 1}, protocol=2))
        archive.writestr("model/version", "3")
    with pytest.raises(ArtifactError, match="data.pkl"):
        _open(_forge({"model.pt2": buf.getvalue()}))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("model/sample_inputs.bin", pickle.dumps([1, 2], protocol=3))
    with pytest.raises(ArtifactError, match="sample_inputs.bin"):
        _seal({"model.pt2": buf.getvalue()})


def _st_header(obj: dict[str, Any], data: bytes = b"") -> bytes:
    raw = json.dumps(obj).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def test_oversized_safetensors_header_is_refused_without_allocating() -> None:
    huge = struct.pack("<Q", 2**62) + b"{}"
    with pytest.raises(ArtifactError, match="exceeds"):
        _seal({"weights.safetensors": huge})
    with pytest.raises(ArtifactError, match="exceeds"):
        _open(_forge({"weights.safetensors": huge}, tensors={"weights.safetensors": []}))


def test_safetensors_with_wrong_shape_or_hidden_bytes_is_refused() -> None:
    bad_shape = _st_header({"w": {"dtype": "F32", "shape": [3, 3], "data_offsets": [0, 16]}}, b"\0" * 16)
    with pytest.raises(ArtifactError, match="does not match dtype"):
        _open(_forge({"weights.safetensors": bad_shape}, tensors={"weights.safetensors": []}))
    gap = _st_header({"w": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12)
    with pytest.raises(ArtifactError, match="contiguous"):
        _seal({"weights.safetensors": gap})
    trailing = _st_header({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12)
    with pytest.raises(ArtifactError, match="trailing"):
        _seal({"weights.safetensors": trailing})


def test_statement_listing_other_tensor_shapes_is_refused() -> None:
    files = _files()
    statement = make_statement(files, kind="model", job_id="j1", request_hash=REQ, sender=OWNER.card, recipient=ENTITY.card, claims={})
    tensors = statement["predicate"]["tensors"]
    tensors["weights.safetensors"][0]["shape"] = [4, 3, 9]
    with pytest.raises(ArtifactError, match="dtype/shape"):
        _open(_forge(files, tensors=tensors))


def test_extra_or_missing_file_against_the_statement_is_named() -> None:
    files = _files()
    statement = make_statement(files, kind="model", job_id="j1", request_hash=REQ, sender=OWNER.card, recipient=ENTITY.card, claims={})
    tensors = statement["predicate"]["tensors"]
    with pytest.raises(ArtifactError, match="unlisted file.*extra.bin"):
        _open(_forge({**files, "extra.bin": b"x"}, tensors=tensors, subjects=statement["subject"]))
    fewer = dict(files)
    del fewer["program.json"]
    with pytest.raises(ArtifactError, match="absent: program.json"):
        _open(_forge(fewer, tensors=tensors, subjects=statement["subject"]))


def test_file_bytes_differing_from_statement_hash_are_refused() -> None:
    files = _files()
    statement = make_statement(files, kind="model", job_id="j1", request_hash=REQ, sender=OWNER.card, recipient=ENTITY.card, claims={})
    changed = {**files, "program.json": b'{"graph": [1]}'}
    with pytest.raises(ArtifactError, match="program.json: SHA-256"):
        _open(_forge(changed, tensors=statement["predicate"]["tensors"], subjects=statement["subject"]))


def test_signed_message_round_trip_and_refusals() -> None:
    blob = sign_message({"job_id": "j1", "nonce": "n"}, kind="offer", signer=ENTITY)
    assert verify_message(blob, kind="offer", signer=ENTITY.card) == {"job_id": "j1", "nonce": "n"}
    assert message_signer(blob) == ENTITY.fingerprint
    with pytest.raises(SignatureError, match="expected a 'receipt'"):
        verify_message(blob, kind="receipt", signer=ENTITY.card)
    with pytest.raises(SignatureError, match="wrong signer"):
        verify_message(blob, kind="offer", signer=OWNER.card)
    env = canonical.loads(blob)
    env["payload"] = _dsse.b64e(_dsse.b64d(env["payload"], "p").replace(b'"n"', b'"m"'))
    with pytest.raises(SignatureError, match="does not verify"):
        verify_message(canonical.dumps(env), kind="offer", signer=ENTITY.card)


def test_floats_cannot_be_signed() -> None:
    with pytest.raises(Exception, match="float"):
        sign_message({"acc": 0.5}, kind="report", signer=OWNER)


class _Touch:
    """Pickle payload: creates a marker file when unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _booby_trapped_pt2(marker: str) -> bytes:
    program = torch.export.export(torch.nn.Linear(3, 2), (torch.randn(1, 3),))
    clean = io.BytesIO()
    torch.export.save(program, clean)
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(_Touch(marker), protocol=2))
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(clean.getvalue())) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = inner.getvalue() if info.filename.endswith("sample_inputs/model.pt") else src.read(info)
            dst.writestr(info.filename, data)
    return out.getvalue()


def test_booby_trapped_export_archive_is_refused_without_running_its_payload(tmp_path) -> None:
    marker = tmp_path / "payload-ran"
    archive = _booby_trapped_pt2(str(marker))
    with pytest.raises(ArtifactError, match="sample_inputs/model.pt:archive/data.pkl"):
        _seal({"model.pt2": archive})
    with pytest.raises(ArtifactError, match="data.pkl"):
        _open(_forge({"model.pt2": archive}))
    assert not marker.exists()


def test_clean_torch_export_archive_is_still_refused_because_it_holds_pickles() -> None:
    program = torch.export.export(torch.nn.Linear(3, 2), (torch.randn(1, 3),))
    buf = io.BytesIO()
    torch.export.save(program, buf)
    with pytest.raises(ArtifactError, match="pickle"):
        _seal({"model.pt2": buf.getvalue()})
