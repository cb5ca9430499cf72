"""The contract between the owner and the entity, in one place: what each message is and holds.

Three signed or sealed kinds cross per job (DESIGN "One job, message by message"): the entity's
``offer``, the owner's ``model-request`` bundle and the entity's ``prune-result`` bundle, each
carried by a Flower message of a fixed type. This module names them, names every file a bundle
holds, and turns the files of an opened bundle into the one trusted view of it:

* ``ModelRequest.from_files`` (entity side) checks ``request.json`` for shape and types and
  leaves the graph files to ``artifact.check_program_files``;
* ``PruneResult.from_files`` (owner side) runs every content check the owner owes itself before
  anything of the result is logged or used (DESIGN "Threat model", a malicious or broken entity):
  exactly the model's tensors, every one finite, BatchNorm variances positive, masks only of the
  kind the owner's own graph allows for each weight (library patterns on 3x3 and depthwise 3x3
  convs, whole input columns on 1x1 convs and linear layers, nothing elsewhere) at the conv,
  whole-model and per-layer rates the report claims, a recipe within the owner's limits, bounded
  JSON, and the entity's signatures on receipt and countersignature.

Both sides build and read bundles through these types, so a file name or a field is defined once.
Every refusal is a ``ProtocolError`` whose text is ours (the other party's text, where quoted, is
escaped by ``display.printable``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any

import torch

from . import canonical
from .artifact import CONSTANTS_FILE, PROGRAM_FILE, WEIGHTS_FILE, dump_tensors
from .audit import COUNTERSIGN_KIND, RECEIPT_KIND
from .display import printable
from .errors import ArtifactError, MaskError, RequestError
from .masks import MaskSummary, check_result_masks, pack_masks, parse_library, unpack_masks
from .spec import InputSpec, PruneRequest, RetrainLimits, RetrainRecipe, SpecError
from .tensors import GraphRoles, check_masks, check_running_vars, check_safetensors, schema_of

__all__ = [
    "ADMISSION_KIND",
    "ADMITTED",
    "Admission",
    "COUNTERSIGNATURE_FILE",
    "FINISH",
    "HELLO_KIND",
    "Hello",
    "INTENTS",
    "JOB_STATES",
    "JobStatus",
    "MASKS_FILE",
    "MAX_ID_CHARS",
    "MAX_RECIPE_BYTES",
    "MAX_REPORT_BYTES",
    "MESSAGE_TYPES",
    "ModelRequest",
    "OFFER",
    "OFFER_KIND",
    "PruneResult",
    "RECEIPT_FILE",
    "RECIPE_FILE",
    "REFUSED",
    "REPORT_FILE",
    "REQUEST_FIELDS",
    "REQUEST_FILE",
    "REQUEST_KIND",
    "REQUEST_OPTIONAL",
    "REQUEST_REQUIRED",
    "RESULT",
    "RESULT_KIND",
    "RESULT_OPTIONAL",
    "RESULT_REQUIRED",
    "STATUS",
    "STATUS_KIND",
    "check_files",
    "json_kind",
]

# ------------------------------------------------------------------------------ signed kinds
OFFER_KIND = "offer"  # entity -> owner: a signed message (job id, nonce, what it supports)
HELLO_KIND = "owner-hello"  # owner -> entity: a signed message (who, for which offer, what it wants)
ADMISSION_KIND = "admission"  # entity -> owner: a signed answer to the hello (admitted, queue)
STATUS_KIND = "job-status"  # entity -> owner: a signed status of a job (queued, pruning, done)
REQUEST_KIND = "model-request"  # owner -> entity: a sealed bundle (graph, weights, request.json)
RESULT_KIND = "prune-result"  # entity -> owner: a sealed bundle (pruned weights, masks, report...)
# RECEIPT_KIND (what the entity received, signed) and COUNTERSIGN_KIND (the owner's checkpoint,
# countersigned) ride in the result as files; they belong to the audit trail, which defines them.

# ------------------------------------------------------------------------------ Flower message types
# Flower's ``query.<action>`` convention, one handler per type on the owner's ClientApp.
OFFER = "query.offer"  # entity -> owner: signed offer; reply: signed hello (or declined)
ADMITTED = "query.admitted"  # entity -> owner: signed admission; reply: sealed model request (or noted, for a check)
STATUS = "query.status"  # entity -> owner: signed job status; reply: acknowledgement
RESULT = "query.result"  # entity -> owner: sealed pruning result; reply: acknowledgement
REFUSED = "query.refused"  # entity -> owner: the request was refused (reason); reply: acknowledgement
FINISH = "query.finish"  # entity -> owner: the job is over; reply: goodbye
MESSAGE_TYPES = frozenset({OFFER, ADMITTED, STATUS, RESULT, REFUSED, FINISH})

# ------------------------------------------------------------------------------ bundle files
REQUEST_FILE = "request.json"
MASKS_FILE = "masks.bin"
REPORT_FILE = "report.json"
RECIPE_FILE = "recipe.json"
RECEIPT_FILE = "receipt.json"
COUNTERSIGNATURE_FILE = "countersignature.json"
REQUEST_REQUIRED = frozenset({PROGRAM_FILE, WEIGHTS_FILE, REQUEST_FILE})
REQUEST_OPTIONAL = frozenset({CONSTANTS_FILE})
RESULT_REQUIRED = frozenset({WEIGHTS_FILE, MASKS_FILE, REPORT_FILE, RECIPE_FILE, RECEIPT_FILE})
RESULT_OPTIONAL = frozenset({COUNTERSIGNATURE_FILE})

MAX_ID_CHARS = 256
# A report lists a few facts per layer; a megabyte is thousands of layers. A recipe is a dozen keys.
MAX_REPORT_BYTES = 1024 * 1024
MAX_RECIPE_BYTES = 16 * 1024
REQUEST_FIELDS: Mapping[str, type] = {"job_id": str, "nonce": str, "prune": dict, "input_spec": dict}


def check_files(files: Mapping[str, bytes], required: frozenset[str], optional: frozenset[str], what: str, reader: str) -> None:
    """Exactly the files a bundle of this kind holds: none missing, none extra (named)."""
    missing = sorted(required - set(files))
    extra = sorted(set(files) - required - optional)
    if missing:
        raise ArtifactError(f"the {what} lacks {', '.join(missing)}")
    if extra:
        raise ArtifactError(f"the {what} holds files the {reader} does not accept: {', '.join(extra[:5])}")


def json_kind(value: Any) -> str:
    """The JSON name of a decoded value's type, for error texts that must not echo the value."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, int):
        return "number"
    return "null"


