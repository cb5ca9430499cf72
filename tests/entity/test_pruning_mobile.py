"""Depthwise 3x3 pattern pruning and structured 1x1 / linear pruning for a whole-model rate, end to end.

The engine's choice of layers must be the owner's plan (``protocol.prune_plan``), its masks must
pass the owner's result checks (``PruneResult.from_files``), and the pruned model must compile
with codegen and match PyTorch.
"""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from torch import nn

from entity.pruning import PruneConfig, PruneError, prune
from entity.pruning.engine import prepare
from protocol.contract import PruneResult
from protocol.prune_plan import model_rate_bounds, prune_plan
from protocol.spec import InputSpec, PruneRequest, RetrainLimits, RetrainRecipe
from protocol.tensors import graph_roles

SPEC = InputSpec((3, 32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "RGB")
SMALL = InputSpec((3, 16, 16), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "RGB")
# The refit recipe at its cheapest real setting: uniform noise instead of BatchNorm matching.
FAST_REFIT = {"recipe": "refit", "synthetic": "uniform", "synthetic_images": 16, "eval_images": 8}

pytestmark = pytest.mark.usefixtures("one_thread")


def _export(model: nn.Module, spec: InputSpec) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1, max=1024)
    return torch.export.export(model.eval(), (torch.randn(2, *spec.shape),), dynamic_shapes=({0: batch},))


def _torchvision(name: str) -> nn.Module:
    import torchvision

    torch.manual_seed(3)
    return getattr(torchvision.models, name)(weights=None).eval()


class MobileNoBN(nn.Module):
    """A BN-free mobile block stack: stem, depthwise 3x3 + 1x1 pairs, a grouped conv, a depthwise 5x5 conv, two linears."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 2, 1)
        self.dw1 = nn.Conv2d(16, 16, 3, 1, 1, groups=16)
        self.pw1 = nn.Conv2d(16, 32, 1)
        self.conv = nn.Conv2d(32, 32, 3, 1, 1)
        self.grouped = nn.Conv2d(32, 32, 3, 1, 1, groups=8)
        self.dw2 = nn.Conv2d(32, 32, 3, 2, 1, groups=32)
        self.five = nn.Conv2d(32, 32, 5, 1, 2, groups=32)
        self.pw2 = nn.Conv2d(32, 128, 1)
        self.fc = nn.Linear(128, 128)
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.pw1(torch.relu(self.dw1(x))))
        x = torch.relu(self.grouped(torch.relu(self.conv(x))))
        x = torch.relu(self.pw2(torch.relu(self.five(torch.relu(self.dw2(x))))))
        return self.head(torch.relu(self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))))


@pytest.fixture(scope="module")
def mobilenet() -> tuple[nn.Module, torch.export.ExportedProgram]:
    model = _torchvision("mobilenet_v2")
    return model, _export(model, SPEC)


def _owner_checks(program: torch.export.ExportedProgram, result, request: PruneRequest) -> PruneResult:
    """The owner's own checks of a result (signatures aside): every mask, every claimed rate."""
    files = PruneResult(result.state_dict, result.masks, result.report, RetrainRecipe(), receipt=b"{}").files()
    return PruneResult.from_files(
        files, dense=program.state_dict, roles=graph_roles(program), limits=RetrainLimits(), verify_signed=lambda blob, kind: None, request=request
    )


def test_mobilenet_v2_meets_a_whole_model_rate_passes_the_owner_checks_and_compiles(mobilenet, tmp_path):
    model, program = mobilenet
    result = prune(program, SPEC, PruneConfig(rate=8.0, model_rate=8.0, **FAST_REFIT))
    report = result.report
    assert float(report["achieved_model_rate"]) == pytest.approx(8.0, rel=1e-3)
    assert report["target_model_rate"] == "8.0000" and "achieved_rate" not in report  # no group-1 3x3 conv besides the stem
    kinds = {entry["kind"]: entry["pruning"] for entry in report["layers"]}
    assert kinds == {"depthwise": "pattern", "1x1": "columns", "linear": "columns"}
    assert all(entry["rate"] == "2.2500" for entry in report["layers"] if entry["kind"] == "depthwise")
    assert [entry["layer"] for entry in report["dense_layers"]] == ["features.0.0.weight"]  # the stem
    checked = _owner_checks(program, result, PruneRequest(8.0, model_rate=8.0))
    assert checked.achieved_model_rate == report["achieved_model_rate"]
    # The classifier keeps every class (row) and loses whole input columns.
    head = result.masks["classifier.1.weight"]
    assert bool(head.any(dim=1).all()) and not bool(head.all())

    from codegen import HOST
    from codegen.verify import export, verify

    if shutil.which("cc") is None:
        pytest.skip("host C compiler missing (Debian package gcc)")
    final = copy.deepcopy(model)  # the program shares the model's tensors: leave both as they were
    final.load_state_dict(result.state_dict)
    verified = verify(export(final, SPEC.shape), result.masks, HOST, tmp_path, n=2)
    assert verified.error <= 1e-4
    assert {r.kind for r in verified.generated.layers} >= {"depthwise", "dense"}


