"""Run the membership-inference audit: split the owner's data, train reference models, attack.

Members are images of the owner's training split (the images every audited model was trained or
retrained on); non-members are images of its held-out split, which none of them saw. The
reference models are built from the owner's own model factory and trained from scratch on
disjoint subsets of the rest of the training split, so no audited image is in any reference
model's training set (the "offline" setting of LiRA and RMIA: no model has to be trained per
audited image). RMIA's population images are a further reserved part of the training split, in no
reference model's training set either. A caller whose models saw only part of the training split
(a benchmark that trains them itself) passes its own split instead, which ``check_split`` holds to
the same rules.

Nothing here sends anything: the results go into files under ``OUT/privacy/`` and one
``privacy.audit`` event of the owner's own audit trail, marked local-only.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from owner.data import count
from owner.privacy.attacks import ATTACK_TITLES, Estimate, attack_scores, bootstrap, roc
from owner.privacy.reading import ATTACKS, EVENT, PLOT_PATH, RESULTS_PATH

__all__ = [
    "EVENT",
    "AuditResult",
    "AuditSettings",
    "PrivacyAuditError",
    "Split",
    "Target",
    "check_split",
    "event_details",
    "make_split",
    "run_audit",
    "write_outputs",
]

MODEL_NAMES = ("dense", "pruned", "final")
MODEL_TITLES = {
    "dense": "the owner's dense model (before pruning)",
    "pruned": "the pruned model as received from the entity (before retraining)",
    "final": "the final model (pruned, retrained on the owner's data)",
}

Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``: the CLI turns these into progress bars; library code never imports rich."""


class PrivacyAuditError(ValueError):
    """The audit cannot run as asked (one line naming the problem and the fix)."""


@dataclass(frozen=True)
class AuditSettings:
    """How the audit runs. The defaults audit the demo's three models in a few minutes on 2 cores."""

    reference_models: int = 4
    reference_epochs: int = 6
    reference_images: int = 2500  # at most this many training images per reference model
    reference_batch_size: int = 64
    reference_lr: float = 0.05
    members: int = 1000  # at most this many members, and as many non-members
    population: int = 500  # RMIA's population images z
    bootstrap: int = 200
    seed: int = 0
    device: str = "cpu"
    min_reference_images: int = 200
    min_non_members: int = 100

    def __post_init__(self) -> None:
        for name in ("reference_models", "reference_epochs", "reference_images", "reference_batch_size", "members", "population"):
            if getattr(self, name) < 1:
                raise PrivacyAuditError(f"{name.replace('_', '-')} must be at least 1")
        if self.bootstrap < 0:
            raise PrivacyAuditError("bootstrap must be 0 or more rounds")


@dataclass(frozen=True)
class Split:
    """Indices into the training split (members, population, each reference model's subset) and
    into the held-out split (non-members); all disjoint within a split."""

    members: np.ndarray
    non_members: np.ndarray
    population: np.ndarray
    references: tuple[np.ndarray, ...]