def _bounded_json(data: bytes, what: str, limit: int) -> Any:
    """One JSON file from the other party: bounded size, then ``canonical.loads`` (depth-limited)."""
    if len(data) > limit:
        raise ArtifactError(f"{what} is {len(data)} bytes, over the {limit}-byte limit")
    try:
        return canonical.loads(data)
    except canonical.CanonicalJSONError as exc:
        raise ArtifactError(f"{what} is not valid canonical JSON: {exc}") from None


# ------------------------------------------------------------------------------ owner -> entity
@dataclass(frozen=True)
class ModelRequest:
    """The owner's request bundle: the exported model's files plus ``request.json``."""

    job_id: str
    nonce: str
    prune: PruneRequest
    spec: InputSpec
    artifact: Mapping[str, bytes] = field(repr=False)  # program.json, weights (and constants)

    def to_json(self) -> dict[str, Any]:
        """``request.json`` as it is signed and logged."""
        return {"job_id": self.job_id, "nonce": self.nonce, "prune": self.prune.to_json(), "input_spec": self.spec.to_json()}

    def files(self) -> dict[str, bytes]:
        """The bundle's files, ready for the egress guard and sealing."""
        return {**self.artifact, REQUEST_FILE: canonical.dumps(self.to_json())}

    @classmethod
    def from_files(cls, files: Mapping[str, bytes]) -> ModelRequest:
        """The request of an opened bundle; ``RequestError`` with our own text for anything off.

        The owner controls these bytes, so a list, a float, deep nesting or a field of the wrong
        type is refused before anything reads ``request.json``, never by an exception deeper down.
        """
        try:
            check_files(files, REQUEST_REQUIRED, REQUEST_OPTIONAL, "request", "entity")
        except ArtifactError as exc:
            raise RequestError(str(exc)) from None
        try:
            request = canonical.loads(files[REQUEST_FILE])
        except canonical.JSONDepthError as exc:
            raise RequestError(f"request.json nests deeper than {canonical.MAX_DEPTH} levels: send a flat request") from exc
        except canonical.CanonicalJSONError as exc:
            raise RequestError(f"request.json is not canonical JSON ({exc}): send it as canonical.dumps writes it") from exc
        if not isinstance(request, dict):
            raise RequestError(f"request.json must be a JSON object, got a JSON {json_kind(request)}")
        if set(request) != set(REQUEST_FIELDS):
            raise RequestError(f"request.json must hold exactly the fields {', '.join(REQUEST_FIELDS)}")
        for name, kind in REQUEST_FIELDS.items():
            if not isinstance(request[name], kind):
                raise RequestError(f"request.json field {name} must be a JSON {json_kind(kind())}, got a JSON {json_kind(request[name])}")
        if any(len(request[name]) > MAX_ID_CHARS for name in ("job_id", "nonce")):
            raise RequestError(f"request.json job_id and nonce must be at most {MAX_ID_CHARS} characters")
        try:
            prune, spec = PruneRequest.from_json(request["prune"]), InputSpec.from_json(request["input_spec"])
        except SpecError as exc:
            raise RequestError(f"request.json: {exc}") from exc
        artifact = {name: data for name, data in files.items() if name != REQUEST_FILE}
        return cls(request["job_id"], request["nonce"], prune, spec, artifact)


