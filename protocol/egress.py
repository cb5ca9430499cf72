"""The owner's egress guard: every outbound payload is checked before it is sealed and sent.

The guard knows the model's schema (tensor name -> (dtype, shape)) and admits exactly that: the
expected files and nothing else; in ``weights.safetensors`` exactly the schema's tensors, with no
metadata beyond an allow-list, finite values, and bytes equal to a fresh serialisation of those
tensors (so no padding, alignment, ordering or duplicate-key channel can carry extra bytes);
``request.json`` in canonical form with exactly the request fields; claims from an allow-list;
a bounded total size. Any violation raises ``EgressViolation`` with a one-line reason, after
being logged (and written to the audit log when one is given). The guard never repairs a payload.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import canonical
from ._wire.pickles import reject_pickles
from .errors import ArtifactError, EgressViolation, ProtocolError
from .program_guard import check_program
from .spec import InputSpec, PruneRequest, SpecError
from .tensors import Schema, check_safetensors, schema_of

log = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.safetensors"
CONSTANTS_FILE = "constants.safetensors"
PROGRAM_FILE = "program.json"
REQUEST_FILE = "request.json"
MODEL_ARTIFACT_FILES = frozenset({PROGRAM_FILE, WEIGHTS_FILE, REQUEST_FILE})
REQUEST_FIELDS = frozenset({"job_id", "nonce", "prune", "input_spec"})
# Buffers that count training steps: ``num_batches_tracked`` is epochs x dataset size / batch size,
# a fact about the private data that pruning never needs. ``redact_counters`` zeroes them.
DATA_COUNTERS: tuple[str, ...] = ("num_batches_tracked",)

__all__ = ["DATA_COUNTERS", "EgressGuard", "Schema", "redact_counters", "schema_of"]


def redact_counters(state_dict: Mapping[str, Any], suffixes: tuple[str, ...] = DATA_COUNTERS) -> dict[str, Any]:
    """A copy of ``state_dict`` with every tensor named ``*<suffix>`` replaced by zeros."""
    return {name: (t.new_zeros(t.shape) if name.endswith(suffixes) else t) for name, t in state_dict.items()}


@dataclass(frozen=True)
class EgressGuard:
    """Admits exactly the model's schema and nothing else; see the module docstring.

    ``files``: the exact set of file names a payload must have (default: a model artifact).
    ``constants_schema``: the graph's non-persistent tensor constants; when non-empty,
    ``constants.safetensors`` must be present and hold exactly these (same checks as weights).
    ``allowed_metadata``: safetensors ``__metadata__`` keys tolerated (values still compared
    through the fresh re-serialisation). ``allowed_claims``: claim keys tolerated.
    ``program_check``: the check of ``program.json`` bytes; the default,
    ``program_guard.check_program``, refuses stack traces and other node metadata and hidden
    bytes (``None``: valid JSON only). A custom check should raise ``ProtocolError``. ``on_violation``: called with the reason before
    raising (e.g. ``lambda r: audit.append("egress.blocked", {"reason": r})``).
    """

    schema: Schema
    max_bytes: int
    files: frozenset[str] = MODEL_ARTIFACT_FILES
    constants_schema: Schema = field(default_factory=dict)
    allowed_metadata: frozenset[str] = frozenset()
    allowed_claims: frozenset[str] = frozenset()
    zero_tensors: tuple[str, ...] = ()
    max_program_bytes: int = 64 * 1024 * 1024
    max_claims_bytes: int = 64 * 1024
    program_check: Callable[[bytes], None] | None = field(default=check_program, compare=False)
    on_violation: Callable[[str], None] | None = field(default=None, compare=False)

    def check(self, files: Mapping[str, bytes], claims: Mapping[str, Any] | None = None) -> None:
        """Return ``None`` if the payload may leave, else raise ``EgressViolation``."""
        try:
            self._check(files, dict(claims or {}))
        except EgressViolation as exc:
            self._blocked(str(exc))
            raise
        except (ProtocolError, SpecError, canonical.CanonicalJSONError) as exc:
            reason = f"egress blocked: {exc}"
            self._blocked(reason)
            raise EgressViolation(reason) from exc

    def _blocked(self, reason: str) -> None:
        log.warning("%s", reason)
        if self.on_violation is not None:
            self.on_violation(reason)

    def _check(self, files: Mapping[str, bytes], claims: dict[str, Any]) -> None:
        total = sum(len(b) for b in files.values())
        if total > self.max_bytes:
            raise EgressViolation(f"egress blocked: payload of {total} bytes exceeds the {self.max_bytes}-byte bound")
        expected = self.files | ({CONSTANTS_FILE} if self.constants_schema else set())
        extra = sorted(set(files) - expected)
        missing = sorted(expected - set(files))
        if extra:
            raise EgressViolation(f"egress blocked: unexpected file(s) {', '.join(extra)}")
        if missing:
            raise EgressViolation(f"egress blocked: missing file(s) {', '.join(missing)}")
        for name in sorted(files):
            if not isinstance(files[name], (bytes, bytearray)):
                raise EgressViolation(f"egress blocked: {name} is not bytes")
            reject_pickles(name, files[name])
        self._check_claims(claims)
        if WEIGHTS_FILE in files:
            self._check_tensors(bytes(files[WEIGHTS_FILE]), self.schema, WEIGHTS_FILE)
        if CONSTANTS_FILE in files:
            self._check_tensors(bytes(files[CONSTANTS_FILE]), self.constants_schema, CONSTANTS_FILE)
        if REQUEST_FILE in files:
            self._check_request(bytes(files[REQUEST_FILE]))
        if PROGRAM_FILE in files:
            self._check_program(bytes(files[PROGRAM_FILE]))

    def _check_claims(self, claims: dict[str, Any]) -> None:
        extra = sorted(set(claims) - self.allowed_claims)
        if extra:
            raise EgressViolation(f"egress blocked: claim(s) not on the allow-list: {', '.join(extra)}")
        if len(canonical.dumps(claims)) > self.max_claims_bytes:
            raise EgressViolation("egress blocked: claims too large")

    def _check_tensors(self, data: bytes, schema: Schema, what: str) -> None:
        try:
            tensors = check_safetensors(data, schema, what=what, allowed_metadata=self.allowed_metadata)
        except ArtifactError as exc:
            raise EgressViolation(f"egress blocked: {exc}") from exc
        for name in sorted(tensors):
            if name.endswith(self.zero_tensors) and self.zero_tensors and bool(tensors[name].any()):
                raise EgressViolation(
                    f"egress blocked: {name} is not zero; it counts training batches (a fact about the private data): "
                    "zero it with protocol.egress.redact_counters before export"
                )

    def _check_request(self, data: bytes) -> None:
        request = canonical.loads(data)
        if canonical.dumps(request) != data:
            raise EgressViolation("egress blocked: request.json is not in canonical form")
        if not isinstance(request, dict) or set(request) != REQUEST_FIELDS:
            got = sorted(request) if isinstance(request, dict) else type(request).__name__
            raise EgressViolation(f"egress blocked: request.json fields must be {sorted(REQUEST_FIELDS)}, got {got}")
        if not isinstance(request["job_id"], str) or not isinstance(request["nonce"], str):
            raise EgressViolation("egress blocked: request.json job_id and nonce must be strings")
        if len(request["job_id"]) > 256 or len(request["nonce"]) > 256:
            raise EgressViolation("egress blocked: request.json job_id or nonce too long")
        if PruneRequest.from_json(request["prune"]).to_json() != request["prune"]:
            raise EgressViolation("egress blocked: request.json 'prune' holds fields beyond a pruning request")
        if InputSpec.from_json(request["input_spec"]).to_json() != request["input_spec"]:
            raise EgressViolation("egress blocked: request.json 'input_spec' holds fields beyond an input specification")

    def _check_program(self, data: bytes) -> None:
        if len(data) > self.max_program_bytes:
            raise EgressViolation(f"egress blocked: program.json exceeds {self.max_program_bytes} bytes")
        if self.program_check is None:
            try:
                json.loads(data.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
                raise EgressViolation("egress blocked: program.json is not valid JSON") from exc
        else:
            self.program_check(data)
