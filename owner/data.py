"""The owner's private data: found on disk, split, and loaded. It never leaves this process.

Supported layouts under ``--data DIR``:
- torchvision's raw layouts: ``DIR/FashionMNIST/raw``, ``DIR/MNIST/raw`` (IDX files) and
  ``DIR/cifar-10-batches-py`` (their own train/test splits);
- an ImageFolder tree: ``DIR/train/<class>/*`` and ``DIR/test/<class>/*`` (or ``val``), or just
  ``DIR/<class>/*``, in which case a deterministic fraction is held out for evaluation.
"""

from __future__ import annotations

from collections.abc import Sized
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from protocol.spec import InputSpec


class DataError(ValueError):
    """The data directory is missing or holds no layout we can read."""


def count(dataset: Dataset) -> int:
    """How many items a dataset holds (every dataset here is sized; torch's type does not say so)."""
    return len(cast(Sized, dataset))


@dataclass(frozen=True)
class PrivateData:
    layout: str
    train: Dataset
    test: Dataset
    classes: tuple[str, ...]

    def loaders(self, batch_size: int, *, seed: int = 0, train_limit: int | None = None) -> tuple[DataLoader, DataLoader]:
        train = self.train
        if train_limit is not None and train_limit < count(train):
            train = Subset(train, range(train_limit))
        gen = torch.Generator().manual_seed(seed)
        return (
            DataLoader(train, batch_size=batch_size, shuffle=True, generator=gen, num_workers=0),
            DataLoader(self.test, batch_size=512, shuffle=False, num_workers=0),
        )


def _transform(spec: InputSpec, resize: bool):
    from torchvision import transforms

    steps = []
    if resize:
        channels = spec.shape[0]
        steps.append(transforms.Grayscale(1) if channels == 1 else transforms.Lambda(lambda im: im.convert("RGB")))
        steps.append(transforms.Resize(spec.shape[1:]))
    scale = 255.0 / (spec.pixel_max - spec.pixel_min)
    steps += [transforms.ToTensor()]
    if scale != 1.0:
        steps.append(transforms.Lambda(lambda t: t * scale))
    steps.append(transforms.Normalize(spec.mean, spec.std))
    return transforms.Compose(steps)


def _has_image_classes(directory: Path) -> bool:
    return directory.is_dir() and any(p.is_dir() for p in directory.iterdir())


def load_private_data(directory: Path, spec: InputSpec, *, eval_fraction: float = 0.1, seed: int = 0) -> PrivateData:
    """Find the layout under ``directory`` and build train/test datasets normalised per ``spec``."""
    from torchvision import datasets

    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"data directory {directory} does not exist")
    transform = _transform(spec, resize=False)
    for name, cls in (("FashionMNIST", datasets.FashionMNIST), ("MNIST", datasets.MNIST)):
        if (directory / name / "raw").is_dir():
            try:
                train = cls(root=str(directory), train=True, download=False, transform=transform)
                test = cls(root=str(directory), train=False, download=False, transform=transform)
            except RuntimeError as exc:
                raise DataError(f"{directory / name / 'raw'}: {str(exc).splitlines()[0]}") from exc
            return PrivateData(name, train, test, tuple(train.classes))
    if (directory / "cifar-10-batches-py").is_dir():
        try:
            train = datasets.CIFAR10(root=str(directory), train=True, download=False, transform=transform)
            test = datasets.CIFAR10(root=str(directory), train=False, download=False, transform=transform)
        except RuntimeError as exc:
            raise DataError(f"{directory / 'cifar-10-batches-py'}: {str(exc).splitlines()[0]}") from exc
        return PrivateData("CIFAR10", train, test, tuple(train.classes))
    layout = _inside_a_layout(directory)
    if layout is not None:
        raise DataError(f"{directory} is the inside of a {layout[0]} layout: pass --data {layout[1]} (the folder that holds {layout[2]})")
    transform = _transform(spec, resize=True)
    held_out = next((directory / n for n in ("test", "val") if _has_image_classes(directory / n)), None)
    if _has_image_classes(directory / "train") and held_out is not None:
        train = datasets.ImageFolder(str(directory / "train"), transform=transform)
        test = datasets.ImageFolder(str(held_out), transform=transform)
        if train.classes != test.classes:
            raise DataError(f"{directory}: train and {held_out.name} have different class folders")
        return PrivateData("ImageFolder", train, test, tuple(train.classes))
    if _has_image_classes(directory):
        try:
            full = datasets.ImageFolder(str(directory), transform=transform)
        except (FileNotFoundError, RuntimeError) as exc:
            raise DataError(f"{directory}: {exc}") from exc
        if not 0 < eval_fraction < 1:
            raise DataError("eval fraction must be between 0 and 1")
        order = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed)).tolist()
        cut = max(1, int(len(full) * eval_fraction))
        return PrivateData("ImageFolder", Subset(full, order[cut:]), Subset(full, order[:cut]), tuple(full.classes))
    raise DataError(
        f"no dataset found in {directory}: expected FashionMNIST/raw, MNIST/raw, cifar-10-batches-py or an ImageFolder tree (one folder per class)"
    )


def _inside_a_layout(directory: Path) -> tuple[str, Path, str] | None:
    """(layout, folder to pass, what it holds) when ``directory`` is a known layout's inner folder."""
    resolved = directory.resolve()
    idx = any(resolved.glob("train-images-idx3-ubyte*"))
    if idx and resolved.name == "raw" and resolved.parent.name in ("FashionMNIST", "MNIST"):
        return resolved.parent.name, resolved.parent.parent, f"{resolved.parent.name}/raw"
    if idx and resolved.name in ("FashionMNIST", "MNIST"):
        return resolved.name, resolved.parent, f"{resolved.name}/raw"
    if (resolved / "raw").is_dir() and resolved.name in ("FashionMNIST", "MNIST"):
        return resolved.name, resolved.parent, f"{resolved.name}/raw"
    if (resolved / "data_batch_1").is_file() and resolved.name == "cifar-10-batches-py":
        return "CIFAR-10", resolved.parent, "cifar-10-batches-py"
    return None