# ------------------------------------------------------------------------------ entity -> owner
@dataclass(frozen=True)
class PruneResult:
    """The entity's result bundle. Built by the entity; read by the owner only through ``from_files``."""

    weights: Mapping[str, torch.Tensor] = field(repr=False)
    masks: Mapping[str, torch.Tensor] = field(repr=False)
    report: Mapping[str, Any]
    recipe: RetrainRecipe
    receipt: bytes = field(repr=False)
    countersignature: bytes | None = field(default=None, repr=False)

    @property
    def recipe_name(self) -> str | None:
        """The pruning recipe the report names (checked to be a short name by ``from_files``)."""
        name = self.report.get("recipe")
        return name if isinstance(name, str) else None

    @property
    def achieved_rate(self) -> str | None:
        """The conv compression rate the report claims (checked against the masks by ``from_files``)."""
        rate = self.report.get("achieved_rate")
        return rate if isinstance(rate, str) else None

    @property
    def achieved_model_rate(self) -> str | None:
        """The whole-model compression rate the report claims (checked against the masks by ``from_files``)."""
        rate = self.report.get("achieved_model_rate")
        return rate if isinstance(rate, str) else None

    def files(self) -> dict[str, bytes]:
        """The bundle's files, ready for sealing."""
        out = {
            WEIGHTS_FILE: dump_tensors(self.weights),
            MASKS_FILE: pack_masks(self.masks),
            REPORT_FILE: canonical.dumps(dict(self.report)),
            RECIPE_FILE: canonical.dumps(self.recipe.to_json()),
            RECEIPT_FILE: self.receipt,
        }
        if self.countersignature is not None:
            out[COUNTERSIGNATURE_FILE] = self.countersignature
        return out

    @classmethod
    def from_files(
        cls,
        files: Mapping[str, bytes],
        *,
        dense: Mapping[str, torch.Tensor],
        roles: GraphRoles,
        limits: RetrainLimits,
        verify_signed: Any,
        request: PruneRequest | None = None,
    ) -> PruneResult:
        """Every content check of an opened result, against the owner's own model; logs nothing.

        ``dense`` is the owner's state dict and ``roles`` what the owner's own graph says each
        tensor is (``tensors.graph_roles``): never what the entity says about them.
        ``verify_signed(blob, kind)`` checks the entity's signature on the receipt and the
        countersignature (the audit log checks their content against its records on append).
        ``request`` is what the owner asked for: without a whole-model rate in it, the 1x1 and
        linear layers must come back unmasked.
        Raises ``ProtocolError`` (``ArtifactError``, ``MaskError``, ``SpecError``...).
        """
        check_files(files, RESULT_REQUIRED, RESULT_OPTIONAL, "result", "owner")
        schema = schema_of(dense)
        # Exactly the model's tensors, dtypes and shapes, every floating-point value finite.
        weights = check_safetensors(files[WEIGHTS_FILE], schema, what="pruned weights")
        check_running_vars(weights, roles.running_vars, dense)
        masks = unpack_masks(files[MASKS_FILE])
        check_masks(masks, schema)
        report = _bounded_json(files[REPORT_FILE], REPORT_FILE, MAX_REPORT_BYTES)
        if not isinstance(report, dict):
            raise ArtifactError("report.json is not a JSON object")
        library = parse_library(report["library"]) if "library" in report else None
        if request is not None and request.model_rate is None:
            for name in sorted(set(masks) & roles.structured):
                raise MaskError(f"mask {name!r} is on a 1x1 or linear weight, but the request named no whole-model rate: those layers stay dense")
        summary = check_result_masks(
            masks, pattern=roles.pattern_convs, depthwise=roles.depthwise_convs, structured=roles.structured, library=library
        )
        for name, mask in sorted(masks.items()):
            if torch.count_nonzero(weights[name][~mask]):
                raise ArtifactError(f"pruned weight {name!r} is nonzero where its mask prunes it")
        _check_claimed_rates(report, summary, roles, dense)
        recipe_name = report.get("recipe")
        if recipe_name is not None and not (isinstance(recipe_name, str) and 1 <= len(recipe_name) <= 64):
            raise ArtifactError("report.json: recipe must be a name of at most 64 characters")
        recipe = RetrainRecipe.from_json(_bounded_json(files[RECIPE_FILE], RECIPE_FILE, MAX_RECIPE_BYTES))
        limits.check(recipe)
        verify_signed(files[RECEIPT_FILE], RECEIPT_KIND)
        countersignature = files.get(COUNTERSIGNATURE_FILE)
        if countersignature is not None:
            verify_signed(countersignature, COUNTERSIGN_KIND)
        return cls(weights, masks, report, recipe, files[RECEIPT_FILE], countersignature)


