"""The aarch64 NEON build, run under qemu-aarch64, agrees with PyTorch."""

from __future__ import annotations

import re

import pytest
import torch

from codegen import AARCH64_NEON, fixtures
from codegen.verify import export, verify

_missing = AARCH64_NEON.missing()
pytestmark = pytest.mark.skipif(bool(_missing), reason=f"needs {', '.join(_missing)}")
TOL = 1e-4


def test_demo_model_under_qemu_matches_pytorch(tmp_path):
    from simulations.models import small_vgg

    torch.manual_seed(0)
    model = small_vgg().eval()
    fixtures.randomize_batchnorm(model)
    masks = fixtures.prune_model(model, 6.0)
    result = verify(export(model, (1, 28, 28)), masks, AARCH64_NEON, tmp_path, n=2)
    assert result.error <= TOL
    # the NEON target's own blocking: 4-float vectors, at most 12 accumulators per tile
    for report in result.generated.layers:
        if report.kind == "sparse3x3":
            r, u = (int(v) for v in re.match(r"r(\d+) u(\d+)", report.blocking).groups())
            assert r * u <= AARCH64_NEON.accumulators


def test_residual_network_with_stride_two_under_qemu_matches_pytorch(tmp_path):
    from simulations.models import resnet20

    torch.manual_seed(1)
    model = resnet20().eval()
    fixtures.randomize_batchnorm(model, 1)
    masks = fixtures.prune_model(model, 12.0)
    result = verify(export(model, (1, 14, 14)), masks, AARCH64_NEON, tmp_path, n=2)
    assert result.error <= TOL


def test_neon_inner_loops_use_vector_fma(tmp_path):
    import subprocess

    from codegen import build
    from codegen.emit import generate
    from codegen.ir import lower

    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, 1, 1, bias=False)).eval()
    masks = fixtures.prune_model(model, 6.0)
    gen = generate(lower(export(model, (8, 16, 16)), masks), AARCH64_NEON)
    build.write_files(gen.files, tmp_path)
    asm = subprocess.run(
        [AARCH64_NEON.cc, *AARCH64_NEON.cflags, "-S", "-o", "-", "bp_model.c"], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout
    assert re.search(r"\bfmla\s+v\d+\.4s", asm)


def test_input_channel_blocks_under_qemu_match_pytorch(tmp_path):
    from tests.codegen.test_codegen_host import _Blocked

    torch.manual_seed(6)
    model = _Blocked().eval()
    masks = fixtures.prune_model(model, 6.0)
    result = verify(export(model, (64, 24, 24)), masks, AARCH64_NEON, tmp_path, n=1)
    assert result.error <= TOL
    assert any(int(r.blocking.split("cb")[1]) < 64 for r in result.generated.layers)


def _chains() -> list[tuple[str, int, str]]:
    from tests.codegen.test_codegen_host import _registry_chains

    return _registry_chains(AARCH64_NEON)


@pytest.mark.parametrize("op,vecs,isa", _chains(), ids=lambda v: str(v))
def test_every_registered_neon_tile_under_qemu_matches_pytorch(tmp_path, op, vecs, isa):
    from tests.codegen.test_codegen_host import check_registered_tiles

    check_registered_tiles(AARCH64_NEON, op, vecs, isa, tmp_path)


def _torchvision(name: str) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(4)
    model = getattr(torchvision.models, name)(weights=None).eval()
    fixtures.randomize_batchnorm(model, 4)
    return model


@pytest.mark.parametrize("name,pruned", [("mobilenet_v2", True), ("efficientnet_b0", False)])
def test_torchvision_mobile_network_under_qemu_matches_pytorch(tmp_path, name, pruned):
    model = _torchvision(name)
    masks = fixtures.prune_model(model, 6.0, depthwise=True, structured=4.0) if pruned else {}
    result = verify(export(model, (3, 32, 32)), masks, AARCH64_NEON, tmp_path, n=2)
    assert result.error <= TOL


def test_threads_under_qemu_give_the_single_thread_bits(tmp_path):
    import os
    import subprocess

    import numpy as np

    from codegen import Options

    model = _torchvision("mobilenet_v3_small")
    masks = fixtures.prune_model(model, 6.0, depthwise=True, structured=4.0)
    result = verify(export(model, (3, 32, 32)), masks, AARCH64_NEON, tmp_path, options=Options(threads=2), n=2)
    assert result.error <= TOL  # the harness ran on the generator's default of 2 threads
    (tmp_path / "x.bin").write_bytes(np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype("<f4").tobytes())
    outs = []
    for n in ("1", "2", "4"):
        out = tmp_path / f"y{n}.bin"
        cmd = [*AARCH64_NEON.run_prefix, str(tmp_path / "bp_main"), str(tmp_path / "weights.bin"), str(tmp_path / "x.bin"), str(out)]
        subprocess.run(cmd, check=True, env={**os.environ, "BP_THREADS": n}, capture_output=True)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] == outs[2]


def test_stride_two_convs_under_qemu_match_pytorch_on_one_and_two_threads(tmp_path):
    """NEON's 4-float rows: the stem's 13 outputs + 3 taps and the 7 outputs + 1 tap of the first
    sparse stage fill their phase rows exactly, the second stage is one masked vector."""
    import os
    import subprocess

    import numpy as np

    from tests.codegen.test_codegen_strided import _Strided

    torch.manual_seed(5)
    model = _Strided().eval()
    masks = fixtures.prune_model(model, 6.0)
    result = verify(export(model, (3, 26, 25)), masks, AARCH64_NEON, tmp_path, n=2)
    assert result.error <= TOL
    assert [r.out_hw for r in result.generated.layers][:2] == [(13, 13), (7, 7)]
    (tmp_path / "x.bin").write_bytes(np.random.default_rng(3).standard_normal((1, 3, 26, 25)).astype("<f4").tobytes())
    outs = []
    for n in ("1", "2"):
        out = tmp_path / f"y{n}.bin"
        cmd = [*AARCH64_NEON.run_prefix, str(tmp_path / "bp_main"), str(tmp_path / "weights.bin"), str(tmp_path / "x.bin"), str(out)]
        subprocess.run(cmd, check=True, env={**os.environ, "BP_THREADS": n}, capture_output=True)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
