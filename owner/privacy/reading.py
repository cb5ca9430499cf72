"""A ``privacy.audit`` event read back for people: checked values, table rows and a plain reading.

Shared by the audit CLI and ``owner.audit report`` (which must not import torch or numpy, so
this module imports neither). The event comes from a log, so it is parsed defensively: a value
that is not a decimal string in [0, 1] is shown as "?" and never breaks the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

EVENT = "privacy.audit"
PLOT_PATH = "privacy/roc.png"  # relative to the audit log's folder (OUT)
RESULTS_PATH = "privacy/audit.json"
ATTACKS = ("loss", "confidence", "entropy", "lira", "rmia")  # the order every table shows them in
METRIC_COLUMNS = ("auc", "balanced_accuracy", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr")

WHAT_THE_NUMBERS_MEAN = (
    "Membership inference asks whether someone holding only the model can tell if a given image was among "
    "its training images. Members here are images of the owner's training split, non-members images of its "
    "held-out split, which the model never saw.",
    "AUC: the chance that the attack ranks a random member above a random non-member. 0.5 is a coin toss; 1.0 means it always tells them apart.",
    "Balanced accuracy: the share of members and non-members the attack labels correctly at its best threshold "
    "(0.5 is chance, though on a finite sample the best threshold lifts even a coin toss a little above it); papers "
    "call it attack accuracy.",
    "TPR at 1% / 0.1% FPR: the share of training images the attack picks out while wrongly flagging only 1 in 100 "
    "/ 1 in 1,000 unseen images. Chance gives 0.01 / 0.001; this is the measure that shows whether a few "
    "individuals are exposed with confidence.",
    "Intervals are bootstrap 95% intervals over the audited images.",
)

WHAT_THEY_DO_NOT_PROVE = (
    "These attacks are lower bounds on what the model reveals: an attacker with more reference models, the "
    "weights themselves (white-box) or data closer to the training set may do better.",
    "A result close to chance does not prove that no individual image is exposed, and it is not a formal guarantee such as differential privacy.",
    "TPR at 0.1% FPR rests on about one false positive per 1,000 non-members: with fewer non-members it is not "
    "measured at that level, and its interval is wide.",
    "Only images of this owner's own training and held-out splits were tested; the entity's pruning never saw "
    "any of them (it works on synthetic inputs), so the pruned model's numbers describe what the dense model's "
    "weights still carry.",
)


def _number(value: Any) -> float | None:
    if not isinstance(value, str) or len(value) > 12:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if 0.0 <= number <= 1.0 else None


@dataclass(frozen=True)
class Measured:
    value: float | None
    low: float | None
    high: float | None

    def text(self, percent: bool = False) -> str:
        if self.value is None:
            return "?"
        fmt = (lambda v: f"{v:.2%}") if percent else (lambda v: f"{v:.3f}")
        if self.low is None or self.high is None:
            return fmt(self.value)
        return f"{fmt(self.value)} [{fmt(self.low)}, {fmt(self.high)}]"


@dataclass(frozen=True)
class ModelFindings:
    model: str
    what: str
    accuracy: float | None
    results: dict[str, dict[str, Measured]]  # attack -> metric -> measured


def _measured(value: Any) -> Measured:
    if isinstance(value, list) and len(value) == 3:
        return Measured(_number(value[0]), _number(value[1]), _number(value[2]))
    return Measured(None, None, None)


def findings(details: Any) -> list[ModelFindings]:
    """Every model's results in an event, whatever the log holds (bad entries become "?")."""
    models = details.get("models") if isinstance(details, dict) else None
    out = []
    for entry in models if isinstance(models, list) else []:
        if not isinstance(entry, dict):
            continue
        raw = entry.get("results")
        results: dict[str, dict[str, Measured]] = {}
        items = (
            sorted(raw.items(), key=lambda kv: (ATTACKS.index(kv[0]) if kv[0] in ATTACKS else len(ATTACKS), str(kv[0])))
            if isinstance(raw, dict)
            else []
        )
        for attack, metrics in items:
            if isinstance(metrics, dict):
                results[str(attack)] = {m: _measured(metrics.get(m)) for m in METRIC_COLUMNS}
        out.append(ModelFindings(str(entry.get("model", "?")), str(entry.get("what", "")), _number(entry.get("held_out_accuracy")), results))
    return out


def summary_rows(details: Any) -> list[tuple[str, ...]]:
    """(model, accuracy, attack, AUC, balanced accuracy, TPR@1%, TPR@0.1%) per model and attack."""
    rows: list[tuple[str, ...]] = []
    for f in findings(details):
        accuracy = "?" if f.accuracy is None else f"{f.accuracy:.2%}"
        for attack, m in f.results.items():
            rows.append(
                (
                    f.model,
                    accuracy,
                    attack,
                    m["auc"].text(),
                    m["balanced_accuracy"].text(),
                    m["tpr_at_1pct_fpr"].text(True),
                    m["tpr_at_0.1pct_fpr"].text(True),
                )
            )
    return rows


def _strength(auc: Measured) -> str:
    if auc.value is None:
        return "not readable from the log"
    if auc.low is not None and auc.high is not None and auc.low <= 0.5 <= auc.high:
        return "not distinguishable from chance"
    if auc.value < 0.55:
        return "barely better than chance"
    if auc.value < 0.65:
        return "a weak but real signal"
    if auc.value < 0.8:
        return "a clear signal: the model reveals membership for many images"
    return "a strong signal: membership is easy to infer"


def _strongest(f: ModelFindings) -> tuple[str, Measured] | None:
    scored = [(a, m["auc"]) for a, m in f.results.items() if m["auc"].value is not None]
    return max(scored, key=lambda item: item[1].value or 0.0) if scored else None


def plain_reading(details: Any) -> list[str]:
    """One sentence per model (its strongest attack and what that means), then how they compare."""
    lines = []
    best: dict[str, float] = {}
    members = details.get("members") if isinstance(details, dict) else None
    non_members = details.get("non_members") if isinstance(details, dict) else None
    if isinstance(members, int) and isinstance(non_members, int):
        refs = details.get("reference_models")
        lines.append(
            f"Tested {members} training images against {non_members} held-out images, with {refs} reference models trained on other training images."
        )
    for f in findings(details):
        strongest = _strongest(f)
        if strongest is None:
            lines.append(f"{f.model} model: no readable result.")
            continue
        attack, auc = strongest
        best[f.model] = auc.value or 0.0
        low_fpr = f.results[attack]["tpr_at_0.1pct_fpr"]
        exposed = (
            "" if low_fpr.value is None else f"; at 0.1% false positives it picks out {low_fpr.value:.2%} of the training images (chance: 0.10%)"
        )
        lines.append(f"{f.model} model: strongest attack {attack}, AUC {auc.text()}: {_strength(auc)}{exposed}.")
    if "final" in best and "dense" in best:
        verb = "no more" if best["final"] <= best["dense"] else "more"
        lines.append(
            f"The final model reveals {verb} than the dense model by the strongest attack's AUC "
            f"({best['final']:.3f} vs {best['dense']:.3f}; overlapping intervals mean the difference is not established)."
        )
    return lines
