"""prune(): the interface the entity's flow calls, on tiny exported models."""

from __future__ import annotations

import pytest
import torch

from entity.pruning import PruneConfig, PruneError, PruneResult, prune
from entity.pruning import patterns as pat
from protocol.canonical import dumps
from protocol.spec import InputSpec
from simulations.models import CifarResNet, SmallVGG

SPEC = InputSpec(shape=(1, 12, 12), mean=(0.2860,), std=(0.3530,))


pytestmark = pytest.mark.usefixtures("one_thread")


def _export(model: torch.nn.Module) -> torch.export.ExportedProgram:
    model.eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    return torch.export.export(model, (torch.randn(2, *SPEC.shape),), dynamic_shapes=({0: batch},))


@pytest.fixture(scope="module")
def vgg() -> torch.export.ExportedProgram:
    torch.manual_seed(0)
    return _export(SmallVGG(1, 10, widths=(8, 16, 16)))


@pytest.fixture(scope="module")
def resnet() -> torch.export.ExportedProgram:
    torch.manual_seed(1)
    return _export(CifarResNet(8, 1, 10))


def _check_result(program: torch.export.ExportedProgram, result: PruneResult, library_size: int) -> None:
    ref = program.state_dict
    assert set(result.state_dict) == set(ref)
    for key, value in ref.items():
        assert result.state_dict[key].dtype == value.dtype and result.state_dict[key].shape == value.shape
    lib = {tuple(r) for r in result.report["library"]}
    assert len(lib) == library_size
    for key, mask in result.masks.items():
        assert mask.dtype == torch.bool and mask.shape == ref[key].shape
        weight = result.state_dict[key]
        assert bool((weight[~mask] == 0).all()), f"{key} has weights outside its mask"
        kept = mask.any(dim=(2, 3))
        for kernel in mask[kept].reshape(-1, 9):
            assert tuple(int(v) for v in kernel.tolist()) in lib
        assert not mask[~kept].any()
    dumps(result.report)  # canonical JSON: no floats anywhere


@pytest.mark.parametrize("rate", [2.25, 8.0, 16.0])
def test_oneshot_hits_the_rate_with_library_patterns_only(vgg, rate):
    result = prune(vgg, SPEC, PruneConfig(rate=rate, recipe="oneshot"))
    _check_result(vgg, result, 8)
    report = result.report
    assert report["recipe"] == "oneshot"
    achieved = report["prunable_weights"] / report["kept_weights"]
    assert achieved == pytest.approx(rate, rel=0.01)
    assert report["achieved_rate"] == f"{achieved:.4f}"


def test_stem_and_thin_convs_stay_dense_by_default(vgg, resnet):
    result = prune(vgg, SPEC, PruneConfig(rate=8.0, recipe="oneshot"))
    assert "features.0.weight" not in result.masks
    assert torch.equal(result.state_dict["features.0.weight"], vgg.state_dict["features.0.weight"])
    rres = prune(resnet, SPEC, PruneConfig(rate=8.0, recipe="oneshot"))
    assert "conv1.weight" not in rres.masks
    assert not any("shortcut" in k for k in rres.masks)  # 1x1 convs are never pattern-pruned
    _check_result(resnet, rres, 8)


def test_skip_layers_by_key_or_prefix(vgg, resnet):
    result = prune(vgg, SPEC, PruneConfig(rate=8.0, recipe="oneshot", skip_layers=("features.3.weight",)))
    assert "features.3.weight" not in result.masks and "features.7.weight" in result.masks
    rres = prune(resnet, SPEC, PruneConfig(rate=8.0, recipe="oneshot", skip_layers=("layers.0",)))
    assert not any(k.startswith("layers.0.") for k in rres.masks)
    assert "layers.1.conv1.weight" in rres.masks


def test_pinned_layer_rate_is_exact(vgg):
    result = prune(vgg, SPEC, PruneConfig(rate=12.0, recipe="oneshot", layer_rates=(("features.3.weight", 2.25),)))
    first = result.report["layers"][0]
    assert first["layer"] == "features.3.weight" and first["rate"] == "2.2500"
    achieved = result.report["prunable_weights"] / result.report["kept_weights"]
    assert achieved == pytest.approx(12.0, rel=0.01)


