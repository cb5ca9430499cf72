"""Egress guard: exactly the model's schema leaves, nothing else."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save

from protocol import canonical
from protocol.artifact import program_from_files, program_to_files
from protocol.egress import EgressGuard, schema_of
from protocol.errors import EgressViolation
from protocol.program_guard import check_program, strip_program
from protocol.spec import InputSpec, PruneRequest


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(4 * 26 * 26, 10))


_EXPORTED: dict[str, bytes] = {}


def _exported() -> dict[str, bytes]:
    if not _EXPORTED:
        program = torch.export.export(_model().eval(), (torch.zeros(1, 1, 28, 28),))
        _EXPORTED.update(program_to_files(program))
    return _EXPORTED


def _program() -> bytes:
    return strip_program(_exported()["program.json"])


def _request() -> bytes:
    spec = InputSpec(shape=(1, 28, 28), mean=(0.2860,), std=(0.3530,))
    return canonical.dumps({"job_id": "job-1", "nonce": "ab" * 16, "prune": PruneRequest(rate=8.0).to_json(), "input_spec": spec.to_json()})


def _payload(state: dict[str, torch.Tensor] | None = None, **extra: bytes) -> dict[str, bytes]:
    state = state if state is not None else _model().state_dict()
    return {"program.json": _program(), "weights.safetensors": save(state), "request.json": _request(), **extra}


def _guard(**kw) -> EgressGuard:
    return EgressGuard(schema=schema_of(_model().state_dict()), max_bytes=10_000_000, **kw)


def test_honest_model_artifact_passes() -> None:
    _guard().check(_payload(), {})


def test_data_batch_file_is_blocked() -> None:
    batch = save({"images": torch.rand(32, 1, 28, 28), "labels": torch.randint(0, 10, (32,))})
    with pytest.raises(EgressViolation, match="unexpected file.*batch.safetensors"):
        _guard().check(_payload(**{"batch.safetensors": batch}), {})


def test_data_batch_inside_weights_is_blocked() -> None:
    state = dict(_model().state_dict())
    state["images"] = torch.rand(32, 1, 28, 28)
    with pytest.raises(EgressViolation, match="not in the model schema: images"):
        _guard().check(_payload(state), {})


def test_extra_tensor_is_blocked_and_missing_one_too() -> None:
    state = dict(_model().state_dict())
    state["extra.weight"] = torch.zeros(3)
    with pytest.raises(EgressViolation, match="extra.weight"):
        _guard().check(_payload(state), {})
    state = dict(_model().state_dict())
    del state["3.bias"]
    with pytest.raises(EgressViolation, match="missing: 3.bias"):
        _guard().check(_payload(state), {})


def test_wrong_shape_or_dtype_is_blocked() -> None:
    state = dict(_model().state_dict())
    state["3.bias"] = torch.zeros(11)
    with pytest.raises(EgressViolation, match="3.bias"):
        _guard().check(_payload(state), {})
    state["3.bias"] = torch.zeros(10, dtype=torch.float64)
    with pytest.raises(EgressViolation, match="F64"):
        _guard().check(_payload(state), {})


def test_smuggled_metadata_is_blocked() -> None:
    files = _payload()
    files["weights.safetensors"] = save(_model().state_dict(), metadata={"mean_pixel": "0.2860", "note": "patient 17"})
    with pytest.raises(EgressViolation, match="metadata key.*mean_pixel"):
        _guard().check(files, {})


def test_nan_and_inf_payloads_are_blocked() -> None:
    for bad in (float("nan"), float("inf")):
        state = dict(_model().state_dict())
        weight = state["0.weight"].clone()
        weight[0, 0, 0, 0] = bad
        state["0.weight"] = weight
        with pytest.raises(EgressViolation, match="NaN or infinite"):
            _guard().check(_payload(state), {})


def test_padding_channel_in_header_is_blocked() -> None:
    data = save(_model().state_dict())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    padded = json.dumps(header).encode() + b" " * 64  # different spacing and padding carry bits
    files = _payload()
    files["weights.safetensors"] = struct.pack("<Q", len(padded)) + padded + data[8 + n :]
    with pytest.raises(EgressViolation, match="fresh serialisation"):
        _guard().check(files, {})


def test_duplicate_key_channel_is_blocked() -> None:
    data = save({"a": torch.zeros(2)})
    (n,) = struct.unpack("<Q", data[:8])
    raw = data[8 : 8 + n].decode().rstrip()
    dup = raw[:-1] + ',"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    guard = EgressGuard(schema={"a": ("F32", (2,))}, max_bytes=10_000, files=frozenset({"weights.safetensors"}))
    with pytest.raises(EgressViolation, match="duplicate key"):
        guard.check({"weights.safetensors": struct.pack("<Q", len(dup)) + dup.encode() + data[8 + n :]}, {})


def test_request_with_extra_or_non_canonical_fields_is_blocked() -> None:
    request = canonical.loads(_request())
    request["input_spec"]["dataset_size"] = 60000
    with pytest.raises(EgressViolation, match="input_spec"):
        _guard().check({**_payload(), "request.json": canonical.dumps(request)}, {})
    request = canonical.loads(_request())
    request["histogram"] = [1, 2, 3]
    with pytest.raises(EgressViolation, match="fields must be"):
        _guard().check({**_payload(), "request.json": canonical.dumps(request)}, {})
    with pytest.raises(EgressViolation, match="canonical form"):
        _guard().check({**_payload(), "request.json": json.dumps(canonical.loads(_request()), indent=1).encode()}, {})


def test_claims_outside_the_allow_list_are_blocked() -> None:
    with pytest.raises(EgressViolation, match="accuracy"):
        _guard().check(_payload(), {"accuracy": "0.91"})
    _guard(allowed_claims=frozenset({"accuracy"})).check(_payload(), {"accuracy": "0.91"})


def test_size_bound_is_enforced() -> None:
    with pytest.raises(EgressViolation, match="exceeds"):
        EgressGuard(schema=schema_of(_model().state_dict()), max_bytes=1000).check(_payload(), {})


def test_violation_is_reported_before_raising(caplog: pytest.LogCaptureFixture) -> None:
    reasons: list[str] = []
    guard = _guard(on_violation=reasons.append)
    with pytest.raises(EgressViolation) as info:
        guard.check(_payload(**{"x.bin": b"1"}), {})
    assert reasons == [str(info.value)]
    assert "\n" not in str(info.value)
    assert any("egress blocked" in r.message for r in caplog.records)


class _OwnersForward(torch.nn.Sequential):
    """The same layers as ``_model`` with a forward written here: owner code torch records."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x)
        return x


