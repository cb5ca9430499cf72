"""One pruning job on the entity side, Flower-free: offer, admit and open the request, prune, seal.

The entity learns exactly what the owner's request bundle holds (graph, weights, input spec,
pruning request) and nothing else; it prunes on synthetic inputs only. Every step is written to an
append-only event log that ``entity.serve`` renders and operators can keep.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol import canonical
from protocol.artifact import CONSTANTS_FILE, PROGRAM_FILE, WEIGHTS_FILE, dump_tensors, program_from_files
from protocol.audit import countersign_checkpoint, make_receipt
from protocol.keys import Identity, IdentityCard
from protocol.masks import pack_masks
from protocol.replay import NonceStore
from protocol.sealing import OpenedBundle, open_bundle, seal_bundle
from protocol.signing import digest, sign_message
from protocol.spec import InputSpec, PruneRequest, RetrainRecipe

OFFER_KIND = "offer"
REQUEST_KIND = "model-request"
RESULT_KIND = "prune-result"
REQUEST_FILE = "request.json"
RESULT_FILES = ("weights.safetensors", "masks.bin", "report.json", "recipe.json", "receipt.json", "countersignature.json")
REQUEST_FILES = frozenset({PROGRAM_FILE, WEIGHTS_FILE, CONSTANTS_FILE, REQUEST_FILE})


class JobError(RuntimeError):
    """A request cannot be served (its one-line reason goes back to the owner)."""


class EventLog:
    """Append-only JSONL of service events; each line is flushed and fsynced before returning."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, event: str, fields: Mapping[str, Any] | None = None, **more: Any) -> None:
        """Append one event; ``fields`` may hold any keys (a pruning progress event's, say)."""
        record = {**(fields or {}), **more, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "event": event}
        line = json.dumps(record, sort_keys=True, default=str) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass(frozen=True)
class EntitySettings:
    """How this entity prunes: the recipe (None = the engine's default winner), device, limits."""

    recipe: str | None = None
    device: str = "cpu"
    epochs: int | None = None
    # Extra PruneConfig fields the operator sets (e.g. synthetic_images, synthetic_steps).
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Offer:
    job_id: str
    nonce: str
    blob: bytes


class EntityJobs:
    """The entity's side of every job: state that outlives one owner (keys, registry, nonces).

    ``registry`` is read afresh for every request, so owners registered (or removed) while the
    service runs take effect at their next job.
    """

    def __init__(
        self,
        identity: Identity,
        registry: Callable[[], Mapping[str, IdentityCard]],
        nonces: NonceStore,
        events: EventLog,
        settings: EntitySettings = EntitySettings(),
    ):
        self.identity = identity
        self.registry = registry
        self.nonces = nonces
        self.events = events
        self.settings = settings

    def make_offer(self, node_id: int) -> Offer:
        """A signed offer: job id, nonce, the entity's card fingerprint and what it supports."""
        from entity.pruning import RECIPES, PruneConfig

        job_id, nonce = self.nonces.issue()
        payload = {
            "job_id": job_id,
            "nonce": nonce,
            "entity": self.identity.card.fingerprint,
            "recipes": sorted(RECIPES),
            "default_recipe": self.settings.recipe or PruneConfig.__dataclass_fields__["recipe"].default,
            "asks_for": ["model graph", "model weights", "input specification", "pruning request"],
        }
        blob = sign_message(payload, kind=OFFER_KIND, signer=self.identity)
        self.events.write("offered", job_id=job_id, node_id=node_id)
        return Offer(job_id, nonce, blob)

    def open_request(self, offer: Offer, blob: bytes) -> OpenedBundle:
        """Admit the sender, open and verify its bundle, and check it answers this offer exactly once."""
        opened = open_bundle(
            blob, kind=REQUEST_KIND, job_id=offer.job_id, request_hash=digest(offer.blob),
            recipient=self.identity, senders=self.registry(),
        )
        extra = sorted(set(opened.files) - REQUEST_FILES)
        if extra:
            raise JobError(f"request holds files the entity does not accept: {', '.join(extra)}")
        request = canonical.loads(opened.files[REQUEST_FILE])
        if request.get("job_id") != offer.job_id or request.get("nonce") != offer.nonce:
            raise JobError("request does not answer the offer it was sent for (job id or nonce differ)")
        self.nonces.redeem(offer.job_id, offer.nonce)
        return opened

    def prune(
        self, offer: Offer, opened: OpenedBundle, request_blob: bytes, progress: Callable[[dict], None] | None = None,
        *, checkpoint: bytes | None = None,
    ) -> tuple[bytes, dict]:
        """Prune the opened request's model and seal the result to its owner: (sealed blob, summary).

        The result's ``request_hash`` is the hash of the exact request bytes it answers, which the
        owner also holds, so a result cannot be replayed as the answer to another request.
        ``checkpoint`` is the owner's signed audit checkpoint taken after it recorded this request;
        the entity countersigns it (a bad one is refused like a bad request).
        """
        from entity.pruning import PruneConfig, prune

        started = time.perf_counter()
        request = canonical.loads(opened.files[REQUEST_FILE])
        spec = InputSpec.from_json(request["input_spec"])
        wanted = PruneRequest.from_json(request["prune"])
        program = program_from_files({k: v for k, v in opened.files.items() if k != REQUEST_FILE})
        recipe = wanted.recipe or self.settings.recipe
        kwargs: dict[str, Any] = {**self.settings.options, "rate": wanted.rate, "skip_layers": wanted.skip_layers,
                                  "device": self.settings.device}
        if recipe:
            kwargs["recipe"] = recipe
        try:
            config = PruneConfig(**kwargs)
        except (TypeError, ValueError) as exc:
            raise JobError(f"pruning request not supported: {exc}") from exc
        result = prune(program, spec, config, progress)
        retrain = RetrainRecipe(**({"epochs": self.settings.epochs} if self.settings.epochs is not None else {}))
        report = dict(result.report)
        report["job_id"] = offer.job_id
        report["received"] = {"files": dict(opened.file_digests()), "input_spec": spec.to_json(), "request": wanted.to_json()}
        report["entity_seconds"] = str(round(time.perf_counter() - started, 3))
        files = {
            "weights.safetensors": dump_tensors(result.state_dict),
            "masks.bin": pack_masks(result.masks),
            "report.json": canonical.dumps(report),
            "recipe.json": canonical.dumps(retrain.to_json()),
            "receipt.json": make_receipt(opened, entity=self.identity, job_id=offer.job_id),
        }
        if checkpoint:
            files["countersignature.json"] = countersign_checkpoint(checkpoint, owner=opened.sender, entity=self.identity)
        blob = seal_bundle(
            files, kind=RESULT_KIND, job_id=offer.job_id, request_hash=digest(request_blob),
            sender=self.identity, recipient=opened.sender,
        )
        summary = {
            "job_id": offer.job_id,
            "owner": opened.sender.fingerprint,
            "recipe": report.get("recipe"),
            "achieved_rate": report.get("achieved_rate"),
            "bytes_received": sum(len(v) for v in opened.files.values()),
            "bytes_sent": len(blob),
        }
        return blob, summary