def test_same_seed_same_result(resnet):
    a = prune(resnet, SPEC, PruneConfig(rate=16.0, recipe="oneshot", seed=3))
    b = prune(resnet, SPEC, PruneConfig(rate=16.0, recipe="oneshot", seed=3))
    for key in a.state_dict:
        assert torch.equal(a.state_dict[key], b.state_dict[key])
    assert {k: v for k, v in a.report.items() if k != "seconds"} == {k: v for k, v in b.report.items() if k != "seconds"}


def test_progress_reports_every_layer(vgg):
    events: list[dict] = []
    result = prune(vgg, SPEC, PruneConfig(rate=8.0, recipe="oneshot"), progress=events.append)
    layer_events = [e for e in events if e.get("event") == "layer"]
    assert [e["layer"] for e in layer_events] == [lay["layer"] for lay in result.report["layers"]]
    assert events[-1]["event"] == "done"


def test_bad_requests_raise_prune_error(vgg):
    with pytest.raises(PruneError):
        PruneConfig(rate=2.0)
    with pytest.raises(PruneError):
        PruneConfig(rate=8.0, recipe="no-such-recipe")
    with pytest.raises(PruneError):
        prune(vgg, SPEC, PruneConfig(rate=8.0, recipe="oneshot", skip_layers=("features",)))
    with pytest.raises(PruneError):
        prune(vgg, SPEC, PruneConfig(rate=8.0, recipe="oneshot", layer_rates=(("nope.weight", 4.0),)))
    assert pat.MIN_RATE == 2.25


def test_each_recipe_owns_its_settings_merged_over_its_defaults():
    from entity.pruning import RECIPES, RecipeSettings
    from entity.pruning.admm import AdmmSettings
    from entity.pruning.distill import DistillSettings
    from entity.pruning.refit import RefitSettings
    from entity.pruning.slr import SlrSettings

    assert {name: recipe.settings for name, recipe in RECIPES.items()} == {
        "oneshot": RecipeSettings,
        "admm": AdmmSettings,
        "slr": SlrSettings,
        "refit": RefitSettings,
        "distill": DistillSettings,
    }
    config = PruneConfig(rate=8.0, recipe="admm", options={"admm_iters": 7, "rho_stages": 2})
    assert config.settings == AdmmSettings(admm_iters=7, rho_stages=2)
    assert list(config.settings.rho) == [1e-4, 1e-3]
    assert PruneConfig(rate=8.0, recipe="refit").settings == RefitSettings()
    # SLR takes ADMM's options as well as its own.
    assert PruneConfig(rate=8.0, recipe="slr", options={"admm_lr": 0.1, "slr_m": 50.0}).settings.to_json() == {
        **AdmmSettings(admm_lr=0.1).to_json(),
        "slr_m": 50.0,
        "slr_r": 0.1,
    }


def test_an_unknown_recipe_option_is_refused_naming_the_known_ones():
    with pytest.raises(PruneError) as info:
        PruneConfig(rate=8.0, recipe="admm", options={"damping": 0.1})
    text = str(info.value)
    assert "\n" not in text and "'damping'" in text and "recipe 'admm'" in text
    assert all(name in text for name in ("admm_iters", "admm_lr", "admm_optimiser", "rho_start", "rho_stages"))
    with pytest.raises(PruneError, match="recipe 'oneshot' has no option 'admm_iters'; it takes none"):
        PruneConfig(rate=8.0, recipe="oneshot", options={"admm_iters": 3})


def test_recipe_option_values_are_type_checked():
    with pytest.raises(PruneError, match="'admm_iters' must be an integer"):
        PruneConfig(rate=8.0, recipe="admm", options={"admm_iters": "10"})
    with pytest.raises(PruneError, match="'rescale' must be true or false"):
        PruneConfig(rate=8.0, recipe="refit", options={"rescale": 1})
    with pytest.raises(PruneError, match="allocation must be"):
        PruneConfig(rate=8.0, recipe="refit", options={"allocation": "everywhere"})
    assert PruneConfig(rate=8.0, recipe="refit", options={"damping": 1}).settings.damping == 1  # an int is a number
