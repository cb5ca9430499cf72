"""The attack metrics against closed-form values, and the attack scores on known cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from owner.privacy import attacks
from owner.privacy.reading import ATTACKS


def _phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def _phi_inv(p: float) -> float:
    lo, hi = -10.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _phi(mid) < p else (lo, mid)
    return lo


@pytest.mark.parametrize("shift", [0.0, 0.5, 1.5])
def test_auc_and_tpr_at_low_fpr_match_the_gaussian_closed_form(shift: float) -> None:
    rng = np.random.default_rng(1)
    members, non_members = rng.normal(shift, 1, 200_000), rng.normal(0, 1, 200_000)
    m = attacks.metrics(members, non_members)
    assert m["auc"] == pytest.approx(_phi(shift / math.sqrt(2)), abs=0.003)
    for point in attacks.FPR_POINTS:  # TPR at FPR a is 1 - Phi(Phi^-1(1 - a) - shift)
        assert m[attacks.fpr_key(point)] == pytest.approx(1 - _phi(_phi_inv(1 - point) - shift), abs=0.01 if point >= 0.01 else 0.005)
    assert m["balanced_accuracy"] == pytest.approx(_phi(shift / 2), abs=0.005)


def test_auc_counts_ties_as_half_and_orders_correctly() -> None:
    assert attacks.auc(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0.5
    assert attacks.auc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert attacks.auc(np.array([0.0]), np.array([1.0])) == 0.0


def test_bootstrap_interval_brackets_the_estimate_and_narrows_with_more_data() -> None:
    rng = np.random.default_rng(2)
    small = attacks.bootstrap(rng.normal(0.5, 1, 100), rng.normal(0, 1, 100), rounds=200, seed=0)["auc"]
    large = attacks.bootstrap(rng.normal(0.5, 1, 2000), rng.normal(0, 1, 2000), rounds=200, seed=0)["auc"]
    assert small.low <= small.value <= small.high and large.low <= large.value <= large.high
    assert (large.high - large.low) < (small.high - small.low) / 2


def test_scaled_logit_is_stable_where_the_probability_rounds_to_one() -> None:
    logits = np.array([[60.0, 0.0, 0.0]])
    assert attacks.scaled_logit(logits, np.array([0]))[0] == pytest.approx(60 - math.log(2), abs=1e-9)


def test_calibrated_attacks_find_what_the_references_did_not_fit() -> None:
    """LiRA and RMIA score an image high when the target fits it better than the references do."""
    rng = np.random.default_rng(3)
    n, classes = 400, 10
    labels = rng.integers(0, classes, n)
    refs = rng.normal(0, 1, (4, n, classes))
    target = refs.mean(axis=0).copy()
    target[np.arange(n // 2), labels[: n // 2]] += 3.0  # the target fits the first half (its "members")
    pop_labels = rng.integers(0, classes, 200)
    pop_refs = rng.normal(0, 1, (4, 200, classes))
    scores = attacks.attack_scores(target, refs, labels, pop_refs.mean(axis=0), pop_refs, pop_labels)
    for name in ("lira", "rmia"):
        assert attacks.auc(scores[name][: n // 2], scores[name][n // 2 :]) > 0.9, name
    assert set(scores) == set(ATTACKS)


def test_paired_difference_establishes_a_shift_the_separate_intervals_cannot() -> None:
    """Two models scored on the same images: the second is the first plus a small extra member
    shift and per-image noise. Separately their AUC intervals overlap; paired, the interval of the
    difference lies above 0, and it is centred on the difference of the two AUCs."""
    rng = np.random.default_rng(4)
    n = 1500
    members, non_members = rng.normal(0.3, 1, n), rng.normal(0, 1, n)
    shifted = (members + 0.08 + rng.normal(0, 0.1, n), non_members + rng.normal(0, 0.1, n))
    a, b = attacks.bootstrap(*shifted, rounds=200, seed=0)["auc"], attacks.bootstrap(members, non_members, rounds=200, seed=0)["auc"]
    assert a.low <= b.high and b.low <= a.high  # the separate intervals overlap
    d = attacks.paired_difference(shifted, (members, non_members), rounds=200, seed=0)
    assert d.value == pytest.approx(a.value - b.value)
    assert 0 < d.low <= d.value <= d.high


def test_paired_difference_of_the_same_scores_is_exactly_zero_and_mismatches_are_refused() -> None:
    rng = np.random.default_rng(5)
    scores = (rng.normal(1, 1, 300), rng.normal(0, 1, 300))
    d = attacks.paired_difference(scores, scores, rounds=50, seed=0)
    assert (d.value, d.low, d.high) == (0.0, 0.0, 0.0)
    reverse = attacks.paired_difference((scores[1][:300], scores[0]), scores, rounds=50, seed=0)
    assert reverse.high < 0  # first minus second: a worse first model gives a negative difference
    with pytest.raises(ValueError, match="same members and non-members"):
        attacks.paired_difference(scores, (scores[0][:10], scores[1]), rounds=5, seed=0)
    with pytest.raises(ValueError, match="unknown metric"):
        attacks.paired_difference(scores, scores, rounds=5, seed=0, metric="precision")
