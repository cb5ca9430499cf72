"""What the owner tells the entity about its data and its request: the only data facts that cross.

The input specification (shape, channel order, pixel range, normalisation) is all the entity ever
learns about the owner's data; the audit trail lists it as such. Fractions are kept as decimal
strings on the wire because signed JSON carries no floats (see ``canonical``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any


class SpecError(ValueError):
    """A specification or request is malformed."""


def _decimal_str(value: float | str, what: str) -> str:
    try:
        dec = Decimal(str(value))
    except InvalidOperation as exc:
        raise SpecError(f"{what}: {value!r} is not a number") from exc
    if not dec.is_finite():
        raise SpecError(f"{what}: {value!r} is not finite")
    return format(dec.normalize(), "f") if dec != 0 else "0"


@dataclass(frozen=True)
class InputSpec:
    """Shape (C, H, W), channel order, raw pixel range and the model's own normalisation.

    A model sees ``(pixel / (pixel_max - pixel_min) - mean) / std`` per channel, where pixels lie in
    ``[pixel_min, pixel_max]`` (the usual torchvision ``ToTensor`` + ``Normalize``).
    """

    shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channel_order: str = "L"
    pixel_min: int = 0
    pixel_max: int = 255

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or any((not isinstance(d, int)) or d <= 0 for d in self.shape):
            raise SpecError(f"input shape must be three positive integers (C, H, W), got {self.shape!r}")
        channels = self.shape[0]
        if len(self.mean) != channels or len(self.std) != channels:
            raise SpecError(f"mean and std need {channels} values each (one per channel)")
        if any(float(s) <= 0 for s in self.std):
            raise SpecError("std values must be positive")
        if self.channel_order not in {"L", "RGB", "BGR"}:
            raise SpecError(f"channel order must be L, RGB or BGR, got {self.channel_order!r}")
        if len(self.channel_order) != channels and not (self.channel_order == "L" and channels == 1):
            raise SpecError(f"channel order {self.channel_order} does not match {channels} channels")
        if not self.pixel_min < self.pixel_max:
            raise SpecError("pixel range must have pixel_min < pixel_max")

    def to_json(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "channel_order": self.channel_order,
            "pixel_range": [self.pixel_min, self.pixel_max],
            "mean": [_decimal_str(m, "mean") for m in self.mean],
            "std": [_decimal_str(s, "std") for s in self.std],
        }

    @classmethod
    def from_json(cls, data: Any) -> "InputSpec":
        try:
            lo, hi = data["pixel_range"]
            return cls(
                shape=tuple(int(d) for d in data["shape"]),  # type: ignore[arg-type]
                mean=tuple(float(Decimal(str(m))) for m in data["mean"]),
                std=tuple(float(Decimal(str(s))) for s in data["std"]),
                channel_order=str(data["channel_order"]),
                pixel_min=int(lo),
                pixel_max=int(hi),
            )
        except (KeyError, TypeError, ValueError, InvalidOperation) as exc:
            raise SpecError(f"malformed input specification: {exc}") from exc


@dataclass(frozen=True)
class PruneRequest:
    """The owner's pruning request: target conv compression rate and layers to leave dense."""

    rate: float
    skip_layers: tuple[str, ...] = field(default_factory=tuple)
    recipe: str | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.rate, (int, float)) and 1.0 <= float(self.rate) <= 1000.0):
            raise SpecError(f"compression rate must be between 1 and 1000, got {self.rate!r}")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rate": _decimal_str(self.rate, "rate"), "skip_layers": list(self.skip_layers)}
        if self.recipe is not None:
            out["recipe"] = self.recipe
        return out

    @classmethod
    def from_json(cls, data: Any) -> "PruneRequest":
        try:
            recipe = data.get("recipe")
            return cls(
                rate=float(Decimal(str(data["rate"]))),
                skip_layers=tuple(str(s) for s in data.get("skip_layers", [])),
                recipe=None if recipe is None else str(recipe),
            )
        except (KeyError, TypeError, AttributeError, ValueError, InvalidOperation) as exc:
            raise SpecError(f"malformed pruning request: {exc}") from exc