def make_split(n_train: int, n_test: int, settings: AuditSettings) -> Split:
    """Draw the audit's disjoint subsets, or say in one line why the data is too small."""
    if n_test == 0:
        raise PrivacyAuditError(
            "the data has no held-out split, so there are no non-members to test against: give --data a layout with "
            "a test/ (or val/) folder, or a flat ImageFolder with --eval-fraction above 0"
        )
    n = min(settings.members, n_test, n_train)
    if n < settings.min_non_members:
        raise PrivacyAuditError(
            f"the held-out split has {n_test} images and the training split {n_train}: the audit needs at least "
            f"{settings.min_non_members} of each (use a larger --eval-fraction or more data)"
        )
    rng = np.random.default_rng(settings.seed)
    train = rng.permutation(n_train)
    test = rng.permutation(n_test)
    members, rest = train[:n], train[n:]
    population, pool = rest[: settings.population], rest[settings.population :]
    each = min(settings.reference_images, len(pool) // settings.reference_models)
    if each < settings.min_reference_images:
        raise PrivacyAuditError(
            f"too few training images for {settings.reference_models} reference models: {len(pool)} are left after "
            f"{n} members and {len(population)} population images are set aside, and each reference model needs at least "
            f"{settings.min_reference_images}; lower --reference-models, --members or --population"
        )
    references = tuple(pool[k * each : (k + 1) * each] for k in range(settings.reference_models))
    return Split(members, test[:n], population, references)


def check_split(split: Split, n_train: int, n_test: int) -> Split:
    """A split the caller drew itself (a benchmark whose models saw only some training images),
    refused in one line unless its parts are in range and disjoint, as :func:`make_split`'s are."""
    parts = {"members": split.members, "population": split.population}
    parts.update({f"reference subset {k + 1}": r for k, r in enumerate(split.references)})
    if not split.references:
        raise PrivacyAuditError("the split has no reference subsets: the calibrated attacks need at least one")
    for name, (indices, limit) in {**{k: (v, n_train) for k, v in parts.items()}, "non-members": (split.non_members, n_test)}.items():
        if len(indices) == 0 or indices.min() < 0 or indices.max() >= limit:
            raise PrivacyAuditError(f"the split's {name} are empty or outside the {limit} images of their data set")
        if len(np.unique(indices)) != len(indices):
            raise PrivacyAuditError(f"the split's {name} repeat an image")
    joined = np.concatenate(list(parts.values()))
    if len(np.unique(joined)) != len(joined):
        raise PrivacyAuditError("the split's members, population and reference subsets share training images: they must be disjoint")
    return split


def _stack(dataset: Dataset, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialise the chosen images and labels (only those the audit uses)."""
    images, labels = [], []
    for i in indices.tolist():
        image, label = dataset[i]
        images.append(torch.as_tensor(image))
        labels.append(int(label))
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


@torch.no_grad()
def logits_of(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, device: str = "cpu", batch: int = 512) -> np.ndarray:
    """The model's logits for every image, as float64 (the attacks take logs of small differences)."""
    if isinstance(model, nn.Module):
        _set_eval(model)
    parts = [model(images[i : i + batch].to(device)).detach().to("cpu", torch.float64) for i in range(0, len(images), batch)]
    return torch.cat(parts).numpy()


def _set_eval(model: nn.Module) -> None:
    try:
        model.eval()
    except (NotImplementedError, RuntimeError):
        pass  # an exported program's module was exported in eval mode and may refuse .eval()


@dataclass(frozen=True)
class Target:
    """One audited model: its name in the results, what it is, and a fingerprint of its weights."""

    name: str
    model: Callable[[torch.Tensor], torch.Tensor]
    weights_sha256: str
    description: str = ""


def file_sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """A fingerprint of weights held in memory (name, dtype, shape and bytes of every tensor, sorted)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return "sha256:" + h.hexdigest()


def train_reference(
    factory: Callable[[], nn.Module],
    images: torch.Tensor,
    labels: torch.Tensor,
    settings: AuditSettings,
    seed: int,
    on_step: Callable[[], None] | None = None,
) -> nn.Module:
    """A reference model: the owner's architecture from scratch, SGD (momentum 0.9, weight decay
    5e-4) with a cosine-annealed learning rate, as the owner's retraining does."""
    torch.manual_seed(seed)
    model = factory().to(settings.device)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=settings.reference_lr, momentum=0.9, weight_decay=5e-4)
    steps_per_epoch = -(-len(images) // settings.reference_batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, settings.reference_epochs * steps_per_epoch))
    model.train()
    for _ in range(settings.reference_epochs):
        order = torch.randperm(len(images), generator=gen)
        for start in range(0, len(images), settings.reference_batch_size):
            pick = order[start : start + settings.reference_batch_size]
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(images[pick].to(settings.device)), labels[pick].to(settings.device))
            loss.backward()
            opt.step()
            sched.step()
            if on_step is not None:
                on_step()
    return model.eval()


@dataclass(frozen=True)
class ModelResult:
    name: str
    description: str
    weights_sha256: str
    held_out_accuracy: float
    estimates: dict[str, dict[str, Estimate]]  # attack -> metric -> estimate
    roc: dict[str, tuple[list[float], list[float]]]  # attack -> (FPR, TPR), thinned for plotting
    # attack -> (members' scores, non-members' scores), for paired comparisons between models; not written out
    scores: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class AuditResult:
    settings: AuditSettings
    members: int
    non_members: int
    population: int
    reference_images_each: int
    reference_accuracy: tuple[float, ...]
    models: tuple[ModelResult, ...]
    seconds: float
    notes: tuple[str, ...] = field(default_factory=tuple)
    # The logits every score was computed from, to re-examine an attack without retraining anything; not written out:
    # "labels", "population_labels", "references" (K, N, C), "population_references" and, per target, "target:NAME" and
    # "population:NAME".
    logits: dict[str, np.ndarray] = field(default_factory=dict, compare=False, repr=False)


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == labels).mean())


