"""The owner's result check recomputes every rate a report claims: conv, whole-model and per layer.

Each hostile result is an honest one (a small mobile model pruned by the engine with a whole-model
rate) with one thing changed; ``PruneResult.from_files`` must refuse it with one line naming it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from protocol.contract import PruneResult
from protocol.errors import ProtocolError
from protocol.spec import InputSpec, PruneRequest, RetrainLimits, RetrainRecipe
from protocol.tensors import graph_roles

SPEC = InputSpec((3, 16, 16), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "RGB")
REQUEST = PruneRequest(4.0, model_rate=4.0)


class _Mobile(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 2, 1)
        self.dw = nn.Conv2d(16, 16, 3, 1, 1, groups=16)
        self.pw = nn.Conv2d(16, 32, 1)
        self.conv = nn.Conv2d(32, 32, 3, 1, 1)
        self.fc = nn.Linear(32, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.pw(torch.relu(self.dw(torch.relu(self.stem(x))))))
        x = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return self.head(torch.relu(self.fc(x)))


@pytest.fixture(scope="module")
def honest(one_thread) -> tuple[torch.export.ExportedProgram, Any]:
    from entity.pruning import PruneConfig, prune

    torch.manual_seed(0)
    program = torch.export.export(_Mobile().eval(), (torch.randn(2, *SPEC.shape),))
    return program, prune(program, SPEC, PruneConfig(rate=4.0, model_rate=4.0, recipe="oneshot", eval_images=2))


def _check(honest, mutate: Callable[[dict[str, Any]], None] | None = None, request: PruneRequest = REQUEST) -> PruneResult:
    program, result = honest
    parts = {"state": dict(result.state_dict), "masks": {k: v.clone() for k, v in result.masks.items()}, "report": copy.deepcopy(result.report)}
    if mutate is not None:
        mutate(parts)
    files = PruneResult(parts["state"], parts["masks"], parts["report"], RetrainRecipe(), receipt=b"{}").files()
    return PruneResult.from_files(
        files, dense=program.state_dict, roles=graph_roles(program), limits=RetrainLimits(), verify_signed=lambda blob, kind: None, request=request
    )


def _refused(honest, mutate: Callable[[dict[str, Any]], None], match: str, request: PruneRequest = REQUEST) -> None:
    with pytest.raises(ProtocolError, match=match) as info:
        _check(honest, mutate, request)
    assert "\n" not in str(info.value)


def test_honest_result_passes_with_both_rates(honest):
    checked = _check(honest)
    assert set(checked.masks) == {"dw.weight", "pw.weight", "conv.weight", "fc.weight", "head.weight"}
    assert checked.achieved_rate == "4.0000" and float(checked.achieved_model_rate or 0) == pytest.approx(4.0, rel=0.01)


def test_wrong_claimed_whole_model_rate_is_refused(honest):
    _refused(
        honest,
        lambda p: p["report"].update(achieved_model_rate="5.0000"),
        r"claims a whole-model rate of 5.0000, the masks achieve [34]\.\d+ \(12992 weights",
    )


def test_missing_whole_model_rate_is_refused_when_structured_layers_are_masked(honest):
    _refused(honest, lambda p: p["report"].pop("achieved_model_rate"), "achieved_model_rate is missing")


def test_wrong_model_weight_count_is_refused(honest):
    _refused(honest, lambda p: p["report"].update(model_kept_weights=1), "model_kept_weights is 1")


def test_wrong_per_layer_rate_is_refused(honest):
    def wrong(parts):
        entry = next(e for e in parts["report"]["layers"] if e["layer"] == "fc.weight")
        entry["rate"] = "2.0000"

    _refused(honest, wrong, "claims a rate for fc.weight of 2.0000")


def test_layer_called_the_wrong_kind_is_refused(honest):
    def wrong(parts):
        next(e for e in parts["report"]["layers"] if e["layer"] == "dw.weight")["kind"] = "1x1"

    _refused(honest, wrong, "calls dw.weight a 1x1 layer; the model's graph makes it depthwise")


def test_report_listing_an_unmasked_layer_as_pruned_is_refused(honest):
    _refused(honest, lambda p: p["report"]["layers"].append({"layer": "stem.weight", "rate": "2.2500"}), "lists stem.weight as a pruned layer")


def test_columns_mask_that_cuts_a_column_in_part_is_refused(honest):
    def partial(parts):
        mask = parts["masks"]["fc.weight"]
        column = int(mask.any(dim=0).nonzero()[0])
        mask[0, column] = False
        parts["state"]["fc.weight"] = parts["state"]["fc.weight"] * mask

    _refused(honest, partial, "'fc.weight' cuts input column")


def test_depthwise_pattern_outside_the_library_is_refused(honest):
    def outside(parts):
        library = {tuple(row) for row in parts["report"]["library"]}
        from entity.pruning.patterns import candidate_patterns

        row = next(r for r in candidate_patterns() if tuple(int(v) for v in r) not in library)
        parts["masks"]["dw.weight"][0, 0] = row.reshape(3, 3)
        parts["state"]["dw.weight"] = parts["state"]["dw.weight"] * parts["masks"]["dw.weight"]

    _refused(honest, outside, "'dw.weight' uses pattern .* not in the report's pattern library")


def test_conv_rate_claimed_without_any_3x3_mask_is_refused(honest):
    def no_conv(parts):
        parts["masks"].pop("conv.weight")
        parts["state"]["conv.weight"] = honest[0].state_dict["conv.weight"]
        parts["report"]["layers"] = [e for e in parts["report"]["layers"] if e["layer"] != "conv.weight"]

    _refused(honest, no_conv, "claims a conv rate .* but no 3x3 convolution")


def test_structured_masks_are_refused_when_the_request_named_no_whole_model_rate(honest):
    _refused(honest, lambda p: None, "'fc.weight' is on a 1x1 or linear weight, but the request named no whole-model rate", request=PruneRequest(4.0))
