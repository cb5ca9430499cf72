"""Column allocation, column choice and refit (1x1 / linear) and per-channel patterns (depthwise 3x3)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hs

from entity.pruning import depthwise as dw
from entity.pruning import patterns as pat
from entity.pruning import structured as st
from entity.pruning.refit import damped


@settings(max_examples=60, deadline=None)
@given(
    hs.lists(hs.tuples(hs.integers(1, 40), hs.integers(1, 40)), min_size=1, max_size=6),
    hs.floats(0.0, 1.0),
)
def test_column_allocation_is_as_close_to_the_budget_as_one_column_allows(layers, where):
    rows, cols = [r for r, _ in layers], [c for _, c in layers]
    low, high = sum(rows), sum(r * c for r, c in layers)
    budget = round(low + where * (high - low))
    kept = st.allocate_columns(rows, cols, budget)
    assert all(1 <= k <= c for k, c in zip(kept, cols, strict=True))
    total = sum(r * k for r, k in zip(rows, kept, strict=True))
    # No single column added or removed would bring the total closer to the budget.
    for i, (r, c) in enumerate(layers):
        if kept[i] < c:
            assert abs(budget - total) <= abs(budget - total - r)
        if kept[i] > 1:
            assert abs(budget - total) <= abs(budget - total + r)


def test_column_allocation_gives_every_layer_the_same_fraction_where_it_can():
    assert st.allocate_columns([10, 10, 10], [40, 80, 160], 10 * 70) == [10, 20, 40]
    with pytest.raises(pat.RateError, match="keep between 30 and 2800"):
        st.allocate_columns([10, 10, 10], [40, 80, 160], 29)


def test_column_mask_keeps_whole_input_columns_of_conv_and_linear_shapes():
    columns = torch.tensor([True, False, True])
    conv = st.column_mask((4, 3, 1, 1), columns)
    linear = st.column_mask((5, 3), columns)
    assert conv.shape == (4, 3, 1, 1) and bool(conv[:, 0].all()) and not bool(conv[:, 1].any())
    assert torch.equal(st.columns_of(linear), columns) and torch.equal(st.columns_of(conv), columns)
    assert torch.equal(st.top_columns(torch.tensor([1.0, 3.0, 3.0, 0.5]), 2), torch.tensor([False, True, True, False]))


def _correlated(n: int = 2000, d: int = 12, seed: int = 0) -> torch.Tensor:
    """Inputs whose channels are strongly correlated, so a removed column can be compensated."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 4, generator=g, dtype=torch.float64)
    mix = torch.randn(4, d, generator=g, dtype=torch.float64)
    return base @ mix + 0.05 * torch.randn(n, d, generator=g, dtype=torch.float64)


def test_obs_choice_and_least_squares_refit_beat_column_norms_on_the_layers_outputs():
    g = torch.Generator().manual_seed(1)
    x = _correlated()
    w = torch.randn(6, x.shape[1], generator=g, dtype=torch.float64)
    y = x @ w.T
    gram, cross = damped(x.T @ x, 1e-6), x.T @ y
    keep = 4

    def error(weights: torch.Tensor) -> float:
        return float((x @ weights - y).norm() / y.norm())

    magnitude = st.top_columns(st.column_scores(w), keep)
    obs = st.obs_columns(gram, cross, x.shape[1], keep)
    assert int(obs.sum()) == keep
    plain = (w * magnitude).T  # magnitude columns, dense weights kept as they were
    refit = st.refit_columns(gram, cross, obs)
    assert not bool(refit[~obs].any())  # nothing outside the kept columns
    assert error(refit) < 0.5 * error(plain)
    assert error(st.refit_columns(gram, cross, magnitude)) <= error(plain)


def test_depthwise_patterns_come_from_the_library_and_the_refit_lowers_the_error():
    g = torch.Generator().manual_seed(2)
    conv = torch.nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=True)
    x = torch.randn(32, 6, 10, 10, generator=g)
    x = torch.nn.functional.avg_pool2d(x, 3, 1, 1)  # neighbouring pixels correlate, as in images
    with torch.no_grad():
        y = conv(x) - conv.bias[None, :, None, None]
    library = pat.build_library([conv.weight.detach()], 4)
    stats = dw.accumulate([(x, y)], (1, 1), (1, 1), (1, 1), offset=True)
    cost = dw.pattern_costs(stats, library, 1e-6)
    mask = pat.project_patterns(conv.weight.detach(), library, cost=cost[:, None, :].float())
    lib = {tuple(r) for r in library.reshape(-1, 9).to(torch.int64).tolist()}
    assert mask.shape == (6, 1, 3, 3) and all(tuple(r) in lib for r in mask.reshape(-1, 9).to(torch.int64).tolist())
    w, offset = dw.refit(stats, mask, 1e-6)
    assert not bool(w[~mask].any()) and offset is not None
    projected = conv.weight.detach() * pat.project_patterns(conv.weight.detach(), library)
    assert dw.relative_error(stats, w, offset) < dw.relative_error(stats, projected.double(), torch.zeros(6, dtype=torch.float64))