def _thin(fpr: np.ndarray, tpr: np.ndarray, points: int = 400) -> tuple[list[float], list[float]]:
    """At most ``points`` ROC points, spaced evenly in log FPR (what a log-log plot shows)."""
    if len(fpr) <= points:
        return [float(x) for x in fpr], [float(y) for y in tpr]
    grid = np.unique(np.r_[0, np.searchsorted(fpr, np.logspace(np.log10(max(fpr[1], 1e-6)), 0, points)).clip(0, len(fpr) - 1), len(fpr) - 1])
    return [float(x) for x in fpr[grid]], [float(y) for y in tpr[grid]]


def run_audit(
    targets: Sequence[Target],
    factory: Callable[[], nn.Module],
    train: Dataset,
    test: Dataset,
    settings: AuditSettings,
    *,
    accuracy_of: Callable[[Target], float] | None = None,
    progress: Progress | None = None,
    split: Split | None = None,
) -> AuditResult:
    """Train the reference models, collect logits, and score every attack against every target.

    ``accuracy_of`` measures a target's held-out accuracy on the whole held-out split (default:
    on the audited non-members only). ``split`` replaces :func:`make_split`'s random draw when the
    targets were trained on only part of ``train``: the members must then be images they all saw.
    """
    started = time.monotonic()
    split = make_split(count(train), count(test), settings) if split is None else check_split(split, count(train), count(test))
    report = progress or (lambda stage, done, total: None)
    report("loading images", 0, 1)
    members_x, members_y = _stack(train, split.members)
    non_x, non_y = _stack(test, split.non_members)
    pop_x, pop_y = _stack(train, split.population)
    report("loading images", 1, 1)
    audit_x = torch.cat([members_x, non_x])
    audit_y = np.concatenate([members_y.numpy(), non_y.numpy()])
    pop_labels = pop_y.numpy()
    ref_logits, ref_pop, ref_acc = [], [], []
    steps = -(-len(split.references[0]) // settings.reference_batch_size) * settings.reference_epochs
    for k, subset in enumerate(split.references):
        stage = f"reference model {k + 1}/{len(split.references)}"
        images, labels = _stack(train, subset)
        done = [0]

        def step(stage: str = stage, done: list[int] = done) -> None:
            done[0] += 1
            report(stage, done[0], steps)

        report(stage, 0, steps)
        model = train_reference(factory, images, labels, settings, seed=settings.seed * 1000 + k + 1, on_step=step)
        ref_logits.append(logits_of(model, audit_x, settings.device))
        ref_pop.append(logits_of(model, pop_x, settings.device))
        ref_acc.append(_accuracy(ref_logits[-1][len(members_y) :], non_y.numpy()))
    references, population = np.stack(ref_logits), np.stack(ref_pop)
    raw = {"labels": audit_y, "population_labels": pop_labels, "references": references, "population_references": population}
    n = len(members_y)
    results = []
    for index, target in enumerate(targets):
        stage = f"attacking the {target.name} model"
        report(stage, 0, 1)
        logits = logits_of(target.model, audit_x, settings.device)
        pop_logits = logits_of(target.model, pop_x, settings.device)
        raw[f"target:{target.name}"], raw[f"population:{target.name}"] = logits, pop_logits
        scores = attack_scores(logits, references, audit_y, pop_logits, population, pop_labels)
        estimates, curves, kept = {}, {}, {}
        for a, attack in enumerate(ATTACKS):
            member, non_member = scores[attack][:n], scores[attack][n:]
            estimates[attack] = bootstrap(member, non_member, rounds=settings.bootstrap, seed=settings.seed * 7919 + index * 31 + a)
            curves[attack] = _thin(*roc(member, non_member))
            kept[attack] = (member, non_member)
        accuracy = accuracy_of(target) if accuracy_of is not None else _accuracy(logits[n:], non_y.numpy())
        results.append(ModelResult(target.name, target.description, target.weights_sha256, accuracy, estimates, curves, kept))
        report(stage, 1, 1)
    return AuditResult(
        settings=settings,
        members=n,
        non_members=len(non_y),
        population=len(pop_y),
        reference_images_each=len(split.references[0]),
        reference_accuracy=tuple(ref_acc),
        models=tuple(results),
        logits=raw,
        seconds=time.monotonic() - started,
    )


def held_out_accuracy(test: Dataset, device: str = "cpu") -> Callable[[Target], float]:
    """A target's top-1 accuracy on the whole held-out split."""

    def measure(target: Target) -> float:
        correct = seen = 0
        with torch.no_grad():
            for images, labels in DataLoader(test, batch_size=512, shuffle=False):
                correct += int((target.model(images.to(device)).argmax(1).cpu() == labels).sum())
                seen += len(labels)
        return correct / max(seen, 1)

    return measure


# ------------------------------------------------------------------------------------ recording


def _s(value: float) -> str:
    """A number for the signed log, which holds no floats: a decimal string, 4 places."""
    return f"{value:.4f}"


def event_details(result: AuditResult, files: dict[str, str]) -> dict[str, Any]:
    """The ``privacy.audit`` event: what was measured on which models, as canonical JSON (numbers
    as decimal strings), marked local-only. ``files``: name (relative to the log's folder) -> hash."""
    s = result.settings
    return {
        "local_only": True,
        "sent_anywhere": False,
        "members": result.members,
        "member_source": "training split",
        "non_members": result.non_members,
        "non_member_source": "held-out split",
        "population": result.population,
        "reference_models": s.reference_models,
        "reference_images_each": result.reference_images_each,
        "reference_epochs": s.reference_epochs,
        "reference_held_out_accuracy": [_s(a) for a in result.reference_accuracy],
        "bootstrap_rounds": s.bootstrap,
        "seed": s.seed,
        "attacks": {a: ATTACK_TITLES[a] for a in ATTACKS},
        "models": [
            {
                "model": m.name,
                "what": m.description or MODEL_TITLES.get(m.name, m.name),
                "weights": m.weights_sha256,
                "held_out_accuracy": _s(m.held_out_accuracy),
                "results": {a: {k: [_s(e.value), _s(e.low), _s(e.high)] for k, e in m.estimates[a].items()} for a in ATTACKS},
            }
            for m in result.models
        ],
        "files": dict(files),
        "seconds": _s(result.seconds),
    }


def render_roc_png(result: AuditResult) -> bytes:
    """ROC curves on log-log axes, one panel per model, every attack in each (LiRA's figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = result.models
    columns = min(4, len(models))  # a benchmark's many models wrap into rows rather than one strip
    rows = -(-len(models) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 4.2 * rows), squeeze=False)
    for ax in axes.flat[len(models) :]:
        ax.set_visible(False)
    low = 1.0 / max(result.non_members, 1)
    for ax, m in zip(axes.flat, models, strict=False):
        for attack in ATTACKS:
            fpr, tpr = (np.asarray(v) for v in m.roc[attack])
            keep = (fpr > 0) & (tpr > 0)
            ax.plot(fpr[keep], tpr[keep], label=f"{attack} (AUC {m.estimates[attack]['auc'].value:.3f})", linewidth=1.2)
        ax.plot([low, 1], [low, 1], color="grey", linestyle="--", linewidth=0.8, label="chance")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(low, 1)
        ax.set_ylim(low, 1)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(f"{m.name} model (accuracy {m.held_out_accuracy:.1%})", fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(True, which="major", alpha=0.3)
    fig.suptitle(
        f"Membership inference: {result.members} members vs {result.non_members} non-members, {result.settings.reference_models} reference models"
    )
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def result_json(result: AuditResult) -> dict[str, Any]:
    """Everything measured, ROC points included (the event carries the metrics only)."""
    return {
        "settings": asdict(result.settings),
        "members": result.members,
        "non_members": result.non_members,
        "population": result.population,
        "reference_images_each": result.reference_images_each,
        "reference_held_out_accuracy": list(result.reference_accuracy),
        "seconds": round(result.seconds, 2),
        "models": [
            {
                "model": m.name,
                "weights": m.weights_sha256,
                "held_out_accuracy": m.held_out_accuracy,
                "results": {a: {k: asdict(e) for k, e in m.estimates[a].items()} for a in ATTACKS},
                "roc": {a: {"fpr": m.roc[a][0], "tpr": m.roc[a][1]} for a in ATTACKS},
            }
            for m in result.models
        ],
    }


def write_outputs(result: AuditResult, out: Path) -> dict[str, str]:
    """Write ``OUT/privacy/roc.png`` and ``OUT/privacy/audit.json`` atomically; returns their
    paths relative to ``out`` with their SHA-256 (what the audit event pins)."""
    from protocol._files import atomic_write

    written = {PLOT_PATH: render_roc_png(result), RESULTS_PATH: (json.dumps(result_json(result), indent=2, sort_keys=True) + "\n").encode()}
    for name, data in written.items():
        (Path(out) / name).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(Path(out) / name, data)
    return {name: "sha256:" + hashlib.sha256(data).hexdigest() for name, data in written.items()}