def _check_claimed_rate(claim: Any, total: int, kept: int, field: str = "achieved_rate", what: str = "an achieved rate") -> str:
    """A report's rate ``field`` if ``total / kept`` is what it claims (within the claim's own rounding)."""
    if not isinstance(claim, str) or not 1 <= len(claim) <= 32:
        raise ArtifactError(f"report.json: {field} must be a short decimal string")
    try:
        dec = Decimal(claim)
    except InvalidOperation:
        raise ArtifactError(f"report.json: {field} is not a decimal number") from None
    if not dec.is_finite() or dec < 1:
        raise ArtifactError(f"report.json: {field} must be a finite rate >= 1")
    if kept == 0:
        raise ArtifactError("the masks keep no weight at all")
    actual = Fraction(total, kept)
    half_ulp = Fraction(1, 2) * Fraction(10) ** int(dec.as_tuple().exponent)  # "8.0312" claims +-0.00005
    if abs(Fraction(dec) - actual) > half_ulp + Fraction(1, 10**9):
        raise ArtifactError(
            f"report.json claims {what} of {printable(claim, 32)}, the masks achieve {float(actual):.4f} ({total} weights, {kept} kept)"
        )
    return claim


_LAYER_KINDS = {"3x3": ("3x3",), "depthwise": ("depthwise",), "1x1 or linear": ("1x1", "linear")}