def test_least_squares_refit_beats_magnitude_on_structured_and_depthwise_layers(mobilenet):
    _, program = mobilenet
    refit = prune(program, SPEC, PruneConfig(rate=8.0, model_rate=6.0, **FAST_REFIT))
    oneshot = prune(program, SPEC, PruneConfig(rate=8.0, model_rate=6.0, recipe="oneshot", eval_images=8))
    assert refit.report["achieved_model_rate"] == oneshot.report["achieved_model_rate"]  # the same allocation

    def mean_error(result, kinds: set[str]) -> float:
        errors = [float(e["error"]) for e in result.report["layers"] if e["kind"] in kinds]
        return sum(errors) / len(errors)

    assert mean_error(refit, {"1x1", "linear"}) < 0.9 * mean_error(oneshot, {"1x1", "linear"})
    assert mean_error(refit, {"depthwise"}) < mean_error(oneshot, {"depthwise"})


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18", "bn-free"])
@pytest.mark.parametrize("model_rate", [None, 6.0], ids=["conv-rate", "model-rate"])
def test_owner_plan_names_exactly_the_layers_the_engine_prunes(name, model_rate):
    if name == "bn-free":
        torch.manual_seed(0)
        model, spec = MobileNoBN(), SMALL
    else:
        model, spec = _torchvision(name), SPEC
    program = _export(model, spec)
    plan = prune_plan(program, ("layer1.0",) if name == "resnet18" else (), model_rate=model_rate)
    config = PruneConfig(rate=6.0, model_rate=model_rate, recipe="oneshot", skip_layers=("layer1.0",) if name == "resnet18" else ())
    planned = {p.weight for p in plan if p.pruned}
    if name == "mobilenet_v2" and model_rate is None:  # nothing for the conv rate: both sides refuse
        with pytest.raises(PruneError, match="no prunable 3x3 convolution.*17 depthwise 3x3.*whole-model rate"):
            prepare(program, spec, config)
        assert all(p.kind == "depthwise conv" for p in plan if p.pruned)
        return
    job = prepare(program, spec, config)
    assert {lay.key for lay in job.pruned_layers()} == planned
    engine_how = {lay.key: "pattern" for lay in [*job.layers, *job.depthwise]} | {lay.key: "columns" for lay in job.structured}
    assert {p.weight: p.pruning for p in plan if p.pruned} == engine_how
    if model_rate is not None:
        low, high = model_rate_bounds(plan, 6.0) or (0.0, 0.0)
        assert low <= model_rate <= high


def test_bn_free_model_keeps_grouped_5x5_and_stem_dense_and_says_why():
    torch.manual_seed(0)
    program = _export(MobileNoBN(), SMALL)
    result = prune(program, SMALL, PruneConfig(rate=4.0, model_rate=4.0, **FAST_REFIT))
    assert set(result.masks) == {"dw1.weight", "pw1.weight", "conv.weight", "dw2.weight", "pw2.weight", "fc.weight", "head.weight"}
    assert {e["layer"]: e["kind"] for e in result.report["dense_layers"]} == {"stem.weight": "3x3", "grouped.weight": "other", "five.weight": "other"}
    assert float(result.report["achieved_model_rate"]) == pytest.approx(4.0, rel=0.01)
    assert result.report["achieved_rate"] == "4.0000"  # the one group-1 3x3 conv
    _owner_checks(program, result, PruneRequest(4.0, model_rate=4.0))
    plan = {p.weight: p.why for p in prune_plan(program, model_rate=4.0)}
    assert "stem" in plan["stem.weight"] and "grouped" in plan["grouped.weight"] and "other than 3x3" in plan["five.weight"]


def test_without_a_model_rate_1x1_and_linear_layers_stay_dense_and_depthwise_convs_are_pattern_pruned():
    torch.manual_seed(0)
    program = _export(MobileNoBN(), SMALL)
    result = prune(program, SMALL, PruneConfig(rate=4.0, recipe="oneshot", eval_images=4))
    assert set(result.masks) == {"dw1.weight", "conv.weight", "dw2.weight"}
    assert "target_model_rate" not in result.report
    _owner_checks(program, result, PruneRequest(4.0))


def test_a_whole_model_rate_out_of_reach_is_one_line_naming_the_reachable_range():
    torch.manual_seed(0)
    program = _export(MobileNoBN(), SMALL)
    with pytest.raises(PruneError) as info:
        prune(program, SMALL, PruneConfig(rate=4.0, model_rate=500.0, recipe="oneshot"))
    message = str(info.value)
    assert "\n" not in message and "whole-model rate 500 cannot be met at conv rate 4" in message and "between" in message
    with pytest.raises(PruneError, match="whole-model rate must be a number of at least 1"):
        PruneConfig(rate=4.0, model_rate=0.5)


def test_wide_structured_layers_are_chosen_by_input_energy_and_still_refitted(monkeypatch):
    """Past ``MAX_GRAM_COLUMNS`` inputs no full Gram matrix is formed; the kept columns are still refitted."""
    from entity.pruning import extra_layers

    torch.manual_seed(0)
    program = _export(MobileNoBN(), SMALL)
    config = {"rate": 4.0, "model_rate": 4.0, "eval_images": 8}
    magnitude = prune(program, SMALL, PruneConfig(**config, recipe="oneshot"))
    monkeypatch.setattr(extra_layers, "MAX_GRAM_COLUMNS", 40)  # fc and head (128 inputs) take the wide path
    wide = prune(program, SMALL, PruneConfig(**config, **{k: v for k, v in FAST_REFIT.items() if k != "eval_images"}))
    _owner_checks(program, wide, PruneRequest(4.0, model_rate=4.0))

    def error(result, key: str) -> float:
        return float(next(e["error"] for e in result.report["layers"] if e["layer"] == key))

    assert error(wide, "head.weight") < error(magnitude, "head.weight")
