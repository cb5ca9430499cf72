"""Bounded fuzzing of every parser that sees received bytes: the only failure is the clean error.

Mutations are applied both outside the encryption (where HPKE refuses them) and inside it (the
fuzzer seals its mutated plaintext correctly, so the framing, envelope, statement, safetensors and
pickle checks behind the decryption all get exercised). Derandomised, so CI runs are repeatable.
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from protocol import canonical
from protocol._wire.safetensors import parse_header
from protocol.audit import AuditLog, verify_log
from protocol.errors import ProtocolError
from protocol.keys import Identity, IdentityCard
from protocol.masks import unpack_masks
from protocol.sealing import _SUITE, BUNDLE_MAGIC, _info, open_bundle, seal_bundle
from protocol.signing import digest, sign_message, verify_message

FUZZ = settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
OWNER = Identity.generate("owner", "clinic")
ENTITY = Identity.generate("entity", "service")
REQ = digest(b"offer")
FILES = {
    "weights.safetensors": save({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2)}),
    "request.json": b'{"job_id":"j"}',
}
BLOB = seal_bundle(FILES, kind="model", job_id="j", request_hash=REQ, sender=OWNER, recipient=ENTITY.card)


def _open(blob: bytes) -> None:
    open_bundle(blob, kind="model", job_id="j", request_hash=REQ, recipient=ENTITY, senders={OWNER.fingerprint: OWNER.card})


def _plaintext() -> bytes:
    """The valid inner plaintext of BLOB (decrypted with the recipient's key)."""
    (n,) = struct.unpack(">I", BLOB[8:12])
    return _SUITE.decrypt(BLOB[12 + n :], ENTITY.sealing_key, info=_info("model", "j", REQ, OWNER.fingerprint, ENTITY.fingerprint))


PLAIN = _plaintext()
mutations = st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255)), min_size=1, max_size=6)


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    out = bytearray(data)
    for pos, value in edits:
        out[pos % len(out)] = value
    if cut is not None:
        out = out[: cut % (len(out) + 1)]
    return bytes(out)


def _reseal(plain: bytes) -> bytes:
    header = canonical.dumps(
        {
            "v": 1,
            "suite": "DHKEM(X25519,HKDF-SHA256)/HKDF-SHA256/AES-256-GCM",
            "kind": "model",
            "job_id": "j",
            "request_hash": REQ,
            "sender": OWNER.fingerprint,
            "recipient": ENTITY.fingerprint,
        }
    )
    sealed = _SUITE.encrypt(plain, ENTITY.card.seal_key(), info=_info("model", "j", REQ, OWNER.fingerprint, ENTITY.fingerprint))
    return b"BPSEAL1\n" + struct.pack(">I", len(header)) + header + sealed


@FUZZ
@given(edits=mutations, cut=st.none() | st.integers(min_value=0))
def test_mutated_sealed_bundle_gives_only_protocol_errors(edits: list[tuple[int, int]], cut: int | None) -> None:
    blob = _mutate(BLOB, edits, cut)
    try:
        _open(blob)
    except ProtocolError:
        return
    assert blob == BLOB


@FUZZ
@given(edits=mutations, cut=st.none() | st.integers(min_value=0))
def test_mutated_plaintext_behind_valid_encryption_gives_only_protocol_errors(edits: list[tuple[int, int]], cut: int | None) -> None:
    plain = _mutate(PLAIN, edits, cut)
    try:
        _open(_reseal(plain))
    except ProtocolError:
        return
    assert plain == PLAIN


@FUZZ
@given(data=st.binary(max_size=400))
def test_random_inner_plaintext_gives_only_protocol_errors(data: bytes) -> None:
    try:
        _open(_reseal(BUNDLE_MAGIC + data))
    except ProtocolError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)


@FUZZ
@given(obj=json_values)
def test_arbitrary_json_as_signed_message_gives_only_protocol_errors(obj: object) -> None:
    try:
        verify_message(canonical.dumps(obj), kind="offer", signer=ENTITY.card)
    except (ProtocolError, canonical.CanonicalJSONError):
        pass


@FUZZ
@given(edits=mutations)
def test_mutated_signed_message_gives_only_protocol_errors(edits: list[tuple[int, int]]) -> None:
    good = sign_message({"job_id": "j", "nonce": "n"}, kind="offer", signer=ENTITY)
    blob = _mutate(good, edits, None)
    try:
        verify_message(blob, kind="offer", signer=ENTITY.card)
    except ProtocolError:
        return
    assert canonical.loads(blob) == canonical.loads(good)


@FUZZ
@given(header=st.dictionaries(st.text(max_size=8), json_values, max_size=4), tail=st.binary(max_size=64))
def test_arbitrary_safetensors_headers_give_only_protocol_errors(header: dict, tail: bytes) -> None:
    raw = json.dumps(header).encode()
    try:
        parse_header(struct.pack("<Q", len(raw)) + raw + tail)
    except ProtocolError:
        pass


@FUZZ
@given(data=st.binary(max_size=200))
def test_random_bytes_as_masks_cards_or_safetensors_give_only_protocol_errors(data: bytes) -> None:
    for parse in (unpack_masks, IdentityCard.from_bytes, parse_header):
        try:
            parse(b"BPMASK1\n" + data if parse is unpack_masks else data)
        except ProtocolError:
            pass


_TMP = tempfile.TemporaryDirectory(prefix="fuzz-audit-")  # removed when the test process exits
_LOG_DIR = Path(_TMP.name)
_LOG = _LOG_DIR / "audit.jsonl"
with AuditLog.open(_LOG, OWNER) as _log:
    for _i in range(4):
        _log.append("event", {"i": _i})
    _log.checkpoint()
_GOOD_LOG = _LOG.read_bytes()


@FUZZ
@given(edits=mutations, cut=st.none() | st.integers(min_value=0))
def test_mutated_audit_log_gives_a_verdict_never_a_crash(edits: list[tuple[int, int]], cut: int | None) -> None:
    data = _mutate(_GOOD_LOG, edits, cut)
    path = _LOG_DIR / "mutated.jsonl"
    path.write_bytes(data)
    verdict = verify_log(path, owner=OWNER.card)
    if data != _GOOD_LOG and not verdict.ok:
        assert verdict.error and "\n" not in verdict.error


def test_deeply_nested_json_is_the_clean_error_in_every_parser(tmp_path: Path) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    for parse in (
        lambda: verify_message(deep, kind="offer", signer=ENTITY.card),
        lambda: IdentityCard.from_bytes(deep[:60_000]),
        lambda: unpack_masks(b"BPMASK1\n" + struct.pack(">I", 20_000) + deep[:20_000]),
        lambda: parse_header(struct.pack("<Q", 20_000) + b"[" * 20_000),
        lambda: _open(_reseal(BUNDLE_MAGIC + struct.pack(">I", len(deep)) + deep + struct.pack(">I", 0))),
        lambda: _open(b"BPSEAL1\n" + struct.pack(">I", 60_000) + b"[" * 60_000 + b"\0" * 64),
    ):
        try:
            parse()
        except ProtocolError:
            pass
    path = tmp_path / "deep.jsonl"
    path.write_bytes(b"[" * 50_000 + b"\n")
    verdict = verify_log(path, owner=OWNER.card)
    assert not verdict.ok and verdict.first_bad == 0
