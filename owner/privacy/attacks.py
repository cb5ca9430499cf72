"""Membership-inference attack scores and their metrics: pure numpy over per-image logits.

Every attack maps logits (and, for the calibrated ones, reference models' logits) to one score per
image, higher meaning "more likely a member". Metrics compare members' and non-members' scores:
ROC AUC (Mann-Whitney, ties counted half), balanced accuracy at the best threshold (the "attack
accuracy" membership-inference papers report on balanced sets), and TPR at a fixed low FPR (the
measure LiRA argues for: an attack that confidently identifies a few members matters even when
its AUC is near 0.5). Bootstrap intervals resample members and non-members independently.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

ATTACK_TITLES = {
    "loss": "loss threshold (Yeom et al. 2018)",
    "confidence": "top-class confidence (Salem et al. 2019)",
    "entropy": "modified entropy (Song & Mittal 2021)",
    "lira": "offline LiRA, fixed variance (Carlini et al. 2022)",
    "rmia": "offline RMIA (Zarifzadeh et al. 2024)",
}
# Offline RMIA approximates the IN models' probability from the OUT ones with this factor; the
# paper tunes it per data set, 0.33 is the value privacy-meter's offline configurations ship with.
RMIA_OFFLINE_A = 0.33
RMIA_GAMMA = 1.0
FPR_POINTS = (0.01, 0.001)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def true_class_logprob(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return _log_softmax(logits)[np.arange(len(labels)), labels]


def scaled_logit(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """LiRA's statistic log(p_y / (1 - p_y)), computed from the logits without rounding p_y to 1
    (Carlini et al. 2022, eq. 4: z_y minus the log-sum-exp of the other classes)."""
    picked = logits[np.arange(len(labels)), labels]
    others = logits.copy()
    others[np.arange(len(labels)), labels] = -np.inf
    top = others.max(axis=1, keepdims=True)
    return picked - (top[:, 0] + np.log(np.exp(others - top).sum(axis=1)))


def loss_score(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Minus the cross-entropy loss: members were fitted, so their loss is lower."""
    return true_class_logprob(logits, labels)


