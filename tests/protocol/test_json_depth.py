"""Depth-limited JSON: nesting past ``MAX_DEPTH`` is a one-line refusal, never a RecursionError."""

from __future__ import annotations

import json
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import canonical
from protocol.canonical import MAX_DEPTH, CanonicalJSONError, JSONDepthError, check_depth, json_depth
from protocol.errors import ProtocolError, SealError, SignatureError
from protocol.keys import Identity
from protocol.sealing import SEAL_MAGIC, open_bundle
from protocol.signing import verify_message

ENTITY = Identity.generate("entity", "service")


def nested(depth: int, open_: bytes = b"[", close: bytes = b"]") -> bytes:
    return open_ * depth + close * depth


def nested_objects(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


@pytest.mark.parametrize("loads", [canonical.loads, canonical.loads], ids=["canonical", "_json"])
@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 10_000, 300_000])
@pytest.mark.parametrize("shape", [nested, nested_objects], ids=["arrays", "objects"])
def test_nesting_past_the_limit_is_a_depth_error_not_a_recursion_error(loads, depth: int, shape) -> None:
    with pytest.raises(JSONDepthError) as caught:
        loads(shape(depth))
    message = str(caught.value)
    assert "\n" not in message and str(MAX_DEPTH) in message


@pytest.mark.parametrize("loads", [canonical.loads, canonical.loads], ids=["canonical", "_json"])
def test_nesting_at_the_limit_parses(loads) -> None:
    assert json_depth(nested(MAX_DEPTH)) == MAX_DEPTH
    value = loads(nested(MAX_DEPTH))
    for _ in range(MAX_DEPTH - 1):
        [value] = value
    assert value == []
    assert loads(nested_objects(MAX_DEPTH)) is not None


def test_depth_error_is_a_canonical_json_error_and_a_protocol_error() -> None:
    """So every parser that catches CanonicalJSONError (and every CLI that catches ProtocolError) turns it into its own refusal."""
    assert issubclass(JSONDepthError, CanonicalJSONError)
    assert issubclass(CanonicalJSONError, ProtocolError) and issubclass(CanonicalJSONError, ValueError)


def test_brackets_inside_strings_do_not_count() -> None:
    deep_text = json.dumps(["[" * 5000, {"k": "{" * 5000 + '\\"[[['}]).encode()
    assert json_depth(deep_text) == 2
    assert canonical.loads(deep_text)[0] == "[" * 5000


def test_escaped_quotes_do_not_end_a_string() -> None:
    data = b'["\\"' + b"[" * 200 + b'"]'
    assert json_depth(data) == 1
    assert canonical.loads(data) == ['"' + "[" * 200]


def test_unterminated_string_full_of_escaped_quotes_is_scanned_in_linear_time() -> None:
    """A string regex that retried at every later quote would take minutes here."""
    data = b"[" * (MAX_DEPTH + 1) + b'"' + b'\\"' * 200_000
    started = time.perf_counter()
    with pytest.raises(CanonicalJSONError):
        canonical.loads(data)
    assert time.perf_counter() - started < 5


_TRICKY_TEXT = st.text(alphabet='[]{}"\\ab', max_size=8)  # brackets, quotes and backslashes inside strings
_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), _TRICKY_TEXT),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_TRICKY_TEXT, inner, max_size=3)),
    max_leaves=30,
)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(_VALUES)
def test_scanned_depth_is_the_parsed_depth(value) -> None:
    def depth(v) -> int:
        if isinstance(v, list):
            return 1 + max(map(depth, v), default=0)
        if isinstance(v, dict):
            return 1 + max(map(depth, v.values()), default=0)
        return 0

    data = canonical.dumps(value)
    assert json_depth(data) == depth(value)
    check_depth(data)


def test_deep_signed_message_is_a_signature_error() -> None:
    with pytest.raises(SignatureError):
        verify_message(nested(100_000), kind="offer", signer=ENTITY.card)


def test_deep_sealed_bundle_header_is_a_seal_error() -> None:
    header = nested(30_000)  # within the header size limit, far past the depth limit
    blob = SEAL_MAGIC + struct.pack(">I", len(header)) + header + b"\0" * 64
    with pytest.raises(SealError, match="nests deeper"):
        open_bundle(blob, kind="model-request", job_id="job-1", request_hash="0" * 64, recipient=ENTITY, senders={})


def test_deep_safetensors_header_is_an_artifact_error() -> None:
    import struct

    from protocol._wire.safetensors import parse_header
    from protocol.errors import ArtifactError

    header = b'{"__metadata__":' + b"[" * 5000 + b"]" * 5000 + b"}"
    with pytest.raises(ArtifactError, match="nests deeper"):
        parse_header(struct.pack("<Q", len(header)) + header)


def test_deep_program_json_is_an_egress_block() -> None:
    from protocol.errors import EgressViolation
    from protocol.program_guard import check_program

    with pytest.raises(EgressViolation, match="nests deeper"):
        check_program(b"[" * 5000 + b"]" * 5000)


def test_deep_audit_line_fails_verification_cleanly(tmp_path) -> None:
    from protocol.audit import verify_log
    from protocol.keys import Identity

    log = tmp_path / "audit.jsonl"
    log.write_bytes(b"[" * 100_000 + b"]" * 100_000 + b"\n")
    verdict = verify_log(log, owner=Identity.generate("owner").card)
    assert not verdict.ok and "nests deeper" in (verdict.error or "")
