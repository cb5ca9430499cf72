"""The owner's settings for one job, as every stage of ``owner.run`` reads them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path("blindprune-out")


@dataclass(frozen=True)
class OwnerConfig:
    data: Path
    model: str
    entity_card: Path
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    weights: Path | None = None
    channel_order: str = ""
    entity: str = "127.0.0.1:9092"
    keys: Path = Path("owner-keys")
    rate: float = 8.0
    model_rate: float | None = None
    skip_layers: tuple[str, ...] = ()
    recipe: str | None = None
    epochs: int | None = None
    batch_size: int | None = None
    max_epochs: int = 50
    max_batch_size: int = 4096
    train_limit: int | None = None
    eval_fraction: float = 0.1
    out: Path = DEFAULT_OUT
    connect_timeout: float = 30.0
    timeout: float = 1800.0
    device: str = "cpu"
    seed: int = 0
    tls_ca: Path | None = None
    node_key: Path | None = None
    stall_timeout: float = 60.0
    resume: bool = False
    mia_defence: bool = False
    mia_defence_images: int = 1000


class OwnerError(RuntimeError):
    """The owner's job failed (one line for the user)."""