def _check_claimed_rates(report: Mapping[str, Any], summary: MaskSummary, roles: GraphRoles, dense: Mapping[str, torch.Tensor]) -> None:
    """Every rate the report claims, recomputed from the masks and the owner's own model.

    The conv rate (``achieved_rate``, with ``prunable_weights`` / ``kept_weights``) is over the
    masked group-1 3x3 convs and must be absent when there are none; the whole-model rate
    (``achieved_model_rate``, with ``model_weights`` / ``model_kept_weights``) is over every conv
    and linear weight of the owner's graph, dense ones counted as kept, and must be present when
    a depthwise, 1x1 or linear weight is masked; each entry of ``layers`` must name a masked
    weight of the kind the graph says, at the rate its mask achieves.
    """
    conv = summary.conv
    if conv.total:
        _check_claimed_rate(report.get("achieved_rate"), conv.total, conv.kept, "achieved_rate", "an achieved rate")
    elif "achieved_rate" in report:
        raise ArtifactError("report.json claims a conv rate (achieved_rate) but no 3x3 convolution (groups=1) is masked")
    for key, count in (("prunable_weights", conv.total), ("kept_weights", conv.kept)):
        if key in report and report[key] != count:
            raise ArtifactError(f"report.json: {key} is {printable(report[key], 40)}, the masks say {count}")
    model_total = sum(dense[name].numel() for name in roles.weight_layers if name in dense)
    model_kept = model_total - summary.removed
    if "achieved_model_rate" in report or summary.depthwise.total or summary.structured.total:
        if "achieved_model_rate" not in report:
            raise ArtifactError("report.json: achieved_model_rate is missing, and depthwise, 1x1 or linear weights are masked")
        _check_claimed_rate(report["achieved_model_rate"], model_total, model_kept, "achieved_model_rate", "a whole-model rate")
    for key, count in (("model_weights", model_total), ("model_kept_weights", model_kept)):
        if key in report and report[key] != count:
            raise ArtifactError(f"report.json: {key} is {printable(report[key], 40)}, the masks and the model say {count}")
    layers = report.get("layers", [])
    if not isinstance(layers, list) or not all(isinstance(entry, dict) for entry in layers):
        raise ArtifactError("report.json: layers must be a list of objects")
    for entry in layers:
        name = entry.get("layer")
        if not isinstance(name, str) or name not in summary.layers:
            raise ArtifactError(f"report.json lists {printable(name, 80)} as a pruned layer, but no mask covers it")
        kind = entry.get("kind")
        role = roles.kind(name)
        if kind is not None and role is not None and kind not in _LAYER_KINDS[role]:
            raise ArtifactError(f"report.json calls {printable(name, 80)} a {printable(kind, 20)} layer; the model's graph makes it {role}")
        if "rate" in entry:
            total, kept = summary.layers[name]
            _check_claimed_rate(entry["rate"], total, kept, "a layer's rate", f"a rate for {printable(name, 80)}")


# ------------------------------------------------------------------------------ job control
# Before any model leaves, the owner answers the offer with a signed hello: who it is and what it
# wants. The entity checks it (registered? queue full? within this owner's limits?) and answers
# with a signed admission, or a refusal; only then does the model go out. While a job waits or
# runs, the entity sends signed status messages, so the owner decides on liveness, not on one long
# timeout. Everything here is small signed JSON: integers and short strings, no floats.
INTENTS = ("check", "request", "resume")  # a dry run, a new job, or a job an earlier run started
JOB_STATES = ("queued", "pruning", "done", "stopping")
MAX_TEXT_CHARS = 200


def _field(body: Mapping[str, Any], name: str, kind: type, what: str) -> Any:
    value = body.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise RequestError(f"{what} field {name} must be a JSON {json_kind(kind())}, got a JSON {json_kind(value)}")
    if isinstance(value, str) and not (len(value) <= MAX_ID_CHARS and value.isprintable()):
        raise RequestError(f"{what} field {name} must be printable text of at most {MAX_ID_CHARS} characters")
    return value


def _optional_int(body: Mapping[str, Any], name: str, what: str, low: int = 0, high: int = 2**53) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise RequestError(f"{what} field {name} must be an integer in {low}..{high} or null")
    return value


def _exact_fields(body: Any, names: frozenset[str], what: str) -> Mapping[str, Any]:
    if not isinstance(body, dict):
        raise RequestError(f"{what} must be a JSON object, got a JSON {json_kind(body)}")
    if set(body) != names:
        raise RequestError(f"{what} must hold exactly the fields {', '.join(sorted(names))}")
    return body


