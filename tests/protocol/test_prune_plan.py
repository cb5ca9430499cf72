"""The owner's plan (which layers are pruned, how, and why not) and the request's whole-model rate."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from protocol.prune_plan import model_rate_bounds, prune_plan, pruned_share
from protocol.spec import PruneRequest, SpecError


class _Mixed(nn.Module):
    """One layer of every kind the plan tells apart."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.thin = nn.Conv2d(8, 2, 1)
        self.narrow = nn.Conv2d(2, 8, 3, padding=1)  # fewer than 4 input channels
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.dw5 = nn.Conv2d(8, 8, 5, padding=2, groups=8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.pw = nn.Conv2d(8, 16, 1)
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.narrow(self.thin(self.stem(x)))
        x = self.conv(self.pw(self.grouped(self.dw5(self.dw(x)))))
        return self.head(x.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def program() -> torch.export.ExportedProgram:
    torch.manual_seed(0)
    return torch.export.export(_Mixed().eval(), (torch.randn(1, 3, 8, 8),))


def test_conv_rate_plan_prunes_3x3_and_depthwise_and_says_why_the_rest_stays_dense(program):
    plan = {p.weight: p for p in prune_plan(program, skip=("conv",))}
    assert {k for k, p in plan.items() if p.pruned} == {"dw.weight"}
    assert plan["dw.weight"].pruning == "pattern" and "per channel" in plan["dw.weight"].why
    assert "stem" in plan["stem.weight"].why
    assert "fewer than 4 input channels" in plan["narrow.weight"].why
    assert "other than 3x3" in plan["dw5.weight"].why and "grouped" in plan["grouped.weight"].why
    assert "--skip" in plan["conv.weight"].why
    for key in ("thin.weight", "pw.weight", "head.weight"):
        assert not plan[key].pruned and "--model-rate" in plan[key].why


def test_model_rate_plan_adds_1x1_and_linear_layers_by_whole_columns(program):
    plan = {p.weight: p for p in prune_plan(program, model_rate=4.0)}
    assert {k: p.pruning for k, p in plan.items() if p.pruned} == {
        "thin.weight": "columns",
        "dw.weight": "pattern",
        "pw.weight": "columns",
        "conv.weight": "pattern",
        "head.weight": "columns",
    }
    assert not plan["narrow.weight"].pruned and "fewer than 4" in plan["narrow.weight"].why
    pruned, total = pruned_share(plan.values())
    assert 0 < pruned < total == sum(p.params for p in plan.values())


def test_model_rate_bounds_span_one_column_each_to_dense_structured_layers(program):
    plan = prune_plan(program, model_rate=4.0)
    low, high = model_rate_bounds(plan, 4.0) or (math.nan, math.nan)
    assert 1.0 < low < high
    assert model_rate_bounds(prune_plan(program), 4.0) is None  # no structured layer without a model rate


def test_request_without_a_model_rate_serialises_exactly_as_before():
    assert PruneRequest(8.0).to_json() == {"rate": "8", "skip_layers": []}
    assert PruneRequest.from_json({"rate": "8", "skip_layers": []}) == PruneRequest(8.0)


def test_request_with_a_model_rate_round_trips():
    request = PruneRequest(8.0, ("stem",), "refit", model_rate=12.5)
    assert request.to_json() == {"rate": "8", "skip_layers": ["stem"], "recipe": "refit", "model_rate": "12.5"}
    assert PruneRequest.from_json(request.to_json()) == request


@pytest.mark.parametrize("value", [0.5, 1001.0, float("nan"), float("inf"), True, "8"])
def test_out_of_range_model_rate_is_one_line(value):
    with pytest.raises(SpecError, match="whole-model compression rate must be between 1 and 1000") as info:
        PruneRequest(8.0, model_rate=value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("value", ["nan", "abc", "0", [8]])
def test_malformed_model_rate_on_the_wire_is_refused(value):
    with pytest.raises(SpecError, match="malformed pruning request"):
        PruneRequest.from_json({"rate": "8", "skip_layers": [], "model_rate": value})
