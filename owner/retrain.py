"""Masked retraining on the owner's private data: pruned weights stay exactly zero throughout.

The mask is attached as a parametrization (weight = original * mask, as torch.ao.pruning's
FakeSparsity does), so the forward pass never sees a pruned weight and its gradient is zero by
construction. Momentum and weight decay could still move the hidden original, so the mask is also
re-applied to it after every optimiser step, and :func:`check_masks` verifies the invariant at the
end. Nothing here leaves the owner: it is plain torch code on local tensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

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


@dataclass(frozen=True)
class MembershipDefence:
    """Opt-in defence against membership inference during masked retraining: the min-max game of
    Nasr et al. (CCS 2018), which MCMIA (Wang et al.) plays while retraining a compressed model.

    An attack model learns to tell the training batch (members) from a reference set of the
    owner's images that retraining never uses (non-members), from the model's softmax output and
    the label; the model then minimises its loss plus ``weight`` times the attack's log-probability
    of calling its training images members. ``attack_steps`` attack updates come before each model
    update (Nasr et al.'s k). Off by default: without it retraining is unchanged.
    """

    weight: float = 3.0
    attack_steps: int = 2
    attack_lr: float = 1e-2
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.weight > 0 or self.attack_steps < 1 or not self.attack_lr > 0:
            raise ValueError("the membership defence needs weight > 0, attack_steps >= 1 and attack_lr > 0")


class _MembershipAttack(nn.Module):
    """Nasr et al.'s attack model: the prediction vector and the one-hot label through their own
    layers, joined, then one logit for "member"."""

    def __init__(self, classes: int):
        super().__init__()
        self.prediction = nn.Sequential(nn.Linear(classes, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU())
        self.label = nn.Sequential(nn.Linear(classes, 32), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        onehot = nn.functional.one_hot(labels, probs.shape[1]).to(probs.dtype)
        return self.head(torch.cat([self.prediction(probs), self.label(onehot)], dim=1)).squeeze(1)


class _Adversary:
    """The attack model, its optimiser and an endless stream of reference (non-member) batches."""

    def __init__(self, defence: MembershipDefence, reference: Iterable[tuple[torch.Tensor, torch.Tensor]], device: str | torch.device):
        self.defence = defence
        self.device = device
        self._reference = reference
        self._batches: Iterator[tuple[torch.Tensor, torch.Tensor]] = iter(())
        self.attack: _MembershipAttack | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    def _next_reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        for _ in range(2):
            for images, labels in self._batches:
                return images.to(self.device), labels.to(self.device)
            self._batches = iter(self._reference)  # a new pass over the reference set
        raise ValueError("the membership defence's reference set is empty")

    def _build(self, classes: int) -> tuple[_MembershipAttack, torch.optim.Optimizer]:
        if self.attack is None or self.optimizer is None:
            with torch.random.fork_rng(devices=[]):  # the model's own random stream stays as without the defence
                torch.manual_seed(self.defence.seed)
                self.attack = _MembershipAttack(classes).to(self.device)
            self.optimizer = torch.optim.Adam(self.attack.parameters(), lr=self.defence.attack_lr)
        return self.attack, self.optimizer

    def penalty(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Train the attack ``attack_steps`` times, then return ``weight * mean log h(member)`` over
        the training batch, differentiable in the model's logits only."""
        attack, optimizer = self._build(logits.shape[1])
        model.eval()  # attack inputs in eval mode: BatchNorm statistics never see reference images
        try:
            with torch.no_grad():  # the model does not change during the attack's steps: one forward pass serves them all
                member = torch.softmax(model(images), dim=1)
            for _ in range(self.defence.attack_steps):
                ref_images, ref_labels = self._next_reference()
                with torch.no_grad():
                    non_member = torch.softmax(model(ref_images), dim=1)
                scores = torch.cat([attack(member, labels), attack(non_member, ref_labels)])
                truth = torch.cat([torch.ones(len(labels)), torch.zeros(len(ref_labels))]).to(scores.device)
                optimizer.zero_grad(set_to_none=True)
                nn.functional.binary_cross_entropy_with_logits(scores, truth).backward()
                optimizer.step()
        finally:
            model.train()
        attack.requires_grad_(False)
        try:
            gain = nn.functional.logsigmoid(attack(torch.softmax(logits, dim=1), labels)).mean()
        finally:
            attack.requires_grad_(True)
        return self.defence.weight * gain


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
    resume: Mapping[str, Any] | None = None,
    on_checkpoint: Callable[[Mapping[str, Any]], None] | None = None,
    defence: MembershipDefence | None = None,
    defence_reference: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> list[EpochStats]:
    """Retrain ``model`` in place with SGD per ``recipe``, keeping masked weights exactly zero.

    ``loader`` yields (images, labels) batches and is iterated once per epoch. ``on_step(epoch, step)``
    reports progress; ``on_epoch`` sees the model (masks baked in view) after each epoch, e.g. to
    evaluate. ``teacher`` is the owner's dense model, used when ``recipe.distill`` > 0 (it is
    required then: a recipe asking for distillation without one is a caller error). Returns
    per-epoch statistics; the masks are squashed into the weights at the end.

    ``defence`` turns on the membership-inference defence (:class:`MembershipDefence`); it needs
    ``defence_reference``, batches of the owner's images that ``loader`` does not hold.

    ``on_checkpoint`` receives, after each epoch, what :func:`masked_retrain` needs to go on from
    there (``resume=`` that mapping): the epoch, the model with its masks attached, the optimiser
    and the schedule. A run cut short (Ctrl-C, a crash) thus loses at most one epoch.
    """
    epochs = recipe.epochs if epochs is None else epochs
    adversary = None
    if defence is not None:
        if defence_reference is None:
            raise ValueError("the membership defence needs defence_reference: owner images that retraining does not use")
        adversary = _Adversary(defence, defence_reference, device)
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
    first = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        first = int(resume["epoch"])
        history = [EpochStats(**h) for h in resume.get("history", [])]
    try:
        for epoch in range(first, epochs):
            model.train()
            total_loss, correct, seen = 0.0, 0, 0
            lr = optimizer.param_groups[0]["lr"]
            for step, (images, labels) in enumerate(loader):
                images, labels = images.to(device), labels.to(device)
                optimizer.zero_grad(set_to_none=True)
                logits = model(images)
                loss = retrain_loss(logits, labels, recipe, teacher, images)
                if adversary is not None:
                    loss = loss + adversary.penalty(model, images, labels, logits)
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
            if on_checkpoint is not None:
                on_checkpoint(
                    {
                        "epoch": epoch + 1,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "history": [dataclasses.asdict(h) for h in history],
                    }
                )
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
