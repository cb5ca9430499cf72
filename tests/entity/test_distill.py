"""The distill recipe and the synthesis paths it needs: tiny exported models, a few steps each."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from entity.pruning import RECIPES, PruneConfig, PruneError, prune
from entity.pruning.distill import DistillSettings
from protocol.canonical import dumps
from protocol.spec import InputSpec
from simulations.models import SmallVGG

SPEC = InputSpec(shape=(1, 12, 12), mean=(0.2860,), std=(0.3530,))
FAST = {
    "steps": 150,
    "holdout": 96,
    "holdout_steps": 20,
    "images": 96,
    "refresh_every": 25,
    "refresh_steps": 3,
    "batch_size": 32,
    "lr": 3e-3,
    "temperature": 1.0,
}

pytestmark = pytest.mark.usefixtures("one_thread")


def _export(model: nn.Module, spec: InputSpec = SPEC) -> torch.export.ExportedProgram:
    model.eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    return torch.export.export(model, (torch.randn(2, *spec.shape),), dynamic_shapes=({0: batch},))


def _sharpen(model: nn.Module) -> nn.Module:
    """Scale the classifier so a random-weight model's top-1 varies with its input (else every
    model agrees with every other on everything and agreement measures nothing)."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(300.0)
    return model


class PlainCNN(nn.Module):
    """A BN-free 3x3 CNN: nothing stored for BatchNorm matching to match."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@pytest.fixture(scope="module")
def vgg() -> torch.export.ExportedProgram:
    torch.manual_seed(0)
    return _export(_sharpen(SmallVGG(1, 10, widths=(8, 16, 16))))


@pytest.fixture(scope="module")
def vgg_distilled(vgg) -> object:
    return prune(vgg, SPEC, PruneConfig(rate=16.0, recipe="distill", synthetic_images=96, synthetic_steps=30, options=FAST))


def test_distill_is_a_registered_recipe_with_its_own_budget_settings():
    assert RECIPES["distill"].settings is DistillSettings
    names = DistillSettings.option_names()
    assert {"images", "steps", "time_limit"} <= set(names)
    with pytest.raises(PruneError, match="has no option 'epochs'.*time_limit"):
        PruneConfig(rate=8.0, recipe="distill", options={"epochs": 3})
    with pytest.raises(PruneError, match="base must be one of"):
        PruneConfig(rate=8.0, recipe="distill", options={"base": "admm"})


def test_distillation_raises_holdout_agreement_over_the_layerwise_result(vgg_distilled):
    report = vgg_distilled.report
    before, after = float(report["holdout_agreement_before"]), float(report["holdout_agreement"])
    assert before < 0.95, "the layer-wise result already agrees: the test would prove nothing"
    assert after > before + 0.05


def test_masked_weights_stay_exactly_zero_and_kept_weights_move(vgg, vgg_distilled):
    refit = prune(vgg, SPEC, PruneConfig(rate=16.0, recipe="refit", synthetic_images=96, synthetic_steps=30))
    assert set(vgg_distilled.masks) == set(refit.masks)
    for key, mask in vgg_distilled.masks.items():
        assert torch.equal(mask, refit.masks[key])  # distillation keeps the base recipe's masks
        weight = vgg_distilled.state_dict[key]
        assert int(torch.count_nonzero(weight[~mask])) == 0
        assert not torch.equal(weight, refit.state_dict[key]), f"{key} was not trained"


def test_report_records_recipe_loss_agreement_and_time(vgg_distilled):
    report = vgg_distilled.report
    assert report["recipe"] == "distill" and report["distill_base"] == "refit"
    for key in ("distill_loss", "holdout_agreement", "distill_seconds", "seconds"):
        float(report[key])
    assert report["holdout_images"] == FAST["holdout"]
    assert report["distill_steps"] == FAST["steps"] and report["distill_stopped_by"] == "steps"
    assert report["distill_refreshes"] == (FAST["steps"] - 1) // FAST["refresh_every"]
    dumps(report)  # canonical JSON: no floats


def test_progress_events_report_distillation(vgg):
    events: list[dict] = []
    options = {**FAST, "steps": 60}
    prune(vgg, SPEC, PruneConfig(rate=8.0, recipe="distill", synthetic_images=64, synthetic_steps=10, options=options), events.append)
    steps = [e for e in events if e["event"] == "distill"]
    assert [e["step"] for e in steps[:-1]] == [0, 50, 59]
    assert "agreement" in steps[-1] and steps[-1]["stopped_by"] == "steps"


def test_time_limit_stops_distillation_early(vgg):
    options = {**FAST, "steps": 100000, "time_limit": 3.0}
    result = prune(vgg, SPEC, PruneConfig(rate=8.0, recipe="distill", synthetic_images=64, synthetic_steps=10, options=options))
    assert result.report["distill_stopped_by"] == "time limit"
    assert result.report["distill_steps"] < 100000
    assert float(result.report["distill_seconds"]) < 3.0 + 5.0  # one step or refresh past the limit, then the final measurement


def test_bn_free_model_is_synthesised_by_inversion_and_the_report_says_so():
    torch.manual_seed(3)
    program = _export(_sharpen(PlainCNN()))
    result = prune(program, SPEC, PruneConfig(rate=8.0, recipe="refit", synthetic_images=64, synthetic_steps=20))
    report = result.report
    assert report["synthetic"] == "inversion"
    assert report["error_measured_on"] == "64 class-inversion (no BatchNorm statistics) synthetic images"
    assert "BatchNorm-matched" not in report["error_measured_on"] and "bn " not in report["error_measured_on"]
    assert set(result.masks) == {"body.2.weight", "body.5.weight"}
    options = {**FAST, "refresh_every": 0}  # the default: a fixed pool
    distilled = prune(program, SPEC, PruneConfig(rate=8.0, recipe="distill", synthetic_images=64, synthetic_steps=20, options=options))
    assert distilled.report["synthetic"] == "inversion" and distilled.report["distill_refreshes"] == 0
    assert float(distilled.report["holdout_agreement"]) > float(distilled.report["holdout_agreement_before"])


def test_bn_model_keeps_batchnorm_matching(vgg):
    result = prune(vgg, SPEC, PruneConfig(rate=8.0, recipe="refit", synthetic_images=32, synthetic_steps=5))
    assert result.report["synthetic"] == "bn"
    assert result.report["error_measured_on"] == "32 BatchNorm-matched synthetic images"


def test_mobilenet_v2_depthwise_convs_get_one_pattern_per_channel_and_distillation_keeps_them():
    from torchvision.models import mobilenet_v2

    spec = InputSpec(shape=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), channel_order="RGB")
    torch.manual_seed(4)
    program = _export(_sharpen(mobilenet_v2(num_classes=4)), spec)
    with pytest.raises(PruneError, match="17 depthwise 3x3 conv.*9/4.*whole-model rate.*skip_stem=False"):
        prune(program, spec, PruneConfig(rate=8.0, recipe="oneshot"))
    options = {**FAST, "steps": 20, "holdout": 16, "holdout_steps": 2, "images": 16, "refresh_every": 10, "refresh_steps": 1}
    config = PruneConfig(rate=8.0, recipe="distill", skip_stem=False, min_in_channels=1, synthetic_images=16, synthetic_steps=2, options=options)
    result = prune(program, spec, config)
    report = result.report
    depthwise = [entry["layer"] for entry in report["layers"] if entry["kind"] == "depthwise"]
    assert len(depthwise) == 17 and report["grouped_convs"] == []
    assert set(result.masks) == {"features.0.0.weight", *depthwise}
    library = {tuple(row) for row in report["library"]}
    for key, mask in result.masks.items():
        assert int(torch.count_nonzero(result.state_dict[key][~mask])) == 0  # distillation stayed inside the masks
    for key in depthwise:  # every channel keeps exactly one library pattern
        rows = result.masks[key].reshape(-1, 9).to(torch.int64).tolist()
        assert all(tuple(row) in library for row in rows)
    assert report["achieved_rate"] == "8.0000"  # the conv rate: the stem alone (depthwise convs are not part of it)


def test_auto_device_is_cuda_when_present_else_cpu(vgg):
    result = prune(vgg, SPEC, PruneConfig(rate=8.0, recipe="oneshot", device="auto"))
    assert result.report["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(PruneError, match="device must be"):
        PruneConfig(rate=8.0, device="tpu")