@dataclass(frozen=True)
class Hello:
    """The owner's first answer to an offer: who, for which offer, and what it wants.

    ``request_bytes`` is the size of the model the owner would send, so that a model over the
    entity's limit is refused before it crosses. ``resume_job`` names the job an earlier run of
    this owner started (intent ``resume``); the entity hands that job's status and result to this
    connection instead of starting a new one.
    """

    job_id: str
    nonce: str
    owner: str
    intent: str
    request_bytes: int = 0
    resume_job: str | None = None

    FIELDS = frozenset({"job_id", "nonce", "owner", "intent", "request_bytes", "resume_job"})

    def to_json(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "nonce": self.nonce,
            "owner": self.owner,
            "intent": self.intent,
            "request_bytes": self.request_bytes,
            "resume_job": self.resume_job,
        }

    @classmethod
    def from_json(cls, body: Any) -> Hello:
        body = _exact_fields(body, cls.FIELDS, "the hello")
        intent = _field(body, "intent", str, "the hello")
        if intent not in INTENTS:
            raise RequestError(f"the hello's intent must be one of {', '.join(INTENTS)}")
        resume = body["resume_job"]
        if intent == "resume":
            resume = _field(body, "resume_job", str, "the hello")
        elif resume is not None:
            raise RequestError("the hello names a job to resume but its intent is not resume")
        size = _optional_int(body, "request_bytes", "the hello")
        return cls(
            _field(body, "job_id", str, "the hello"),
            _field(body, "nonce", str, "the hello"),
            _field(body, "owner", str, "the hello"),
            intent,
            size or 0,
            resume,
        )


@dataclass(frozen=True)
class Admission:
    """The entity's signed answer to a hello: this owner may go on (a refusal is a REFUSED message)."""

    job_id: str
    owner: str
    intent: str
    queued: int  # jobs waiting before this one would start
    workers: int
    max_request_bytes: int

    FIELDS = frozenset({"job_id", "owner", "intent", "queued", "workers", "max_request_bytes"})

    def to_json(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "owner": self.owner,
            "intent": self.intent,
            "queued": self.queued,
            "workers": self.workers,
            "max_request_bytes": self.max_request_bytes,
        }

    @classmethod
    def from_json(cls, body: Any) -> Admission:
        body = _exact_fields(body, cls.FIELDS, "the admission")
        intent = _field(body, "intent", str, "the admission")
        if intent not in INTENTS:
            raise RequestError(f"the admission's intent must be one of {', '.join(INTENTS)}")
        return cls(
            _field(body, "job_id", str, "the admission"),
            _field(body, "owner", str, "the admission"),
            intent,
            _optional_int(body, "queued", "the admission") or 0,
            _optional_int(body, "workers", "the admission", 1, 4096) or 1,
            _optional_int(body, "max_request_bytes", "the admission") or 0,
        )


@dataclass(frozen=True)
class JobStatus:
    """Where one job stands, signed by the entity; ``seq`` only grows, so an old one is ignored.

    ``position`` (1 = next to start) and ``estimate_s`` describe a queued job; ``phase``,
    ``layer`` and ``percent`` a running one, as the pruning engine reports them. ``done``: pruned,
    the result is on its way. ``stopping``: the entity is shutting down and keeps the job in its
    journal, so the owner can stop waiting at once and resume once the entity is back.
    """

    job_id: str
    seq: int
    state: str
    position: int | None = None
    estimate_s: int | None = None
    phase: str = ""
    layer: str = ""
    percent: int | None = None
    elapsed_s: int = 0

    FIELDS = frozenset({"job_id", "seq", "state", "position", "estimate_s", "phase", "layer", "percent", "elapsed_s"})

    def to_json(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "seq": self.seq,
            "state": self.state,
            "position": self.position,
            "estimate_s": self.estimate_s,
            "phase": self.phase[:MAX_TEXT_CHARS],
            "layer": self.layer[:MAX_TEXT_CHARS],
            "percent": self.percent,
            "elapsed_s": self.elapsed_s,
        }

    @classmethod
    def from_json(cls, body: Any) -> JobStatus:
        body = _exact_fields(body, cls.FIELDS, "the job status")
        state = _field(body, "state", str, "the job status")
        if state not in JOB_STATES:
            raise RequestError(f"the job status's state must be one of {', '.join(JOB_STATES)}")
        texts = {name: _field(body, name, str, "the job status") for name in ("phase", "layer")}
        if any(len(text) > MAX_TEXT_CHARS for text in texts.values()):
            raise RequestError(f"the job status's phase and layer must be at most {MAX_TEXT_CHARS} characters")
        return cls(
            _field(body, "job_id", str, "the job status"),
            _optional_int(body, "seq", "the job status") or 0,
            state,
            _optional_int(body, "position", "the job status"),
            _optional_int(body, "estimate_s", "the job status"),
            texts["phase"],
            texts["layer"],
            _optional_int(body, "percent", "the job status", 0, 100),
            _optional_int(body, "elapsed_s", "the job status") or 0,
        )
