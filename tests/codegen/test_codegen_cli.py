"""python -m codegen: model directory in, C library out; one-line errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from codegen import fixtures
from codegen.verify import export
from protocol.artifact import save_model_dir

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "codegen", *args], cwd=ROOT, capture_output=True, text=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, 1, 1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, 2, 1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    ).eval()
    fixtures.randomize_batchnorm(model)
    masks = fixtures.prune_model(model, 6.0)
    path = tmp_path_factory.mktemp("final")
    save_model_dir(path, export(model, (1, 12, 12)), masks)
    return path, model


@pytest.mark.skipif(shutil.which("cc") is None or shutil.which("make") is None, reason="needs gcc and make")
def test_cli_writes_a_library_that_make_builds_and_matches_pytorch(model_dir, tmp_path):
    path, model = model_dir
    out = tmp_path / "gen"
    proc = _cli(str(path), "--target", "host", "--out", str(out), "--verify", "2")
    assert proc.returncode == 0, proc.stderr
    assert "OK: 2 inputs" in proc.stderr
    for name in ("bp_model.h", "bp_model.c", "bp_main.c", "weights.bin", "Makefile", "README.md"):
        assert (out / name).is_file()
    assert "aarch64-linux-android29-clang" in (out / "README.md").read_text()
    subprocess.run(["make", "-s", "clean", "all"], cwd=out, check=True, capture_output=True)
    x = torch.randn(3, 1, 12, 12)
    (tmp_path / "in.bin").write_bytes(x.numpy().astype("<f4").tobytes())
    subprocess.run([str(out / "bp_main"), str(out / "weights.bin"), str(tmp_path / "in.bin"), str(tmp_path / "o.bin")], check=True)
    got = np.frombuffer((tmp_path / "o.bin").read_bytes(), dtype="<f4").reshape(3, 4)
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs gcc")
def test_harness_refuses_a_weight_file_of_another_model(model_dir, tmp_path):
    path, _ = model_dir
    a, b = tmp_path / "a", tmp_path / "b"
    assert _cli(str(path), "--target", "host", "--out", str(a), "--build").returncode == 0
    assert _cli(str(path), "--target", "host", "--out", str(b), "--no-compact").returncode == 0
    (tmp_path / "in.bin").write_bytes(np.zeros(144, "<f4").tobytes())
    proc = subprocess.run([str(a / "bp_main"), str(b / "weights.bin"), str(tmp_path / "in.bin"), str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 1 and "another model" in proc.stderr


def test_cli_missing_model_is_one_line_error(tmp_path):
    proc = _cli(str(tmp_path / "absent"), "--target", "host", "--out", str(tmp_path / "o"))
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("codegen: error:")
    assert "Traceback" not in proc.stderr


def test_cli_unsupported_op_names_op_and_node(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Tanh()).eval()
    save_model_dir(tmp_path / "m", export(model, (1, 8, 8)))
    proc = _cli(str(tmp_path / "m"), "--target", "host", "--out", str(tmp_path / "o"))
    assert proc.returncode == 1
    assert proc.stderr.strip() == "codegen: error: unsupported op aten.tanh.default at node tanh"
    assert not (tmp_path / "o").exists()  # refused before anything is written


def test_cli_bad_target_is_usage_error(model_dir, tmp_path):
    proc = _cli(str(model_dir[0]), "--target", "riscv", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs gcc")
def test_cli_threads_and_a_forced_vector_flavour_build_and_match_pytorch(model_dir, tmp_path):
    from codegen.targets import HOST_AVX2

    if HOST_AVX2.missing():
        pytest.skip(f"needs {', '.join(HOST_AVX2.missing())}")
    proc = _cli(str(model_dir[0]), "--target", "host-avx2", "--threads", "3", "--out", str(tmp_path / "g"), "--verify", "2")
    assert proc.returncode == 0, proc.stderr
    source = (tmp_path / "g" / "bp_model.c").read_text()
    assert "#define BP_DEFAULT_THREADS 3" in source and "__avx2" in source


def test_cli_threads_out_of_range_is_usage_error(model_dir, tmp_path):
    proc = _cli(str(model_dir[0]), "--target", "host", "--threads", "0", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "--threads must be between 1 and 64" in proc.stderr
