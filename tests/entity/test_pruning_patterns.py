"""Pattern library, projections and exact rate allocation (pure tensor functions)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from entity.pruning import patterns as pat


def _weight(o: int = 6, i: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(o, i, 3, 3, generator=torch.Generator().manual_seed(seed))


def test_candidates_are_the_56_four_entry_patterns_with_centre():
    cands = pat.candidate_patterns()
    assert cands.shape == (56, 9)
    assert bool(cands[:, pat.CENTRE].all())
    assert cands.sum(dim=1).tolist() == [4] * 56
    assert len({tuple(r.tolist()) for r in cands}) == 56


def test_natural_pattern_is_centre_plus_three_largest_neighbours():
    w = torch.zeros(1, 1, 3, 3)
    w.view(-1)[:] = torch.tensor([0.1, -5.0, 0.2, 0.3, 0.0, 4.0, -3.0, 0.05, 0.01])
    pid = int(pat.natural_pattern_ids(w)[0])
    chosen = pat.candidate_patterns()[pid].nonzero().flatten().tolist()
    assert chosen == [1, 4, 5, 6]


def test_library_holds_the_most_frequent_natural_patterns():
    w = _weight(4, 4)
    # Make 10 kernels share one pattern: it must be first in the library.
    favourite = torch.zeros(9)
    favourite[[0, 2, 4, 8]] = 10.0
    w2 = favourite.view(1, 1, 3, 3).repeat(10, 1, 1, 1)
    lib = pat.build_library([w, w2], size=3)
    assert lib.shape == (3, 3, 3)
    assert lib[0].reshape(-1).nonzero().flatten().tolist() == [0, 2, 4, 8]
    assert torch.equal(lib, pat.build_library([w, w2], size=3))


def test_pattern_projection_uses_only_library_patterns_and_keeps_most_energy():
    w = _weight()
    lib = pat.build_library([w], size=4)
    mask = pat.project_patterns(w, lib)
    flat_lib = {tuple(r.reshape(-1).tolist()) for r in lib}
    energy = w.pow(2)
    for o in range(w.shape[0]):
        for i in range(w.shape[1]):
            kernel_mask = mask[o, i]
            assert tuple(kernel_mask.reshape(-1).tolist()) in flat_lib
            kept = float((energy[o, i] * kernel_mask).sum())
            best = max(float((energy[o, i] * p).sum()) for p in lib)
            assert kept == pytest.approx(best)


def test_projection_is_idempotent():
    w = _weight(8, 8, seed=3)
    lib = pat.build_library([w], size=8)
    mask = pat.project(w, lib, keep=20)
    again = pat.project(w * mask, lib, keep=20)
    assert torch.equal(mask, again)


def test_connectivity_keeps_exactly_the_largest_kernels():
    scores = torch.tensor([[3.0, 1.0], [2.0, 2.0]])
    assert pat.connectivity_mask(scores, 2).tolist() == [[True, False], [True, False]]
    assert int(pat.connectivity_mask(scores, 3).sum()) == 3
    with pytest.raises(pat.RateError):
        pat.connectivity_mask(scores, 5)


def test_rate_below_pattern_only_is_refused():
    with pytest.raises(pat.RateError):
        pat.kept_kernels_for_rate(100, 2.0)
    assert pat.kept_kernels_for_rate(100, 2.25) == 100


@settings(max_examples=60, deadline=None)
@given(kernels=st.lists(st.integers(1, 5000), min_size=1, max_size=12), rate=st.floats(2.25, 40.0))
def test_allocation_hits_the_global_rate_exactly(kernels, rate):
    assume(pat.kept_kernels_for_rate(sum(kernels), rate) >= len(kernels))
    out = pat.allocate_kernels(kernels, rate)
    assert sum(out) == pat.kept_kernels_for_rate(sum(kernels), rate)
    assert all(1 <= k <= n for k, n in zip(out, kernels, strict=False))


def test_allocation_respects_pinned_layer_rates():
    kernels = [256, 512, 1024, 4096]
    out = pat.allocate_kernels(kernels, 12.0, fixed={0: 2.25})
    assert out[0] == 256
    assert sum(out) == pat.kept_kernels_for_rate(sum(kernels), 12.0)
    with pytest.raises(pat.RateError):
        pat.allocate_kernels([100, 100], 30.0, fixed={0: 2.25})
    with pytest.raises(pat.RateError):  # one kernel per layer is the floor
        pat.allocate_kernels([1, 1], 4.0)


def test_uniform_allocation_gives_every_layer_the_same_rate():
    out = pat.allocate_kernels([256, 512, 1024], 8.0)
    rates = [9 * n / (4 * k) for n, k in zip([256, 512, 1024], out, strict=False)]
    assert max(rates) - min(rates) < 0.2
