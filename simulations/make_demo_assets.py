"""Rebuild the demo's embedded assets from ../shared/data (run once; the outputs are committed).

- ``assets/FashionMNIST/raw/*.gz``: a real subset (first 6,000 train and 1,000 test images of
  the shared split) in torchvision's raw layout, so the demo's owner reads it like any dataset.
- ``assets/small_vgg.safetensors``: the owner's pre-trained dense model (small VGG trained on the
  full 60,000-image training split for a few epochs, seed 0).

    python -m simulations.make_demo_assets [--shared ../shared/data] [--epochs 4]
"""

from __future__ import annotations

import argparse
import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import torch

ASSETS = Path(__file__).resolve().parent / "assets"
TRAIN_SUBSET = 6000
TEST_SUBSET = 1000
MEAN, STD = 0.2860, 0.3530


def _read_idx(path: Path) -> np.ndarray:
    data = path.read_bytes()
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _write_idx_gz(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.GzipFile(path, "wb", mtime=0) as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def write_subset(shared: Path) -> None:
    raw = shared / "FashionMNIST" / "raw"
    for split, count in (("train", TRAIN_SUBSET), ("t10k", TEST_SUBSET)):
        images = _read_idx(raw / f"{split}-images-idx3-ubyte")[:count]
        labels = _read_idx(raw / f"{split}-labels-idx1-ubyte")[:count]
        _write_idx_gz(ASSETS / "FashionMNIST" / "raw" / f"{split}-images-idx3-ubyte.gz", images)
        _write_idx_gz(ASSETS / "FashionMNIST" / "raw" / f"{split}-labels-idx1-ubyte.gz", labels)


def train_model(shared: Path, epochs: int) -> None:
    from safetensors.torch import save_file
    from torchvision import datasets, transforms

    from owner.retrain import evaluate
    from simulations.models import small_vgg

    torch.manual_seed(0)
    torch.set_num_threads(1)
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((MEAN,), (STD,))])
    train = datasets.FashionMNIST(str(shared), train=True, download=False, transform=tf)
    test = datasets.FashionMNIST(str(shared), train=False, download=False, transform=tf)
    loader = torch.utils.data.DataLoader(train, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(0))
    test_loader = torch.utils.data.DataLoader(test, batch_size=512)
    model = small_vgg()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=epochs * len(loader))
    for epoch in range(epochs):
        model.train()
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}: test accuracy {evaluate(model, test_loader):.4f}", flush=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ASSETS / "small_vgg.safetensors"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args(argv)
    if not (args.shared / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        print(f"error: Fashion-MNIST not found under {args.shared}", file=sys.stderr)
        return 1
    write_subset(args.shared)
    train_model(args.shared, args.epochs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
