"""Shared builders for the privacy-audit tests: a trail holding a real ``privacy.audit`` event."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save

from owner.privacy.attacks import bootstrap, roc
from owner.privacy.auditing import EVENT, AuditResult, AuditSettings, ModelResult, event_details, write_outputs
from owner.privacy.reading import ATTACKS
from protocol.audit import AuditLog
from protocol.keys import Identity
from protocol.sealing import seal_bundle_detailed
from protocol.signing import digest


def gaussian_result(shifts: dict[str, float], n: int = 400, seed: int = 0) -> AuditResult:
    """An audit result whose attack scores are Gaussians: members shifted by ``shifts[model]``."""
    rng = np.random.default_rng(seed)
    models = []
    for name, shift in shifts.items():
        estimates, curves = {}, {}
        for attack in ATTACKS:
            members, non_members = rng.normal(shift, 1, n), rng.normal(0, 1, n)
            estimates[attack] = bootstrap(members, non_members, rounds=20, seed=seed)
            fpr, tpr = roc(members, non_members)
            curves[attack] = (fpr.tolist(), tpr.tolist())
        models.append(ModelResult(name, "", "sha256:" + "0" * 64, 0.9, estimates, curves))
    return AuditResult(AuditSettings(bootstrap=20), n, n, 100, 500, (0.8, 0.8), tuple(models), 1.0)


def trail_with_audit(folder: Path, owner: Identity, entity: Identity, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """OUT/audit.jsonl with one sent transfer, a checkpoint and a privacy audit (plot beside it)."""
    path = folder / "audit.jsonl"
    files = {"weights.safetensors": save(tensors or {"conv.weight": torch.ones(2, 1, 3, 3)}), "request.json": b"{}"}
    sealed = seal_bundle_detailed(files, kind="model", job_id="job-1", request_hash=digest(b"o"), sender=owner, recipient=entity.card)
    result = gaussian_result({"dense": 0.1, "pruned": 0.0, "final": 0.8})
    with AuditLog.open(path, owner) as log:
        log.record_sent(sealed, recipient=entity.card, request={"job_id": "job-1"})
        log.checkpoint()
        log.append(EVENT, event_details(result, write_outputs(result, folder)))
        log.checkpoint()
    (folder / "owner.json").write_bytes(owner.card.to_bytes())
    (folder / "entity.json").write_bytes(entity.card.to_bytes())
    return path


def tiny_mlp(in_features: int = 784, classes: int = 10) -> torch.nn.Module:
    """A model factory for the CLI tests (``tests.owner.privacy_helpers:tiny_mlp``)."""
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_features, 32), torch.nn.ReLU(), torch.nn.Linear(32, classes))
