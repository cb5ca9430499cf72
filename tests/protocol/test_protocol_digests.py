"""A safetensors file is cited by a digest derived from its tensor digests (its bytes hashed once).

The derived digest must bind every byte of the file as a plain SHA-256 would: any changed
header or tensor byte fails, a forged statement that cites another file by it is refused, and
statements from older senders (plain SHA-256 of every file) still verify.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
import torch
from safetensors.torch import save

from protocol._wire.safetensors import TREE_DIGEST, parse_header, tensor_digests, tree_digest
from protocol.errors import ArtifactError, SignatureError
from protocol.keys import Identity
from protocol.signing import digest, make_statement
from protocol.verifying import check_statement

OWNER = Identity.generate("owner", "clinic")
ENTITY = Identity.generate("entity", "service")
BIND: dict[str, Any] = dict(kind="model", job_id="j1", request_hash=digest(b"offer"), sender=OWNER.card, recipient=ENTITY.card)


def _files() -> dict[str, bytes]:
    torch.manual_seed(0)
    weights = save({"conv.weight": torch.randn(4, 3, 3, 3), "fc.bias": torch.zeros(10), "empty": torch.zeros(0)})
    return {"program.json": b'{"graph": []}', "weights.safetensors": weights}


def _statement(files: dict[str, bytes]) -> dict[str, Any]:
    return make_statement(files, claims={}, **BIND)


def test_safetensors_file_is_cited_by_its_derived_digest_and_others_by_sha256() -> None:
    files = _files()
    subjects = {s["name"]: s["digest"] for s in _statement(files)["subject"]}
    data = files["weights.safetensors"]
    header = parse_header(data)
    assert subjects["weights.safetensors"] == {TREE_DIGEST: tree_digest(data, header, tensor_digests(data, header))}
    assert subjects["program.json"] == {"sha256": hashlib.sha256(files["program.json"]).hexdigest()}


@pytest.mark.parametrize("where", ["header", "first tensor", "last byte"])
def test_any_changed_byte_of_a_safetensors_file_fails_verification(where: str) -> None:
    files = _files()
    statement = _statement(files)
    data = bytearray(files["weights.safetensors"])
    header = parse_header(bytes(data))
    offset = {"header": 8 + header.header_len - 3, "first tensor": 8 + header.header_len, "last byte": len(data) - 1}[where]
    data[offset] ^= 0x01
    files["weights.safetensors"] = bytes(data)
    with pytest.raises(ArtifactError):
        check_statement(statement, files, **BIND)


def test_derived_digest_differs_from_one_over_renamed_tensors() -> None:
    a = save({"x": torch.ones(3), "y": torch.zeros(3)})
    b = save({"x": torch.zeros(3), "y": torch.ones(3)})
    da, db = (tree_digest(d, h, tensor_digests(d, h)) for d, h in ((a, parse_header(a)), (b, parse_header(b))))
    assert da != db


def test_statement_citing_a_plain_file_by_the_derived_digest_is_refused() -> None:
    files = _files()
    statement = _statement(files)
    for subject in statement["subject"]:
        if subject["name"] == "program.json":
            subject["digest"] = {TREE_DIGEST: subject["digest"]["sha256"]}
    with pytest.raises(SignatureError, match="unknown digest"):
        check_statement(statement, files, **BIND)


def test_statement_from_an_older_sender_with_plain_sha256_still_verifies_and_detects_tampering() -> None:
    files = _files()
    statement = _statement(files)
    for subject in statement["subject"]:
        subject["digest"] = {"sha256": hashlib.sha256(files[subject["name"]]).hexdigest()}
    check_statement(statement, files, **BIND)
    data = bytearray(files["weights.safetensors"])
    data[-1] ^= 0x01
    with pytest.raises(ArtifactError):
        check_statement(statement, {**files, "weights.safetensors": bytes(data)}, **BIND)