SCHEDULES = ("step", "cosine")


@dataclass(frozen=True)
class RetrainRecipe:
    """How the owner should retrain with the mask: configuration, never code.

    SGD with momentum. ``schedule`` is ``"step"`` (the learning rate is multiplied by ``gamma`` at
    each epoch listed in ``milestones``) or ``"cosine"`` (per step from ``lr`` down to zero over
    the whole run, whatever its length, so a 1-epoch run also ends at a small learning rate).
    ``distill`` > 0 mixes in distillation from the owner's own dense model (Hinton et al.: KL at
    ``temperature``, weight ``distill``): the dense model never leaves the owner, so this costs
    no privacy. ``epochs`` may be overridden by the owner (it is the owner's compute).

    The defaults won the retraining comparison recorded in
    ``benchmarks/results/paper_table_step_recipe.md`` (small VGG at 16x on Fashion-MNIST, one seed):
    cosine from 0.05 at batch 64 reached 91.4% after 3 epochs where the earlier step schedule
    (0.01, x0.1 at epoch 3, batch 256) reached 89.9%, and 89.8-90.1% vs 88.1% after 1 epoch;
    distillation (weight 0.7) did not help (89.3%), so it is off by default.
    """

    epochs: int = 3
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: tuple[int, ...] = (2,)
    gamma: float = 0.1
    batch_size: int = 64
    schedule: str = "cosine"
    distill: float = 0.0
    temperature: float = 4.0

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size <= 0:
            raise SpecError("retraining epochs must be >= 0 and batch size > 0")
        if not (0 < self.lr < 10 and 0 <= self.momentum < 1 and 0 <= self.weight_decay < 1 and 0 < self.gamma <= 1):
            raise SpecError("retraining hyper-parameters out of range")
        if self.schedule not in SCHEDULES:
            raise SpecError(f"unknown retraining schedule {self.schedule!r} (known: {', '.join(SCHEDULES)})")
        if not (0 <= self.distill <= 1 and 0 < self.temperature <= 100):
            raise SpecError("distillation weight must lie in [0, 1] and temperature in (0, 100]")

    def to_json(self) -> dict[str, Any]:
        return {
            "optimizer": "sgd",
            "epochs": self.epochs,
            "lr": _decimal_str(self.lr, "lr"),
            "momentum": _decimal_str(self.momentum, "momentum"),
            "weight_decay": _decimal_str(self.weight_decay, "weight_decay"),
            "milestones": list(self.milestones),
            "gamma": _decimal_str(self.gamma, "gamma"),
            "batch_size": self.batch_size,
            "schedule": self.schedule,
            "distill": _decimal_str(self.distill, "distill"),
            "temperature": _decimal_str(self.temperature, "temperature"),
        }

    @classmethod
    def from_json(cls, data: Any) -> "RetrainRecipe":
        try:
            if data.get("optimizer", "sgd") != "sgd":
                raise SpecError(f"unsupported optimizer {data.get('optimizer')!r}")
            return cls(
                epochs=int(data["epochs"]),
                lr=float(Decimal(str(data["lr"]))),
                momentum=float(Decimal(str(data["momentum"]))),
                weight_decay=float(Decimal(str(data["weight_decay"]))),
                milestones=tuple(int(m) for m in data.get("milestones", [])),
                gamma=float(Decimal(str(data["gamma"]))),
                batch_size=int(data["batch_size"]),
                schedule=str(data.get("schedule", "step")),
                distill=float(Decimal(str(data.get("distill", "0")))),
                temperature=float(Decimal(str(data.get("temperature", "4")))),
            )
        except (KeyError, TypeError, AttributeError, ValueError, InvalidOperation) as exc:
            raise SpecError(f"malformed retraining recipe: {exc}") from exc
