"""What the owner tells the entity about its data and its request: the only data facts that cross.

The input specification (shape, channel order, pixel range, normalisation) is all the entity ever
learns about the owner's data; the audit trail lists it as such. Fractions are kept as decimal
strings on the wire because signed JSON carries no floats (see ``canonical``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from .display import printable
from .errors import ProtocolError

__all__ = ["InputSpec", "MAX_MILESTONES", "PruneRequest", "RetrainLimits", "RetrainRecipe", "SCHEDULES", "SpecError"]


class SpecError(ProtocolError, ValueError):
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

    The shape is bounded because the entity allocates synthetic images of it (256 by default):
    at most ``MAX_CHANNELS`` channels, ``MAX_SIDE`` pixels a side and ``MAX_ELEMENTS`` values
    (2**20, e.g. 3x512x512 or 1x1024x1024: 1 GiB for 256 float32 images), so a request cannot
    make the entity allocate more than that before a single check runs.
    """

    MAX_CHANNELS = 16
    MAX_SIDE = 1024
    MAX_ELEMENTS = 1 << 20

    shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channel_order: str = "L"
    pixel_min: int = 0
    pixel_max: int = 255

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or any((not isinstance(d, int)) or d <= 0 for d in self.shape):
            raise SpecError(f"input shape must be three positive integers (C, H, W), got {self.shape!r:.80}")
        channels, height, width = self.shape
        if channels > self.MAX_CHANNELS or height > self.MAX_SIDE or width > self.MAX_SIDE:
            raise SpecError(
                f"input shape {tuple(self.shape)} exceeds the limit of {self.MAX_CHANNELS} channels and "
                f"{self.MAX_SIDE} pixels a side; describe the model's input at a smaller size"
            )
        if channels * height * width > self.MAX_ELEMENTS:
            raise SpecError(
                f"input shape {tuple(self.shape)} has {channels * height * width} values, more than the "
                f"limit of {self.MAX_ELEMENTS}; describe the model's input at a smaller size"
            )
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
    def from_json(cls, data: Any) -> InputSpec:
        try:
            lo, hi = data["pixel_range"]
            return cls(
                shape=tuple(int(d) for d in data["shape"]),  # type: ignore[arg-type]  # length checked by __post_init__
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
    """The owner's pruning request: target rates and layers to leave dense.

    ``rate`` is the conv compression rate of the pattern-pruned group-1 3x3 convs, always.
    ``model_rate`` (optional) is dense / kept over every conv and linear weight of the model
    (layers that stay dense count as kept); when given, the entity also prunes 1x1 convs and
    linear layers (whole input columns) as far as that rate needs, with the 3x3 convs still at
    ``rate``. Without it the request reads and serialises exactly as before the field existed.
    """

    rate: float
    skip_layers: tuple[str, ...] = field(default_factory=tuple)
    recipe: str | None = None
    model_rate: float | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.rate, (int, float)) and 1.0 <= float(self.rate) <= 1000.0):
            raise SpecError(f"compression rate must be between 1 and 1000, got {self.rate!r}")
        if self.model_rate is not None and not (
            isinstance(self.model_rate, (int, float)) and not isinstance(self.model_rate, bool) and 1.0 <= float(self.model_rate) <= 1000.0
        ):
            raise SpecError(f"whole-model compression rate must be between 1 and 1000 (or left out), got {self.model_rate!r:.40}")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rate": _decimal_str(self.rate, "rate"), "skip_layers": list(self.skip_layers)}
        if self.recipe is not None:
            out["recipe"] = self.recipe
        if self.model_rate is not None:
            out["model_rate"] = _decimal_str(self.model_rate, "model_rate")
        return out

    @classmethod
    def from_json(cls, data: Any) -> PruneRequest:
        try:
            recipe = data.get("recipe")
            model_rate = data.get("model_rate")
            return cls(
                rate=float(Decimal(str(data["rate"]))),
                skip_layers=tuple(str(s) for s in data.get("skip_layers", [])),
                recipe=None if recipe is None else str(recipe),
                model_rate=None if model_rate is None else float(Decimal(str(model_rate))),
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
        for name in ("epochs", "batch_size"):
            if type(getattr(self, name)) is not int:
                raise SpecError(f"retraining {name} must be an integer, got {getattr(self, name)!r}")
        if self.epochs < 0 or self.batch_size <= 0:
            raise SpecError("retraining epochs must be >= 0 and batch size > 0")
        if not (0 < self.lr < 10 and 0 <= self.momentum < 1 and 0 <= self.weight_decay < 1 and 0 < self.gamma <= 1):
            raise SpecError("retraining hyper-parameters out of range")
        if len(self.milestones) > MAX_MILESTONES or any(type(m) is not int or m < 0 for m in self.milestones):
            raise SpecError(f"retraining milestones must be at most {MAX_MILESTONES} epoch numbers >= 0")
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
    def from_json(cls, data: Any) -> RetrainRecipe:
        """Parse a received recipe strictly: exactly the known keys, each of its own JSON type.

        Recipes from before schedules and distillation existed carry no ``schedule``,
        ``distill`` or ``temperature``; they mean the step schedule without distillation, so
        those three may be missing. Every other key must be present, and no other key may appear:
        a recipe the owner does not fully understand is not run.
        """
        if not isinstance(data, dict):
            raise SpecError(f"malformed retraining recipe: expected a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - _RECIPE_REQUIRED - set(_RECIPE_OPTIONAL))
        if unknown:
            names = ", ".join(printable(repr(k), 40) for k in unknown[:5])
            raise SpecError(f"malformed retraining recipe: unknown key(s) {names} (the owner runs only recipes it fully understands)")
        missing = sorted(_RECIPE_REQUIRED - set(data))
        if missing:
            raise SpecError(f"malformed retraining recipe: missing key(s) {', '.join(missing)}")
        data = {**_RECIPE_OPTIONAL, **data}
        if data["optimizer"] != "sgd":
            raise SpecError(f"unsupported optimizer {printable(repr(data['optimizer']), 40)} (only sgd)")
        milestones = data["milestones"]
        if not isinstance(milestones, list) or len(milestones) > MAX_MILESTONES:
            raise SpecError(f"malformed retraining recipe: milestones must be a list of at most {MAX_MILESTONES} integers")
        if not isinstance(data["schedule"], str) or len(data["schedule"]) > 32:
            raise SpecError(f"malformed retraining recipe: schedule must be one of {', '.join(SCHEDULES)}")
        return cls(
            epochs=_recipe_int(data["epochs"], "epochs"),
            lr=_recipe_decimal(data["lr"], "lr"),
            momentum=_recipe_decimal(data["momentum"], "momentum"),
            weight_decay=_recipe_decimal(data["weight_decay"], "weight_decay"),
            milestones=tuple(_recipe_int(m, "milestones") for m in milestones),
            gamma=_recipe_decimal(data["gamma"], "gamma"),
            batch_size=_recipe_int(data["batch_size"], "batch_size"),
            schedule=data["schedule"],
            distill=_recipe_decimal(data["distill"], "distill"),
            temperature=_recipe_decimal(data["temperature"], "temperature"),
        )


MAX_MILESTONES = 64
_RECIPE_REQUIRED = frozenset({"optimizer", "epochs", "lr", "momentum", "weight_decay", "milestones", "gamma", "batch_size"})
# What a recipe from before these keys existed meant.
_RECIPE_OPTIONAL = {"schedule": "step", "distill": "0", "temperature": "4"}
_MAX_NUMBER_TEXT = 40


def _recipe_int(value: Any, what: str) -> int:
    if type(value) is not int:
        raise SpecError(f"malformed retraining recipe: {what} must be an integer, got {type(value).__name__}")
    return value


def _recipe_decimal(value: Any, what: str) -> float:
    """A fraction as canonical JSON carries it: a decimal string (or an integer), finite."""
    if type(value) is int:
        return float(value)
    if not isinstance(value, str) or len(value) > _MAX_NUMBER_TEXT:
        raise SpecError(f"malformed retraining recipe: {what} must be a short decimal string")
    try:
        dec = Decimal(value)
    except InvalidOperation:
        raise SpecError(f"malformed retraining recipe: {what} is not a decimal number") from None
    if not dec.is_finite():
        raise SpecError(f"malformed retraining recipe: {what} is not finite")
    return float(dec)


@dataclass(frozen=True)
class RetrainLimits:
    """The most retraining the owner runs on the entity's word: the owner's compute, the owner's call.

    A recipe is the entity's suggestion, and the owner's machine runs it next to the private data:
    without a bound, ``epochs: 1000000`` or ``batch_size: 10**12`` ties the machine up or exhausts
    its memory. A recipe over a limit is refused on receipt, naming the ``owner.run`` flag (and
    ``owner.toml`` key) that raises it. The defaults are far above what the retraining comparison
    needed (3 epochs at batch 64).
    """

    max_epochs: int = 50
    max_batch_size: int = 4096

    def __post_init__(self) -> None:
        for name, flag in (("max_epochs", "--max-epochs"), ("max_batch_size", "--max-batch-size")):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise SpecError(f"{flag} must be a positive integer, got {value!r}")

    def check(self, recipe: RetrainRecipe) -> None:
        """Refuse a recipe over these limits (``SpecError`` naming the flag that raises the limit)."""
        if recipe.epochs > self.max_epochs:
            raise SpecError(
                f"the entity's recipe asks for {recipe.epochs} retraining epochs, over this owner's limit "
                f"of {self.max_epochs}; raise it with --max-epochs (max_epochs in owner.toml) to accept"
            )
        if recipe.batch_size > self.max_batch_size:
            raise SpecError(
                f"the entity's recipe asks for batch size {recipe.batch_size}, over this owner's limit "
                f"of {self.max_batch_size}; raise it with --max-batch-size (max_batch_size in owner.toml) to accept"
            )
        late = [m for m in recipe.milestones if m > self.max_epochs]
        if late:
            raise SpecError(
                f"the entity's recipe has a learning-rate milestone at epoch {late[0]}, past this owner's "
                f"limit of {self.max_epochs} epochs; raise it with --max-epochs (max_epochs in owner.toml) to accept"
            )
