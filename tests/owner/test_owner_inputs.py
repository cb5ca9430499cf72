"""The owner's inputs: data layouts, model factories, weights files, export."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from owner.data import DataError, load_private_data
from owner.model import ModelError, build_model, export_model, load_weights, read_state_dict
from protocol.artifact import dump_tensors
from protocol.spec import InputSpec
from simulations.local import ASSETS, install_demo_data

GRAY = InputSpec((1, 28, 28), (0.286,), (0.353,))
RGB = InputSpec((3, 16, 16), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "RGB")


def _write_images(folder: Path, classes: int, per_class: int, size: int = 20) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (folder / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"class{c}" / f"{i}.png")


def test_fashion_mnist_raw_layout(tmp_path):
    data = load_private_data(install_demo_data(tmp_path), GRAY)
    assert data.layout == "FashionMNIST" and len(data.train) == 6000 and len(data.test) == 1000
    image, label = data.train[0]
    assert image.shape == (1, 28, 28) and 0 <= label < 10
    # Normalised with the spec: mean of a typical batch is near zero.
    batch = torch.stack([data.test[i][0] for i in range(200)])
    assert abs(float(batch.mean())) < 0.5


def test_mnist_raw_layout_is_read_too(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in (ASSETS / "FashionMNIST" / "raw").glob("*.gz"):
        with gzip.open(gz) as src:
            (raw / gz.name[:-3]).write_bytes(src.read())
    data = load_private_data(tmp_path, GRAY)
    assert data.layout == "MNIST" and len(data.test) == 1000


def test_image_folder_with_train_and_test(tmp_path):
    _write_images(tmp_path / "train", 3, 4)
    _write_images(tmp_path / "test", 3, 2)
    data = load_private_data(tmp_path, RGB)
    assert data.layout == "ImageFolder" and len(data.train) == 12 and len(data.test) == 6
    assert data.train[0][0].shape == (3, 16, 16)


def test_single_image_folder_holds_out_a_fraction(tmp_path):
    _write_images(tmp_path, 2, 10)
    data = load_private_data(tmp_path, GRAY, eval_fraction=0.2)
    assert len(data.test) == 4 and len(data.train) == 16
    assert data.train[0][0].shape == (1, 28, 28)


def test_missing_and_empty_data_dirs_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_private_data(tmp_path / "nope", GRAY)
    with pytest.raises(DataError, match="no dataset found"):
        load_private_data(tmp_path, GRAY)


def test_factory_errors_are_clear():
    with pytest.raises(ModelError, match="package.module:function"):
        build_model("simulations.models.small_vgg")
    with pytest.raises(ModelError, match="has no attribute"):
        build_model("simulations.models:nothing_here")
    with pytest.raises(ModelError, match="failed"):
        build_model("simulations.models:small_vgg", {"no_such_kwarg": 1})
    assert isinstance(build_model("torchvision.models:resnet18", {"num_classes": 3}), torch.nn.Module)


def test_weights_from_safetensors_and_plain_pt(tmp_path):
    model = build_model("simulations.models:small_vgg")
    state = {k: torch.randn_like(v.float()).to(v.dtype) for k, v in model.state_dict().items()}
    (tmp_path / "w.safetensors").write_bytes(dump_tensors(state))
    torch.save(state, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        fresh = build_model("simulations.models:small_vgg")
        load_weights(fresh, tmp_path / name)
        assert torch.equal(fresh.state_dict()["classifier.weight"], state["classifier.weight"])


def test_pickled_object_in_pt_is_refused(tmp_path):
    torch.save({"weights": Path("/etc/passwd")}, tmp_path / "evil.pt")  # a class weights_only refuses
    with pytest.raises(ModelError, match="not a plain state dict"):
        read_state_dict(tmp_path / "evil.pt")


def test_weights_that_do_not_fit_are_refused(tmp_path):
    (tmp_path / "w.safetensors").write_bytes(dump_tensors({"other.weight": torch.zeros(2)}))
    with pytest.raises(ModelError, match="does not fit"):
        load_weights(build_model("simulations.models:small_vgg"), tmp_path / "w.safetensors")


def test_export_rejects_a_wrong_input_shape():
    model = build_model("simulations.models:small_vgg")
    program = export_model(model, GRAY)
    assert program.module()(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    with pytest.raises(ModelError, match="does not accept"):
        export_model(model, RGB)


def test_weights_for_another_class_count_name_the_layer_and_the_kwarg(tmp_path):
    from safetensors.torch import save_file

    save_file(build_model("simulations.models:small_vgg", {"num_classes": 7}).state_dict(), tmp_path / "w.safetensors")
    with pytest.raises(ModelError) as info:
        load_weights(build_model("simulations.models:small_vgg"), tmp_path / "w.safetensors")
    message = str(info.value)
    assert "\n" not in message and re.search(r"\[7(, \d+)*\] in the file, \[10(, \d+)*\] in the model", message)
    assert "--model-kwargs '{\"num_classes\": 7}'" in message


def test_executor_whose_supernode_is_gone_raises_its_own_error_not_httpx():
    from flwr.clientapp import ClientApp

    from owner.executor import ExecutorError, OwnerExecutor
    from protocol.flower_processes import free_port

    executor = OwnerExecutor(f"127.0.0.1:{free_port()}", ClientApp())
    try:
        with pytest.raises(ExecutorError, match="stopped answering"):
            executor.run_one()
    finally:
        executor.close()


@pytest.mark.parametrize("inner", ["FashionMNIST/raw", "FashionMNIST"])
def test_data_pointing_inside_a_layout_names_the_folder_to_pass(tmp_path, inner):
    root = install_demo_data(tmp_path / "private")
    with pytest.raises(DataError) as info:
        load_private_data(root / inner, GRAY)
    assert f"pass --data {root.resolve()} " in str(info.value) and "FashionMNIST/raw" in str(info.value)


def test_deeply_nested_model_kwargs_are_a_usage_error_not_a_recursion_error():
    import argparse

    from owner.run import _kwargs

    with pytest.raises(argparse.ArgumentTypeError, match="is not a JSON object"):
        _kwargs("[" * 100_000 + "]" * 100_000)
