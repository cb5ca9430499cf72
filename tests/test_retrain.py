"""Masked retraining keeps pruned weights exactly zero and still learns."""
from __future__ import annotations

import pytest
import torch

from owner.retrain import MaskError, apply_masks, check_masks, evaluate, masked_retrain
from protocol.spec import RetrainRecipe
from simulations.models import small_vgg


def _random_masks(model: torch.nn.Module, keep: float = 0.3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        name: torch.rand(p.shape, generator=g) < keep
        for name, p in model.named_parameters()
        if p.dim() == 4 and p.shape[-1] == 3
    }


def _toy_loader(n: int = 64, batch: int = 16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 28, 28, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()  # a learnable rule
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def test_pruned_weights_stay_zero_through_every_step():
    torch.manual_seed(0)
    model = small_vgg()
    masks = _random_masks(model)
    seen_steps = []

    def on_epoch(stats, m):
        # Inside training the parametrized weight is what the forward pass sees.
        check_masks(m, masks)
        seen_steps.append(stats.epoch)

    recipe = RetrainRecipe(epochs=2, lr=0.05, weight_decay=5e-4, milestones=(1,))
    masked_retrain(model, masks, _toy_loader(), recipe, on_epoch=on_epoch)
    check_masks(model, masks)
    assert seen_steps == [1, 2]
    # State dict keys are plain again (masks squashed) and the kept weights moved.
    assert "features.3.weight" in model.state_dict()


def test_retraining_learns_a_simple_rule():
    torch.manual_seed(0)
    model = small_vgg(num_classes=2)
    masks = _random_masks(model, keep=0.5)
    loader = _toy_loader(256, 32)
    before = evaluate(model, loader)
    masked_retrain(model, masks, loader, RetrainRecipe(epochs=4, lr=0.05, milestones=()))
    assert evaluate(model, loader) > max(before, 0.8)


def test_check_masks_detects_a_leak():
    model = small_vgg()
    masks = _random_masks(model)
    apply_masks(model, masks)
    check_masks(model, masks)
    with torch.no_grad():
        model.features[3].weight[~masks["features.3.weight"]] += 1.0
    with pytest.raises(MaskError, match="features.3.weight"):
        check_masks(model, masks)


def test_mask_of_wrong_shape_is_refused():
    model = small_vgg()
    with pytest.raises(MaskError, match="shape"):
        apply_masks(model, {"features.0.weight": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(MaskError, match="names no"):
        apply_masks(model, {"nothing.weight": torch.ones(2, dtype=torch.bool)})
