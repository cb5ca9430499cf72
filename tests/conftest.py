"""Shared fixtures: small exported models, and where the real data lives (if it does)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.helpers import export_eval

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

REPO = Path(__file__).resolve().parents[1]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-goldens",
        action="store_true",
        default=False,
        help="rewrite tests/golden/vectors.json and add this version's bundle and log to tests/golden/compat/",
    )


SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors: one intra-op thread is faster, and CI's two cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def small_vgg_program() -> tuple[torch.nn.Module, torch.export.ExportedProgram]:
    from simulations.models import small_vgg

    torch.manual_seed(0)
    model = small_vgg().eval()
    return model, export_eval(model)


@pytest.fixture(scope="session")
def fashion_root() -> Path:
    raw = SHARED_DATA / "FashionMNIST" / "raw"
    if not (raw / "train-images-idx3-ubyte").is_file():
        pytest.skip(f"real Fashion-MNIST not found under {raw}")
    return SHARED_DATA


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that takes the real Fashion-MNIST (the ``fashion_root`` fixture) is marked ``realdata``,
    so ``-m "not realdata"`` selects what runs without ../shared/data."""
    for item in items:
        if "fashion_root" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.realdata)
