"""Masked retraining keeps pruned weights exactly zero and still learns."""

from __future__ import annotations

import pytest
import torch

from owner.retrain import MaskError, apply_masks, check_masks, evaluate, masked_retrain
from protocol.spec import RetrainRecipe
from simulations.models import small_vgg


def _random_masks(model: torch.nn.Module, keep: float = 0.3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {name: torch.rand(p.shape, generator=g) < keep for name, p in model.named_parameters() if p.dim() == 4 and p.shape[-1] == 3}


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

    recipe = RetrainRecipe(epochs=2, lr=0.05, weight_decay=5e-4, milestones=(1,), schedule="step")
    history = masked_retrain(model, masks, _toy_loader(), recipe, on_epoch=on_epoch)
    check_masks(model, masks)
    assert seen_steps == [1, 2]
    assert [h.lr for h in history] == pytest.approx([0.05, 0.005])  # the step schedule's milestone
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


def test_cosine_schedule_ends_near_zero_whatever_the_epoch_count():
    torch.manual_seed(0)
    model = small_vgg(num_classes=2)
    masks = _random_masks(model, keep=0.5)
    recipe = RetrainRecipe(epochs=2, lr=0.05, schedule="cosine")
    history = masked_retrain(model, masks, _toy_loader(64, 16), recipe)
    # Per-step cosine over the whole run: the second of two epochs starts exactly half-way down.
    assert [h.lr for h in history] == pytest.approx([0.05, 0.025])
    check_masks(model, masks)


def test_distillation_needs_the_dense_teacher_and_keeps_zeros():
    torch.manual_seed(0)
    teacher = small_vgg(num_classes=2).eval()
    model = small_vgg(num_classes=2)
    model.load_state_dict(teacher.state_dict())
    masks = _random_masks(model, keep=0.5)
    recipe = RetrainRecipe(epochs=1, lr=0.05, distill=0.7, temperature=4)
    with pytest.raises(ValueError, match="teacher"):
        masked_retrain(model, masks, _toy_loader(), recipe)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    masked_retrain(model, masks, _toy_loader(), recipe, teacher=teacher)
    check_masks(model, masks)
    # The teacher is only read, never trained.
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_distillation_loss_pulls_towards_the_teacher():
    from owner.retrain import retrain_loss

    logits = torch.zeros(4, 3, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0])

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return torch.tensor([[5.0, 0, 0]]).repeat(len(x), 1)

    plain = retrain_loss(logits, labels, RetrainRecipe(), None, torch.zeros(4, 1))
    mixed = retrain_loss(logits, labels, RetrainRecipe(distill=1.0, temperature=1.0), Fixed(), torch.zeros(4, 1))
    assert float(plain.detach()) == pytest.approx(float(torch.log(torch.tensor(3.0))))
    mixed.backward()
    # Pure distillation: the gradient raises class 0 for every sample, whatever the label.
    assert bool((logits.grad[:, 0] < 0).all())


def test_recipe_round_trips_and_old_recipes_still_parse():
    from protocol.spec import SpecError

    recipe = RetrainRecipe(epochs=3, lr=0.02, schedule="cosine", distill=0.5, temperature=2, batch_size=128)
    assert RetrainRecipe.from_json(recipe.to_json()) == recipe
    # A recipe from before schedules existed meant the step schedule.
    old = {
        "optimizer": "sgd",
        "epochs": 3,
        "lr": "0.01",
        "momentum": "0.9",
        "weight_decay": "0.0005",
        "milestones": [2],
        "gamma": "0.1",
        "batch_size": 256,
    }
    assert RetrainRecipe.from_json(old) == RetrainRecipe(lr=0.01, batch_size=256, schedule="step")
    with pytest.raises(SpecError, match="schedule"):
        RetrainRecipe.from_json({**recipe.to_json(), "schedule": "warp"})
    with pytest.raises(SpecError, match="distillation"):
        RetrainRecipe(distill=1.5)