def test_program_with_stack_traces_of_owner_code_is_blocked() -> None:
    program = torch.export.export(_OwnersForward(*_model()).eval(), (torch.zeros(1, 1, 28, 28),))
    raw = program_to_files(program, strip=False)["program.json"]
    assert b"stack_trace" in raw  # what torch.export records: paths and source lines of the owner's code
    with pytest.raises(EgressViolation, match="stack_trace"):
        _guard().check({**_payload(), "program.json": raw}, {})


def test_stripped_program_still_rebuilds_the_same_model() -> None:
    files = {"program.json": _program(), "weights.safetensors": _exported()["weights.safetensors"]}
    check_program(files["program.json"])
    assert b"stack_trace" not in files["program.json"] and b"nn_module_stack" not in files["program.json"]
    rebuilt = program_from_files(files).module()
    x = torch.rand(1, 1, 28, 28)
    assert torch.allclose(rebuilt(x), _model().eval()(x), atol=1e-6)


def test_program_with_hidden_whitespace_or_extra_json_is_blocked() -> None:
    with pytest.raises(EgressViolation, match="fresh encoding"):
        _guard().check({**_payload(), "program.json": _program() + b" "}, {})
    with pytest.raises(EgressViolation, match="not valid JSON"):
        _guard().check({**_payload(), "program.json": b'{"graph_module": '}, {})
    with pytest.raises(EgressViolation, match="not a serialized exported program"):
        _guard().check({**_payload(), "program.json": b'{"secret": "data"}'}, {})


def test_custom_program_check_replaces_the_default() -> None:
    def no_graph(data: bytes) -> None:
        raise EgressViolation("egress blocked: no graphs today")

    with pytest.raises(EgressViolation, match="no graphs today"):
        _guard(program_check=no_graph).check(_payload(), {})


def test_batch_counters_are_blocked_when_configured_and_redaction_passes() -> None:
    from protocol.egress import DATA_COUNTERS, redact_counters

    model = _model()
    model.train()
    for _ in range(3):
        model(torch.rand(8, 1, 28, 28))  # num_batches_tracked becomes 3: "trained on 3 batches"
    state = model.state_dict()
    guard = _guard(zero_tensors=DATA_COUNTERS)
    with pytest.raises(EgressViolation, match="1.num_batches_tracked is not zero"):
        guard.check(_payload(state), {})
    redacted = redact_counters(state)
    assert int(redacted["1.num_batches_tracked"]) == 0 and torch.equal(redacted["0.weight"], state["0.weight"])
    guard.check(_payload(redacted), {})
    _guard().check(_payload(state), {})  # off unless asked for
