"""Masked retraining on the owner's private data: pruned weights stay exactly zero throughout.

The mask is attached as a parametrization (weight = original * mask, as torch.ao.pruning's
FakeSparsity does), so the forward pass never sees a pruned weight and its gradient is zero by
construction. Momentum and weight decay could still move the hidden original, so the mask is also
re-applied to it after every optimiser step, and :func:`check_masks` verifies the invariant at the
end. Nothing here leaves the owner: it is plain torch code on local tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn
from torch.nn.utils import parametrize

from protocol.spec import RetrainRecipe


class MaskError(ValueError):
    """A mask does not fit the model, or a pruned weight became nonzero."""


class _FakeSparsity(nn.Module):
    """weight * mask, the mask a non-trainable buffer."""

    mask: torch.Tensor

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool), persistent=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def _owner_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_path, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(module_path) if module_path else model
    except AttributeError as exc:
        raise MaskError(f"mask {name!r} names no module of the model") from exc
    if not isinstance(getattr(module, attr, None), torch.Tensor):
        raise MaskError(f"mask {name!r} names no weight of the model")
    return module, attr


def _check_shapes(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    for name, mask in masks.items():
        module, attr = _owner_of(model, name)
        weight = getattr(module, attr)
        if tuple(weight.shape) != tuple(mask.shape):
            raise MaskError(f"mask {name!r} has shape {tuple(mask.shape)}, the weight {tuple(weight.shape)}")


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Hard-prune in place: zero every weight entry whose mask is False."""
    _check_shapes(model, masks)
    with torch.no_grad():
        for name, mask in masks.items():
            module, attr = _owner_of(model, name)
            getattr(module, attr).mul_(mask.to(getattr(module, attr).device, torch.bool))


def attach_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Make each masked weight a parametrization ``original * mask`` (the original is pruned too)."""
    apply_masks(model, masks)
    for name, mask in masks.items():
        module, attr = _owner_of(model, name)
        device = getattr(module, attr).device
        parametrize.register_parametrization(module, attr, _FakeSparsity(mask.to(device)))


def _parametrizations(module: nn.Module) -> nn.ModuleDict:
    """``module.parametrizations`` (torch types module attributes as Tensor | Module)."""
    return cast(nn.ModuleDict, module.parametrizations)


def squash_masks(model: nn.Module) -> None:
    """Bake the masked weights in and remove the parametrizations (plain state_dict keys again)."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for attr in list(_parametrizations(module).keys()):
                parametrize.remove_parametrizations(module, attr, leave_parametrized=True)


def _reapply(model: nn.Module) -> None:
    with torch.no_grad():
        for module in model.modules():
            if parametrize.is_parametrized(module):
                for plist in _parametrizations(module).values():
                    # A ParametrizationList: the parametrizations, and the raw weight as ``original``.
                    original = cast(torch.Tensor, plist.original)
                    for p in cast(nn.ModuleList, plist):
                        if isinstance(p, _FakeSparsity):
                            original.mul_(p.mask)


def check_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`MaskError` if any pruned weight entry is nonzero."""
    for name, mask in masks.items():
        module, attr = _owner_of(model, name)
        weight = getattr(module, attr).detach()
        leaked = int(torch.count_nonzero(weight[~mask.to(weight.device, torch.bool)]))
        if leaked:
            raise MaskError(f"{leaked} pruned entries of {name!r} are nonzero")


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    loss: float
    train_accuracy: float
    lr: float


def masked_retrain(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    recipe: RetrainRecipe,
    *,
    epochs: int | None = None,
    device: str | torch.device = "cpu",
    on_step: Callable[[int, int], None] | None = None,
    on_epoch: Callable[[EpochStats, nn.Module], None] | None = None,
    teacher: nn.Module | None = None,
) -> list[EpochStats]:
    """Retrain ``model`` in place with SGD per ``recipe``, keeping masked weights exactly zero.

    ``loader`` yields (images, labels) batches and is iterated once per epoch. ``on_step(epoch, step)``
    reports progress; ``on_epoch`` sees the model (masks baked in view) after each epoch, e.g. to
    evaluate. ``teacher`` is the owner's dense model, used when ``recipe.distill`` > 0 (it is
    required then: a recipe asking for distillation without one is a caller error). Returns
    per-epoch statistics; the masks are squashed into the weights at the end.
    """
    epochs = recipe.epochs if epochs is None else epochs
    if recipe.distill > 0:
        if teacher is None:
            raise ValueError("the retraining recipe distils from the dense model, but no teacher was given")
        teacher = teacher.to(device).eval()
    model.to(device)
    attach_masks(model, masks)
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    per_step = recipe.schedule == "cosine"
    if per_step:
        try:
            total = max(1, epochs * len(loader))  # type: ignore[arg-type]  # an Iterable; a TypeError is handled below
        except TypeError:
            raise ValueError("the cosine schedule needs a loader with a length (batches per epoch)") from None
        scheduler: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)
    else:
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(recipe.milestones), gamma=recipe.gamma)
    history: list[EpochStats] = []
    try:
        for epoch in range(epochs):
            model.train()
            total_loss, correct, seen = 0.0, 0, 0
            lr = optimizer.param_groups[0]["lr"]
            for step, (images, labels) in enumerate(loader):
                images, labels = images.to(device), labels.to(device)
                optimizer.zero_grad(set_to_none=True)
                logits = model(images)
                loss = retrain_loss(logits, labels, recipe, teacher, images)
                loss.backward()
                optimizer.step()
                _reapply(model)
                if per_step:
                    scheduler.step()
                total_loss += float(loss.detach()) * len(labels)
                correct += int((logits.argmax(1) == labels).sum())
                seen += len(labels)
                if on_step is not None:
                    on_step(epoch, step)
            if not per_step:
                scheduler.step()
            stats = EpochStats(epoch + 1, total_loss / max(seen, 1), correct / max(seen, 1), lr)
            history.append(stats)
            if on_epoch is not None:
                on_epoch(stats, model)
    finally:
        squash_masks(model)
    check_masks(model, masks)
    return history


def retrain_loss(logits: torch.Tensor, labels: torch.Tensor, recipe: RetrainRecipe, teacher: nn.Module | None, images: torch.Tensor) -> torch.Tensor:
    """Cross-entropy, mixed with temperature-scaled KL to the dense teacher when the recipe distils.

    The KL term is multiplied by T^2 so its gradient scale does not shrink with the temperature.
    """
    ce = nn.functional.cross_entropy(logits, labels)
    if recipe.distill <= 0 or teacher is None:
        return ce
    with torch.no_grad():
        target = nn.functional.log_softmax(teacher(images) / recipe.temperature, dim=1)
    t = recipe.temperature
    kl = nn.functional.kl_div(nn.functional.log_softmax(logits / t, dim=1), target, reduction="batchmean", log_target=True)
    return (1 - recipe.distill) * ce + recipe.distill * t * t * kl


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy in eval mode (a fraction in [0, 1])."""
    was_training = model.training
    model.eval().to(device)
    correct, seen = 0, 0
    for images, labels in loader:
        logits = model(images.to(device))
        correct += int((logits.argmax(1) == labels.to(device)).sum())
        seen += len(labels)
    model.train(was_training)
    return correct / max(seen, 1)
