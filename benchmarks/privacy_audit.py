"""Membership inference against dense, pruned-and-retrained, and defended models on Fashion-MNIST.

Two regimes, one audit code path (``owner.privacy.auditing.run_audit``, as ``python -m
owner.privacy audit``), the entity's data-free pruning (``--recipe``) at each ``--rates`` rate,
and the owner's masked retraining (``owner.retrain.masked_retrain``, default recipe) of each
pruned model on the members, once plainly and once per ``--defence-weights`` value with the
membership defence (``owner.retrain.MembershipDefence``, whose reference set is
``--defence-images`` training images the retraining never uses).

``--regime memorise`` (the default): the regime of the published membership-inference figures.
The benchmark trains the dense model itself on the owner's ``--train-images`` Fashion-MNIST
training images only (the members; no augmentation, ``--dense-epochs`` epochs, enough to fit them
all), so that it generalises worse than it fits and there is something to infer. Non-members are
test images it never saw. The reference models are trained by the same function, on the same
number of disjoint training images, for the same epochs: offline LiRA and RMIA compare the target
with models trained the way it was, and references trained otherwise would miscalibrate them.

``--regime generalise``: the earlier setting. The dense model is the demo's small VGG
(``simulations/assets/small_vgg.safetensors``, trained on all 60,000 training images, members
included); members are drawn from the owner's first ``--train-images`` training images. The dense
model hardly memorised them, so every attack sits near chance there.

Writes ``--out`` with ``.json`` (everything, ROC points included), ``.md`` (the tables, targets
and anchors), ``.png`` (ROC curves on log-log axes, one panel per model) and ``_summary.png``
(every model's AUC per attack with its interval, and its accuracy).

    nice -n 10 python -m benchmarks.privacy_audit                       # the memorise table
    nice -n 10 python -m benchmarks.privacy_audit --regime generalise --out benchmarks/results/privacy_audit_generalising
    python -m benchmarks.privacy_audit --quick                          # smoke run, a few minutes
    python -m benchmarks.privacy_audit --summarise benchmarks/results/privacy_audit.json benchmarks/results/privacy_audit_seed1.json \
        benchmarks/results/privacy_audit_seed2.json                     # mean ± sd over seeds -> privacy_audit_seeds.{md,json,png}
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".." / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
WEIGHTS = ROOT / "simulations" / "assets" / "small_vgg.safetensors"
MEAN, STD = 0.2860, 0.3530
PROG = "benchmarks.privacy_audit"
REGIMES = ("memorise", "generalise")
# Per-regime defaults for the options left unset; the generalise ones are the earlier run's.
DEFAULTS: dict[str, dict[str, Any]] = {
    "memorise": {"train_images": 4000, "members": 4000, "population": 10000, "defence_images": 4000},
    "generalise": {"train_images": 6000, "members": 1500, "population": 500, "defence_images": 2000, "reference_epochs": 6},
}


def _fatal(message: str) -> NoReturn:
    from protocol.cli import fatal

    fatal(PROG, message)


def _fashion() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from torchvision import datasets

    if not (DATA / "FashionMNIST" / "raw").is_dir():
        _fatal(f"Fashion-MNIST not found under {DATA.resolve()}/FashionMNIST/raw")
    out: list[torch.Tensor] = []
    for train in (True, False):
        ds = datasets.FashionMNIST(root=str(DATA), train=train, download=False)
        out += [((ds.data.float() / 255.0 - MEAN) / STD).unsqueeze(1), ds.targets.clone()]
    return out[0], out[1], out[2], out[3]


def _demo_dense() -> nn.Module:
    from owner.model import load_weights
    from simulations.models import small_vgg

    model = small_vgg()
    load_weights(model, WEIGHTS)
    return model.eval()


def _prune(dense: nn.Module, rate: float, recipe: str, log: Any) -> Any:
    from entity.pruning import PruneConfig, prune
    from owner.model import export_model
    from protocol.spec import InputSpec

    spec = InputSpec((1, 28, 28), (MEAN,), (STD,), "L")
    start = time.perf_counter()
    result = prune(export_model(dense, spec), spec, PruneConfig(rate=rate, recipe=recipe, device="cpu"), lambda event: None)
    log(f"pruned to {rate:g}x ({recipe}) in {time.perf_counter() - start:.0f}s, achieved {result.report.get('achieved_rate')}")
    return result


def _retrain(
    pruned: Any, train: TensorDataset, reference: TensorDataset | None, weight: float, args: argparse.Namespace, log: Any
) -> tuple[nn.Module, float]:
    from owner.retrain import MembershipDefence, masked_retrain
    from protocol.spec import RetrainRecipe
    from simulations.models import small_vgg

    torch.manual_seed(args.seed)
    model = small_vgg()
    model.load_state_dict(pruned.state_dict)
    loader = DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(args.seed))
    defence = None
    ref_loader = None
    if reference is not None:
        defence = MembershipDefence(weight=weight, attack_steps=args.defence_steps, seed=args.seed)
        ref_loader = DataLoader(reference, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(args.seed + 1))
    start = time.perf_counter()
    history = masked_retrain(model, pruned.masks, loader, RetrainRecipe(), epochs=args.epochs, defence=defence, defence_reference=ref_loader)
    seconds = time.perf_counter() - start
    log(f"retrained {f'with the defence (weight {weight:g})' if defence else 'without the defence'} in {seconds:.0f}s, last epoch {history[-1]}")
    return model.eval(), seconds


@torch.no_grad()
def _accuracy(model: nn.Module, data: TensorDataset) -> float:
    model.eval()
    x, y = data.tensors
    return float(sum(int((model(x[i : i + 512]).argmax(1) == y[i : i + 512]).sum()) for i in range(0, len(y), 512)) / len(y))


# ------------------------------------------------------------------------------------ report


def _interval(e: dict[str, float], percent: bool = False) -> str:
    f = (lambda v: f"{v:.2%}") if percent else (lambda v: f"{v:.3f}")
    return f"{f(e['value'])} [{f(e['low'])}, {f(e['high'])}]"


def _signed(e: dict[str, float]) -> str:
    return f"{e['value']:+.3f} [{e['low']:+.3f}, {e['high']:+.3f}]"


def _regime_text(state: dict[str, Any]) -> str:
    audit, s = state["audit"], state["audit"]["settings"]
    refs = f"{s['reference_models']} reference models of {audit['reference_images_each']} disjoint training images"
    refs += f", {s['reference_epochs']} epochs each"
    common = (
        f"RMIA population: {audit['population']} further training images. Retraining: {state['epochs']} epoch(s) of the default recipe "
        f"(`RetrainRecipe()`: SGD, cosine from 0.05 over the run, batch 64) on the members; pruning recipe `{state['recipe']}` (data-free); defence: "
        f"{state['defence_steps']} attack step(s) per model step, {state['defence_images']} reference images the retraining never uses. "
        f"{s['bootstrap']} bootstrap rounds (95% intervals in brackets)."
    )
    if state.get("regime", "generalise") == "memorise":
        return (
            f"Regime `memorise`: the benchmark trains the dense model itself on the owner's {state['train_images']} training images only "
            f"(the members), without augmentation, for {s['reference_epochs']} epochs (the reference models' training function and "
            f"settings: SGD, momentum 0.9, weight decay 5e-4, cosine from {s['reference_lr']}, batch {s['reference_batch_size']}). "
            f"Members: all {audit['members']} of them; non-members: {audit['non_members']} test images no model saw; {refs}, "
            f"trained exactly as the dense model. {common}"
        )
    return (
        "Regime `generalise`: the dense model is the demo's small VGG, trained on all 60,000 training images (members included). "
        f"Members: {audit['members']} of the owner's first {state['train_images']} training images; non-members: as many of the 10,000 "
        f"test images; {refs}. {common}"
    )


def render_markdown(state: dict[str, Any]) -> str:
    from owner.privacy.reading import ATTACKS

    regime = state.get("regime", "generalise")
    command = f"`nice -n 10 python -m benchmarks.privacy_audit {' '.join(state['argv'])}`".replace(" `", "`")
    threads = ", one torch thread"
    if "regime" not in state:  # a run from before the regimes: its settings are today's --regime generalise
        command, threads = command + " (the default then; `--regime generalise` today)", ""
    title = {"memorise": "models that memorise their members", "generalise": "models that generalise"}[regime]
    lines = [
        f"# Membership inference on Fashion-MNIST (small VGG): {title}",
        "",
        f"Generated by {command} in {state['seconds']:.0f} s (1-minute load average {state['load_average'][0]:.2f} at start, "
        f"{state['load_average'][1]:.2f} at end, {state.get('cores', os.cpu_count())} cores{threads}).",
        "",
        _regime_text(state),
        "",
        "| model | test accuracy | member accuracy | " + " | ".join(f"{a} AUC | {a} TPR@0.1%FPR" for a in ATTACKS) + " |",
        "|---|---|---|" + "---|---|" * len(ATTACKS),
    ]
    member_acc = state.get("member_accuracy", {})
    for m in state["audit"]["models"]:
        cells = []
        for a in ATTACKS:
            cells.append(_interval(m["results"][a]["auc"]))
            cells.append(_interval(m["results"][a]["tpr_at_0.1pct_fpr"], percent=True))
        seen = f"{member_acc[m['model']]:.2%}" if m["model"] in member_acc else "—"
        lines.append(f"| {m['model']} | {m['held_out_accuracy']:.2%} | {seen} | " + " | ".join(cells) + " |")
    lines += [
        "",
        'Balanced accuracy (the "attack accuracy" papers report) and TPR at 1% FPR of each attack:',
        "",
        "| model | " + " | ".join(f"{a} bal. acc. | {a} TPR@1%FPR" for a in ATTACKS) + " |",
        "|---|" + "---|---|" * len(ATTACKS),
    ]
    for m in state["audit"]["models"]:
        cells = [f"{m['results'][a]['balanced_accuracy']['value']:.3f} | {m['results'][a]['tpr_at_1pct_fpr']['value']:.2%}" for a in ATTACKS]
        lines.append(f"| {m['model']} | " + " | ".join(cells) + " |")
    if state.get("paired"):
        lines += [
            "",
            "Paired differences in RMIA and loss-attack AUC (first model minus second, 95% interval from resampling the same "
            "members and non-members for both models; an interval that excludes 0 establishes the difference):",
            "",
            "| comparison | RMIA AUC difference | loss AUC difference |",
            "|---|---|---|",
        ]
        for p in state["paired"]:
            lines.append(f"| {p['first']} − {p['second']} | {_signed(p['rmia'])} | {_signed(p['loss'])} |")
    seconds = ", ".join(f"{k} {v:.0f} s" for k, v in state.get("retrain_seconds", {}).items())
    lines += ["", f"Wall time on the shared machine: {seconds}.", "", "## Targets (issue 12)", ""] + [f"- {t}" for t in state["targets"]]
    lines += ["", "## Anchors", ""] + [f"- {a}" for a in _anchors(state)]
    if state.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in state["notes"]]
    return "\n".join(lines) + "\n"


def _result_from_state(state: dict[str, Any]) -> Any:
    """The audit result back from a results file, enough to redraw its ROC figure (no scores, no logits)."""
    from owner.privacy.attacks import Estimate
    from owner.privacy.auditing import AuditResult, AuditSettings, ModelResult

    audit = state["audit"]
    models = tuple(
        ModelResult(
            m["model"],
            "",
            m["weights"],
            m["held_out_accuracy"],
            {a: {k: Estimate(**e) for k, e in r.items()} for a, r in m["results"].items()},
            {a: (c["fpr"], c["tpr"]) for a, c in m["roc"].items()},
        )
        for m in audit["models"]
    )
    settings = AuditSettings(**audit["settings"])
    counts = (audit["members"], audit["non_members"], audit["population"], audit["reference_images_each"])
    return AuditResult(settings, *counts, tuple(audit["reference_held_out_accuracy"]), models, audit["seconds"])


def render_summary_png(state: dict[str, Any]) -> bytes:
    """The issue's comparison in one figure: each model's AUC per attack with its 95% interval
    (left) and its test accuracy (right), models in the table's order."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from owner.privacy.reading import ATTACKS

    models = state["audit"]["models"]
    names = [m["model"] for m in models]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / len(ATTACKS)
    for k, attack in enumerate(ATTACKS):
        auc = [m["results"][attack]["auc"] for m in models]
        x = np.arange(len(models)) + (k - (len(ATTACKS) - 1) / 2) * width
        err = np.array([[e["value"] - e["low"] for e in auc], [e["high"] - e["value"] for e in auc]])
        left.bar(x, [e["value"] - 0.5 for e in auc], width, bottom=0.5, yerr=err, capsize=2, label=attack)
    left.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    left.set_xticks(np.arange(len(models)), names, rotation=20, ha="right", fontsize=8)
    left.set_ylabel("attack AUC (95% interval)")
    left.legend(fontsize=8, ncol=len(ATTACKS))
    left.set_title(f"Membership inference, regime {state.get('regime', 'generalise')}", fontsize=10)
    accuracy = [m["held_out_accuracy"] * 100 for m in models]
    right.barh(np.arange(len(models)), accuracy, color="tab:grey")
    for y, value in enumerate(accuracy):
        right.text(value, y, f" {value:.2f}", va="center", fontsize=8)
    right.set_yticks(np.arange(len(models)), names, fontsize=8)
    right.invert_yaxis()
    right.set_xlim(max(0.0, min(accuracy) - 3), min(100.0, max(accuracy) + 3))
    right.set_xlabel("test accuracy (%)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _anchors(state: dict[str, Any]) -> list[str]:
    models = {m["model"]: m for m in state["audit"]["models"]}
    dense = models.get("dense")
    out = []
    if dense:
        best = max(("loss", "entropy", "lira", "rmia"), key=lambda a: dense["results"][a]["balanced_accuracy"]["value"])
        line = (
            f"EmbeddedMIA (Fashion-MNIST): dense 89.7% accuracy / 55.3% attack accuracy, 16x pruned 88.4% / 56.7%. Here: dense "
            f"{dense['held_out_accuracy']:.1%} / {dense['results'][best]['balanced_accuracy']['value']:.1%} ({best}, the best balanced accuracy)"
        )
        if "final-16x" in models:
            f16 = models["final-16x"]
            line += f", 16x final {f16['held_out_accuracy']:.1%} / {f16['results'][best]['balanced_accuracy']['value']:.1%}"
        out.append(line + ".")
        drops = [
            (name, dense["results"]["loss"]["balanced_accuracy"]["value"] - m["results"]["loss"]["balanced_accuracy"]["value"])
            for name, m in models.items()
            if name.startswith("final-") and "defence" not in name
        ]
        if drops:
            out.append(
                "MCMIA: pruning lowers attack accuracy by up to 13.6 points. Here the loss attack's balanced accuracy changes from dense to "
                + ", ".join(f"{name} by {-d * 100:+.1f} points" for name, d in drops)
                + "."
            )
        out.append(
            f"RMIA (CIFAR-10, 4 reference models): AUC 0.71. Here, dense with {state['audit']['settings']['reference_models']} reference models: "
            f"RMIA AUC {dense['results']['rmia']['auc']['value']:.3f}, LiRA {dense['results']['lira']['auc']['value']:.3f}, loss "
            f"{dense['results']['loss']['auc']['value']:.3f}; CIFAR-10 models have a far larger train-test gap than a Fashion-MNIST one, so the "
            "figure bounds the attack's reach rather than predicting this number."
        )
    return out


def _overlap(a: dict[str, float], b: dict[str, float]) -> str:
    """Whether two estimates' 95% intervals overlap: a difference inside them is not established by that test."""
    return "the separate intervals overlap" if a["low"] <= b["high"] and b["low"] <= a["high"] else "the separate intervals do not overlap"


def _established(p: dict[str, float]) -> str:
    if p["low"] > 0:
        return "the paired interval lies above 0: established"
    if p["high"] < 0:
        return "the paired interval lies below 0: established"
    return "the paired interval includes 0: not established"


def _paired(state: dict[str, Any], first: str, second: str) -> dict[str, float] | None:
    for p in state.get("paired", []):
        if p["first"] == first and p["second"] == second:
            return p["rmia"]
    return None


def _targets(state: dict[str, Any]) -> list[str]:
    models = {m["model"]: m for m in state["audit"]["models"]}
    out = []
    dense = models.get("dense")
    for rate in state["rates"]:
        plain = models.get(f"final-{rate:g}x")
        if dense and plain:
            da, fa = dense["results"]["rmia"]["auc"], plain["results"]["rmia"]["auc"]
            d, f = da["value"], fa["value"]
            paired = _paired(state, f"final-{rate:g}x", "dense")
            how = f"{'lower' if f <= d else 'higher'} by {abs(f - d):.3f}"
            tail = f"; {_overlap(da, fa)}" + (f"; paired difference {_signed(paired)}, {_established(paired)}" if paired else "")
            verdict = "met" if f <= d else "missed"
            if verdict == "met" and paired is not None and paired["high"] >= 0:
                verdict = "met on the point estimates only"
            out.append(f"{rate:g}x final RMIA AUC {_interval(fa)} vs dense {_interval(da)}: {verdict} (no higher than dense; {how}){tail}")
        for name, defended in models.items():
            if not (plain and name.startswith(f"final-{rate:g}x-defence")):
                continue
            fa, ga = plain["results"]["rmia"]["auc"], defended["results"]["rmia"]["auc"]
            f, g = fa["value"], ga["value"]
            cost = (plain["held_out_accuracy"] - defended["held_out_accuracy"]) * 100
            paired = _paired(state, name, f"final-{rate:g}x")
            tail = f"; {_overlap(fa, ga)}" + (f"; paired difference {_signed(paired)}, {_established(paired)}" if paired else "")
            verdict = "met" if g < f and cost <= 0.5 else "missed"
            if verdict == "met" and paired is not None and paired["high"] >= 0:
                verdict = "met on the point estimates only"
            change = ("lower" if g < f else "higher" if g > f else "equal") + (f" by {abs(g - f):.4f}" if g != f else "")
            out.append(
                f"{name}: RMIA AUC {_interval(ga)} vs {_interval(fa)} without ({change}), "
                f"accuracy cost {cost:+.2f} pp ({verdict}: lower at a cost of at most 0.5 pp){tail}"
            )
    return out


def _comparisons(names: list[str]) -> list[tuple[str, str]]:
    """Each final model against the dense one, each defended model against its plain one."""
    out = []
    for name in names:
        if name.startswith("final-") and "-defence" not in name and "dense" in names:
            out.append((name, "dense"))
        elif "-defence" in name:
            out.append((name, name.split("-defence")[0]))
    return out


# ------------------------------------------------------------------------------------ several seeds

# What must agree between the runs summarised together: everything but the seed.
_SAME = ("regime", "train_images", "dense_epochs", "epochs", "rates", "recipe", "defence_weights", "defence_steps", "defence_images")


def _mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


# 97.5% quantiles of Student's t for 1-10 degrees of freedom: a 95% interval for a mean over a few seeds.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def _t_interval(values: list[float]) -> tuple[float, float] | None:
    """95% interval for the mean of per-seed values (Student's t, seeds as the sample); None for one seed."""
    if len(values) < 2:
        return None
    mean, sd = _mean_sd(values)
    half = (_T975[len(values) - 2] if len(values) <= len(_T975) + 1 else 1.96) * sd / np.sqrt(len(values))
    return mean - half, mean + half


def _seeds_of(states: list[dict[str, Any]]) -> list[int]:
    return [int(s["audit"]["settings"]["seed"]) for s in states]


def _check_comparable(states: list[dict[str, Any]], paths: list[Path]) -> None:
    """Refuse runs that differ in anything but the seed, or that repeat a seed."""
    first = states[0]
    for state, path in zip(states[1:], paths[1:], strict=True):
        for key in _SAME:
            if state.get(key) != first.get(key):
                _fatal(f"{path} has {key} = {state.get(key)!r}, {paths[0]} {first.get(key)!r}: only the seed may differ")
        ours = {k: v for k, v in state["audit"]["settings"].items() if k != "seed"}
        theirs = {k: v for k, v in first["audit"]["settings"].items() if k != "seed"}
        if ours != theirs:
            _fatal(f"{path} and {paths[0]} differ in the audit settings ({ours} vs {theirs}): only the seed may differ")
        if [m["model"] for m in state["audit"]["models"]] != [m["model"] for m in first["audit"]["models"]]:
            _fatal(f"{path} and {paths[0]} audit different models")
    seeds = _seeds_of(states)
    if len(set(seeds)) != len(seeds):
        _fatal(f"the runs repeat a seed ({seeds}): each seed once")


def summarise_seeds(states: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model the mean and sd over the seeds of test accuracy, member accuracy and the RMIA,
    LiRA and loss AUC; per issue-12 target the verdict on the mean and the number of seeds
    meeting it on their own; every seed's paired differences."""
    names = [m["model"] for m in states[0]["audit"]["models"]]
    per = [{m["model"]: m for m in s["audit"]["models"]} for s in states]

    def values(name: str, what: str) -> list[float]:
        if what == "test_accuracy":
            return [p[name]["held_out_accuracy"] * 100 for p in per]
        if what == "member_accuracy":
            return [s["member_accuracy"][name] * 100 for s in states]
        return [p[name]["results"][what]["auc"]["value"] for p in per]

    rows = {name: {what: values(name, what) for what in ("test_accuracy", "member_accuracy", "rmia", "lira", "loss")} for name in names}
    paired: dict[str, dict[str, list[dict[str, float]]]] = {}
    for state in states:
        for p in state["paired"]:
            entry = paired.setdefault(f"{p['first']} − {p['second']}", {"rmia": [], "loss": []})
            entry["rmia"].append(p["rmia"])
            entry["loss"].append(p["loss"])
    targets = []
    for rate in states[0]["rates"]:
        plain = f"final-{rate:g}x"
        if "dense" in rows and plain in rows:
            d, f = rows["dense"]["rmia"], rows[plain]["rmia"]
            seeds_met = sum(fi <= di for fi, di in zip(f, d, strict=True))
            established = sum(e["high"] < 0 for e in paired.get(f"{plain} − dense", {"rmia": []})["rmia"])
            targets.append(
                {
                    "target": f"{rate:g}x final RMIA AUC no higher than dense",
                    "model": plain,
                    "met": bool(np.mean(f) <= np.mean(d)),
                    "seeds_met": int(seeds_met),
                    "seeds_established": int(established),
                    "difference": _mean_sd([fi - di for fi, di in zip(f, d, strict=True)]),
                    "difference_t95": _t_interval([fi - di for fi, di in zip(f, d, strict=True)]),
                    "cost_pp": None,
                }
            )
        for name in names:
            if not name.startswith(f"{plain}-defence"):
                continue
            f, g = rows[plain]["rmia"], rows[name]["rmia"]
            cost = [a - b for a, b in zip(rows[plain]["test_accuracy"], rows[name]["test_accuracy"], strict=True)]
            seeds_met = sum(gi < fi and c <= 0.5 for gi, fi, c in zip(g, f, cost, strict=True))
            established = sum(e["high"] < 0 for e in paired.get(f"{name} − {plain}", {"rmia": []})["rmia"])
            targets.append(
                {
                    "target": f"{name} lowers RMIA AUC below {plain} at a cost of at most 0.5 pp accuracy",
                    "model": name,
                    "met": bool(np.mean(g) < np.mean(f) and np.mean(cost) <= 0.5),
                    "seeds_met": int(seeds_met),
                    "seeds_established": int(established),
                    "difference": _mean_sd([gi - fi for gi, fi in zip(g, f, strict=True)]),
                    "difference_t95": _t_interval([gi - fi for gi, fi in zip(g, f, strict=True)]),
                    "cost_pp": _mean_sd(cost),
                    "cost_t95": _t_interval(cost),
                    "cost_per_seed": cost,
                }
            )
    return {
        "seeds": _seeds_of(states),
        "regime": states[0]["regime"],
        "models": names,
        "rows": rows,
        "paired": paired,
        "targets": targets,
        "seconds": [s["seconds"] for s in states],
        "load_average": [s["load_average"] for s in states],
    }


def _bracket(interval: tuple[float, float] | None, fmt: str) -> str:
    return "" if interval is None else f" [{interval[0]:{fmt}}, {interval[1]:{fmt}}]"


def render_seeds_markdown(summary: dict[str, Any], sources: list[str]) -> str:
    seeds, k = summary["seeds"], len(summary["seeds"])

    def cell(vals: list[float], fmt: str) -> str:
        mean, sd = _mean_sd(vals)
        return f"{mean:{fmt}} ± {sd:{fmt}}"

    runs = ", ".join(
        f"seed {s} `{src}` ({sec:.0f} s, load {la[0]:.2f}→{la[1]:.2f})"
        for s, src, sec, la in zip(seeds, sources, summary["seconds"], summary["load_average"], strict=True)
    )
    lines = [
        f"# Membership inference on Fashion-MNIST (small VGG), regime `{summary['regime']}`: {k} seeds",
        "",
        f"Summarised by `python -m benchmarks.privacy_audit --summarise {' '.join(sources)}` from {runs}. "
        "Each seed draws its own member/non-member/population/reference split, trains its own dense and reference models and "
        "retrains with its own data order and defence initialisation; every other setting is the same (checked).",
        "",
        f"Mean ± sample standard deviation over the {k} seeds (per-seed values in the columns on the right):",
        "",
        "| model | test accuracy (%) | member accuracy (%) | RMIA AUC | LiRA AUC | loss AUC "
        "| test accuracy per seed | RMIA AUC per seed | loss AUC per seed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in summary["models"]:
        r = summary["rows"][name]
        lines.append(
            f"| {name} | {cell(r['test_accuracy'], '.2f')} | {cell(r['member_accuracy'], '.2f')} | {cell(r['rmia'], '.3f')} | "
            f"{cell(r['lira'], '.3f')} | {cell(r['loss'], '.3f')} | {', '.join(f'{v:.2f}' for v in r['test_accuracy'])} | "
            f"{', '.join(f'{v:.3f}' for v in r['rmia'])} | {', '.join(f'{v:.3f}' for v in r['loss'])} |"
        )
    lines += [
        "",
        f"## Targets (issue 12) on the {k}-seed mean",
        "",
        f"A verdict on the mean of the {k} seeds, then how many seeds meet the target on their own point estimates, and in how many "
        "the paired interval (that seed's bootstrap over its members and non-members) lies below 0. In brackets, a 95% Student-t "
        f"interval over the {k} seeds (the seeds as the sample: it covers the retraining's and the split's variation, which one "
        "seed's bootstrap does not).",
        "",
        "| target | verdict on the mean | seeds meeting it | seeds with the paired interval below 0 | RMIA AUC difference, mean ± sd [t interval] "
        "| accuracy cost, pp, mean ± sd [t interval] (per seed) |",
        "|---|---|---|---|---|---|",
    ]
    for t in summary["targets"]:
        diff = f"{t['difference'][0]:+.4f} ± {t['difference'][1]:.4f}" + _bracket(t["difference_t95"], "+.4f")
        cost = "—"
        if t["cost_pp"] is not None:
            cost = f"{t['cost_pp'][0]:+.2f} ± {t['cost_pp'][1]:.2f}" + _bracket(t["cost_t95"], "+.2f")
            cost += f" ({', '.join(f'{c:+.2f}' for c in t['cost_per_seed'])})"
        lines.append(f"| {t['target']} | {'met' if t['met'] else 'missed'} | {t['seeds_met']}/{k} | {t['seeds_established']}/{k} | {diff} | {cost} |")
    lines += [
        "",
        "## Paired differences per seed",
        "",
        "First model minus second, each seed's 95% interval from resampling the same members and non-members for both models:",
        "",
        "| comparison | " + " | ".join(f"seed {s} RMIA" for s in seeds) + " | " + " | ".join(f"seed {s} loss" for s in seeds) + " |",
        "|---|" + "---|" * (2 * k),
    ]
    for comparison, entry in summary["paired"].items():
        cells = [_signed(e) for e in entry["rmia"]] + [_signed(e) for e in entry["loss"]]
        lines.append(f"| {comparison} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_seeds_png(summary: dict[str, Any]) -> bytes:
    """RMIA AUC (left) and test accuracy (right) per model: the mean with a ±1 sd bar, and each seed as a dot."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = summary["models"]
    x = np.arange(len(names))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, what, label in ((axes[0], "rmia", "RMIA AUC"), (axes[1], "test_accuracy", "test accuracy (%)")):
        stats = [_mean_sd(summary["rows"][n][what]) for n in names]
        ax.errorbar(x, [m for m, _ in stats], yerr=[s for _, s in stats], fmt="o", color="black", capsize=4, label="mean ± sd", zorder=3)
        for j, seed in enumerate(summary["seeds"]):
            offset = (j - (len(summary["seeds"]) - 1) / 2) * 0.08
            ax.scatter(x + offset, [summary["rows"][n][what][j] for n in names], s=14, alpha=0.8, label=f"seed {seed}", zorder=4)
        ax.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[0].set_title(f"Regime {summary['regime']}, {len(summary['seeds'])} seeds", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _summarise(paths: list[Path], out: Path) -> int:
    from protocol._files import atomic_write

    states = []
    for path in paths:
        try:
            states.append(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            _fatal(f"cannot read {path}: {exc}")
    _check_comparable(states, paths)
    for state, path in zip(states, paths, strict=True):
        if "paired" not in state or "member_accuracy" not in state:
            _fatal(f"{path} is from before the paired intervals: rerun it")
    order = np.argsort(_seeds_of(states), kind="stable")
    states, paths = [states[i] for i in order], [paths[i] for i in order]
    summary = summarise_seeds(states)
    sources = [os.path.relpath(p, ROOT) if p.resolve().is_relative_to(ROOT) else str(p) for p in paths]
    summary["sources"] = sources
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out.with_suffix(".json"), (json.dumps(summary, indent=2) + "\n").encode())
    atomic_write(out.with_suffix(".md"), render_seeds_markdown(summary, sources).encode())
    atomic_write(out.with_suffix(".png"), render_seeds_png(summary))
    print(render_seeds_markdown(summary, sources))
    return 0


# ------------------------------------------------------------------------------------ run


def _parser() -> argparse.ArgumentParser:
    from owner.retrain import MembershipDefence

    parser = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--regime", choices=REGIMES, default="memorise", help="memorise (default): dense trained on the members only; generalise: the demo's"
    )
    parser.add_argument("--train-images", type=int, help="the owner's training images (memorise: the members; default 4000; generalise: 6000)")
    parser.add_argument("--dense-epochs", type=int, default=20, help="memorise: epochs of the dense model and of every reference model (default 20)")
    parser.add_argument(
        "--epochs", type=int, help="retraining epochs per pruned model (default memorise: --dense-epochs, to fit the members again; generalise: 3)"
    )
    parser.add_argument("--rates", default="8,16")
    parser.add_argument("--recipe", default="oneshot", help="entity pruning recipe (default oneshot: seconds on 2 shared cores; refit is the demo's)")
    parser.add_argument("--defence-weights", default=f"{MembershipDefence.weight:g}", help="one defended model per weight (comma-separated)")
    parser.add_argument("--defence-steps", type=int, default=MembershipDefence.attack_steps)
    parser.add_argument("--defence-images", type=int)
    parser.add_argument("--members", type=int, help="generalise: members audited (default 1500); memorise: all training images")
    parser.add_argument("--population", type=int, help="RMIA population images (default memorise 10000, generalise 500)")
    parser.add_argument("--reference-models", type=int, default=4)
    parser.add_argument("--reference-epochs", type=int, help="generalise only (default 6); memorise trains them for --dense-epochs")
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-defence", action="store_true", help="skip the defended models")
    parser.add_argument("--quick", action="store_true", help="smoke run: small split, one rate, few epochs, 2 reference models")
    parser.add_argument("--out", type=Path, help="output path, no suffix (default results/privacy_audit; --summarise: results/privacy_audit_seeds)")
    parser.add_argument("--save-logits", type=Path, help="also write every logit the attacks used to this .npz (to re-examine an attack)")
    parser.add_argument("--render-only", action="store_true", help="rewrite the .md and figures from the .json of an earlier run")
    parser.add_argument(
        "--summarise",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="summarise earlier runs that differ only in --seed (their .json files): mean ± sd per model, targets on the mean",
    )
    return parser


def _options(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the per-regime defaults and refuse combinations that would make the audit invalid."""
    if args.regime == "memorise":
        if args.reference_epochs is not None and args.reference_epochs != args.dense_epochs:
            _fatal("--reference-epochs differs from --dense-epochs: in the memorise regime the reference models are trained as the dense model is")
        if args.members is not None and args.members != args.train_images:
            _fatal("--members: in the memorise regime every training image is a member (set --train-images instead)")
    for key, value in DEFAULTS[args.regime].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.regime == "memorise":
        args.members, args.reference_epochs = args.train_images, args.dense_epochs
        args.epochs = args.dense_epochs if args.epochs is None else args.epochs
    elif args.epochs is None:
        args.epochs = 3
    if args.quick:
        args.train_images, args.members = (600, 600) if args.regime == "memorise" else (1500, 300)
        args.epochs, args.rates, args.population, args.defence_images = 1, "8", 300, 500
        args.reference_models, args.bootstrap = 2, 50
        args.dense_epochs = args.reference_epochs = 4 if args.regime == "memorise" else 1
    for key in ("train_images", "dense_epochs", "epochs", "members", "population", "reference_models", "reference_epochs", "defence_images"):
        if getattr(args, key) < 1:
            _fatal(f"--{key.replace('_', '-')} must be at least 1")
    try:
        args.rate_list = [float(r) for r in args.rates.split(",") if r.strip()]
        args.weight_list = [float(w) for w in args.defence_weights.split(",") if w.strip()]
    except ValueError:
        _fatal("--rates and --defence-weights take comma-separated numbers")
    if not args.rate_list or any(r <= 1 for r in args.rate_list) or any(w <= 0 for w in args.weight_list):
        _fatal("--rates needs at least one rate above 1, --defence-weights weights above 0")
    return args


def _memorise_split(args: argparse.Namespace, n_train: int, n_test: int) -> tuple[Any, np.ndarray]:
    """Members, defence reference images, population and reference subsets, disjoint, from one
    permutation of the training split; non-members from the test split."""
    from owner.privacy.auditing import Split

    n, k = args.train_images, args.reference_models
    needed = n + args.defence_images + args.population + k * n
    if needed > n_train or n > n_test:
        _fatal(
            f"{n} members, {args.defence_images} defence images, {args.population} population images and {k} reference sets of {n} need "
            f"{needed} of the {n_train} training images (and {n} of the {n_test} test images): lower --train-images or --reference-models"
        )
    rng = np.random.default_rng(args.seed)
    order, test = rng.permutation(n_train), rng.permutation(n_test)
    members, defence = order[:n], order[n : n + args.defence_images]
    population = order[n + args.defence_images : n + args.defence_images + args.population]
    start = n + args.defence_images + args.population
    references = tuple(order[start + j * n : start + (j + 1) * n] for j in range(k))
    return Split(members, test[:n], population, references), defence


def main(argv: list[str] | None = None) -> int:
    import sys

    args = _parser().parse_args(argv)
    if args.summarise:
        return _summarise(args.summarise, args.out or RESULTS / "privacy_audit_seeds")
    args.out = args.out or RESULTS / "privacy_audit"
    if args.render_only:
        from protocol._files import atomic_write

        try:
            state = json.loads(args.out.with_suffix(".json").read_text())
        except (OSError, ValueError) as exc:
            _fatal(f"cannot read {args.out.with_suffix('.json')}: {exc}; run the benchmark first")
        state["targets"] = _targets(state)
        atomic_write(args.out.with_suffix(".md"), render_markdown(state).encode())
        atomic_write(args.out.with_name(args.out.name + "_summary.png"), render_summary_png(state))
        from owner.privacy.auditing import render_roc_png

        atomic_write(args.out.with_suffix(".png"), render_roc_png(_result_from_state(state)))
        return 0
    args = _options(args)
    torch.set_num_threads(1)
    import entity.pruning  # noqa: F401  # loaded now: a broken pruning package fails before minutes of training, not after
    from owner.privacy.attacks import paired_difference
    from owner.privacy.auditing import AuditSettings, Target, held_out_accuracy, render_roc_png, result_json, run_audit, state_sha256, train_reference
    from protocol._files import atomic_write
    from simulations.models import small_vgg

    started = time.perf_counter()
    load_start = os.getloadavg()[0]

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f}s] {message}", flush=True)

    log(f"regime {args.regime}, load average {load_start:.2f}")
    x_train, y_train, x_test, y_test = _fashion()
    test = TensorDataset(x_test, y_test)
    full_train = TensorDataset(x_train, y_train)
    settings = AuditSettings(
        reference_models=args.reference_models,
        reference_epochs=args.reference_epochs,
        reference_images=args.train_images,
        members=args.members,
        population=args.population,
        bootstrap=args.bootstrap,
        seed=args.seed,
    )
    seconds: dict[str, float] = {}
    if args.regime == "memorise":
        split, defence_idx = _memorise_split(args, len(y_train), len(y_test))
        idx = torch.as_tensor(split.members)
        train = TensorDataset(x_train[idx], y_train[idx])
        reference = TensorDataset(x_train[torch.as_tensor(defence_idx)], y_train[torch.as_tensor(defence_idx)])
        audit_train = full_train
        start = time.perf_counter()
        # The reference models' own training function and settings, so that they are trained as the target is.
        dense = train_reference(small_vgg, train.tensors[0], train.tensors[1], settings, seed=10**6 + args.seed)
        seconds["dense"] = round(time.perf_counter() - start, 1)
        log(f"trained the dense model on {len(train)} members for {args.dense_epochs} epochs in {seconds['dense']:.0f}s")
        dense_what = f"small VGG trained on the {len(train)} members only, {args.dense_epochs} epochs"
    else:
        n = args.train_images
        train = TensorDataset(x_train[:n], y_train[:n])
        reference = TensorDataset(x_train[n : n + args.defence_images], y_train[n : n + args.defence_images])
        audit_train, split = train, None
        dense = _demo_dense()
        dense_what = "demo dense small VGG (trained on all 60,000 training images)"
    targets = [Target("dense", dense, state_sha256(dense.state_dict()), dense_what)]
    for rate in args.rate_list:
        pruned = _prune(dense, rate, args.recipe, log)
        for weight in [None] if args.no_defence else [None, *args.weight_list]:
            name = f"final-{rate:g}x" + ("" if weight is None else "-defence" if len(args.weight_list) == 1 else f"-defence-w{weight:g}")
            model, took = _retrain(pruned, train, reference if weight is not None else None, weight or 0.0, args, log)
            seconds[name] = round(took, 1)
            targets.append(Target(name, model, state_sha256(model.state_dict()), f"pruned {rate:g}x, retrained {args.epochs} epochs"))
    member_accuracy = {t.name: _accuracy(t.model, train) for t in targets}  # type: ignore[arg-type]  # every target is an nn.Module here

    last: dict[str, int] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if done == total or done - last.get(stage, 0) >= max(1, total // 4):
            last[stage] = done
            log(f"audit: {stage} {done}/{total}")

    result = run_audit(targets, small_vgg, audit_train, test, settings, accuracy_of=held_out_accuracy(test), progress=progress, split=split)
    if args.save_logits is not None:
        arrays: dict[str, Any] = {k.replace(":", "__"): v for k, v in result.logits.items()}
        np.savez_compressed(args.save_logits, **arrays)
    by_name = {m.name: m for m in result.models}
    paired = []
    for i, (first, second) in enumerate(_comparisons([m.name for m in result.models])):
        entry: dict[str, Any] = {"first": first, "second": second}
        for attack in ("rmia", "loss"):
            e = paired_difference(by_name[first].scores[attack], by_name[second].scores[attack], rounds=args.bootstrap, seed=args.seed * 104729 + i)
            entry[attack] = {"value": e.value, "low": e.low, "high": e.high}
        paired.append(entry)
    state = {
        "argv": sys.argv[1:] if argv is None else argv,
        "regime": args.regime,
        "seconds": time.perf_counter() - started,
        "load_average": [load_start, os.getloadavg()[0]],
        "cores": os.cpu_count(),
        "train_images": args.train_images,
        "dense_epochs": args.dense_epochs if args.regime == "memorise" else None,
        "epochs": args.epochs,
        "rates": args.rate_list,
        "recipe": args.recipe,
        "defence_weights": args.weight_list,
        "defence_steps": args.defence_steps,
        "defence_images": args.defence_images,
        "retrain_seconds": seconds,
        "member_accuracy": member_accuracy,
        "paired": paired,
        "audit": result_json(result),
    }
    state["targets"] = _targets(state)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out.with_suffix(".json"), (json.dumps(state, indent=2) + "\n").encode())
    atomic_write(args.out.with_suffix(".md"), render_markdown(state).encode())
    atomic_write(args.out.with_suffix(".png"), render_roc_png(result))
    atomic_write(args.out.with_name(args.out.name + "_summary.png"), render_summary_png(state))
    log(f"wrote {args.out.with_suffix('.md')}, load average {os.getloadavg()[0]:.2f}")
    print(render_markdown(state))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