def confidence_score(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The top softmax probability, whatever the label (the label-free attack)."""
    return np.exp(_log_softmax(logits).max(axis=1))


def entropy_score(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Minus Song & Mittal's modified entropy, which uses the label:
    Mentr = -(1 - p_y) log p_y - sum over i != y of p_i log(1 - p_i)."""
    logp = _log_softmax(logits)
    p = np.exp(logp)
    rows = np.arange(len(labels))
    p_y = p[rows, labels]
    log1m = np.log(np.clip(1.0 - p, 1e-30, None))
    term = p * log1m
    term[rows, labels] = 0.0
    mentr = -(1.0 - p_y) * logp[rows, labels] - term.sum(axis=1)
    return -mentr


def lira_score(target: np.ndarray, references: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Offline LiRA: how far the target's scaled logit lies above the OUT reference models'
    mean, in units of one standard deviation pooled over all images (the fixed-variance variant,
    better than per-image variances with few reference models). ``references``: (K, N, C)."""
    observed = scaled_logit(target, labels)
    ref = np.stack([scaled_logit(r, labels) for r in references])
    mean = ref.mean(axis=0)
    std = float(np.sqrt(((ref - mean) ** 2).mean())) if len(ref) > 1 else float(ref.std())
    return (observed - mean) / max(std, 1e-6)


def rmia_ratio(target: np.ndarray, references: np.ndarray, labels: np.ndarray, a: float = RMIA_OFFLINE_A) -> np.ndarray:
    """Pr(x | target) / Pr(x), with Pr(x) from OUT reference models by the offline rule
    Pr(x) = ((1 + a) Pr_OUT(x) + (1 - a)) / 2 (Zarifzadeh et al. 2024, appendix B.2.2)."""
    p_target = np.exp(true_class_logprob(target, labels))
    p_out = np.mean([np.exp(true_class_logprob(r, labels)) for r in references], axis=0)
    return p_target / (0.5 * ((1.0 + a) * p_out + (1.0 - a)))


def rmia_score(ratio_x: np.ndarray, ratio_z: np.ndarray, gamma: float = RMIA_GAMMA) -> np.ndarray:
    """The share of population images z that x dominates: Pr_z(ratio_x / ratio_z >= gamma)."""
    ordered = np.sort(ratio_z)
    return np.searchsorted(ordered, ratio_x / gamma, side="right") / len(ordered)


# ------------------------------------------------------------------------------------ metrics


def roc(members: np.ndarray, non_members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every distinct threshold, from (0, 0) to (1, 1)."""
    scores = np.concatenate([members, non_members])
    is_member = np.concatenate([np.ones(len(members)), np.zeros(len(non_members))])
    order = np.argsort(-scores, kind="mergesort")
    scores, is_member = scores[order], is_member[order]
    last = np.r_[np.nonzero(np.diff(scores))[0], len(scores) - 1]  # the last index of each distinct score
    tp = np.cumsum(is_member)[last]
    fp = np.cumsum(1 - is_member)[last]
    return np.r_[0.0, fp / len(non_members)], np.r_[0.0, tp / len(members)]


def auc(members: np.ndarray, non_members: np.ndarray) -> float:
    """P(member score > non-member score) + half P(equal): the Mann-Whitney statistic."""
    scores = np.concatenate([members, non_members])
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)
    ranks = (upper - (counts - 1) / 2.0)[inverse]  # average rank of tied values, 1-based
    n_m, n_n = len(members), len(non_members)
    return float((ranks[:n_m].sum() - n_m * (n_m + 1) / 2.0) / (n_m * n_n))


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """The largest TPR reached with FPR at most ``target``."""
    return float(tpr[fpr <= target + 1e-12].max())


def balanced_accuracy(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """The best (TPR + TNR) / 2 over thresholds."""
    return float(((tpr + 1.0 - fpr) / 2.0).max())


def metrics(members: np.ndarray, non_members: np.ndarray) -> dict[str, float]:
    fpr, tpr = roc(members, non_members)
    out = {"auc": auc(members, non_members), "balanced_accuracy": balanced_accuracy(fpr, tpr)}
    for point in FPR_POINTS:
        out[fpr_key(point)] = tpr_at_fpr(fpr, tpr, point)
    return out


def fpr_key(point: float) -> str:
    """``tpr_at_1pct_fpr``, ``tpr_at_0.1pct_fpr``: the metric names the results carry."""
    return f"tpr_at_{point * 100:g}pct_fpr"


METRICS = ("auc", "balanced_accuracy", *(fpr_key(p) for p in FPR_POINTS))


@dataclass(frozen=True)
class Estimate:
    """A metric with its bootstrap 95% percentile interval."""

    value: float
    low: float
    high: float


def bootstrap(members: np.ndarray, non_members: np.ndarray, *, rounds: int, seed: int) -> dict[str, Estimate]:
    """Each metric on the full sample, with the 2.5th and 97.5th percentiles over ``rounds``
    resamples (members and non-members drawn with replacement, each at its own size)."""
    point = metrics(members, non_members)
    if rounds <= 0:
        return {k: Estimate(v, v, v) for k, v in point.items()}
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(rounds):
        m = members[rng.integers(0, len(members), len(members))]
        n = non_members[rng.integers(0, len(non_members), len(non_members))]
        for k, v in metrics(m, n).items():
            draws[k].append(v)
    return {k: Estimate(point[k], float(np.percentile(draws[k], 2.5)), float(np.percentile(draws[k], 97.5))) for k in point}


def paired_difference(
    first: tuple[np.ndarray, np.ndarray], second: tuple[np.ndarray, np.ndarray], *, rounds: int, seed: int, metric: str = "auc"
) -> Estimate:
    """``metric`` of the first (members, non-members) scores minus the second's, with a 95%
    interval from resampling the images jointly: both score sets must be of the same images in the
    same order (two models attacked on one audit set). Comparing two models' separate intervals
    ignores that their scores move together with the images, so it misses differences that this
    paired interval establishes."""
    (m1, n1), (m2, n2) = first, second
    if len(m1) != len(m2) or len(n1) != len(n2):
        raise ValueError("a paired difference needs both score sets on the same members and non-members")
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}: choose from {', '.join(METRICS)}")
    value = metrics(m1, n1)[metric] - metrics(m2, n2)[metric]
    if rounds <= 0:
        return Estimate(value, value, value)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(rounds):
        m, n = rng.integers(0, len(m1), len(m1)), rng.integers(0, len(n1), len(n1))
        draws.append(metrics(m1[m], n1[n])[metric] - metrics(m2[m], n2[n])[metric])
    return Estimate(value, float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5)))


Scorer = Callable[[np.ndarray, np.ndarray], np.ndarray]
PLAIN: Mapping[str, Scorer] = {"loss": loss_score, "confidence": confidence_score, "entropy": entropy_score}


def attack_scores(
    target: np.ndarray,
    references: np.ndarray,
    labels: np.ndarray,
    population_target: np.ndarray,
    population_references: np.ndarray,
    population_labels: np.ndarray,
) -> dict[str, np.ndarray]:
    """Every attack's score for each audited image. ``target``: (N, C) logits of the audited
    model; ``references``: (K, N, C) of the reference models on the same images; the population
    arrays: the same for RMIA's population images z (never in any reference model's training)."""
    out = {name: fn(target, labels) for name, fn in PLAIN.items()}
    out["lira"] = lira_score(target, references, labels)
    ratio_z = rmia_ratio(population_target, population_references, population_labels)
    out["rmia"] = rmia_score(rmia_ratio(target, references, labels), ratio_z)
    return out
