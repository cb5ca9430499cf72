"""Stride-2 convs (pattern-sparse 3x3, dense stems, depthwise 5x5, 1x1 projections) against PyTorch.

Why these sizes: a stride-2 conv reads column-phase planes whose row pitch is the output width plus
the taps' reach, rounded up to the vector width and no more, so lanes past a row's end read the
next phase row. The widths below put the last valid lane exactly on the end of a phase row (no
slack at all), one past it, on odd and even input widths (the right border is a zero or a map
column), on the narrow vector flavour and on several vectors with a masked last one; heights are
odd so the bottom border matters too.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from torch import nn

from codegen import HOST, HOST_AVX512, fixtures, kernels
from codegen.verify import export, verify

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="host C compiler missing (Debian package gcc)")
TOL = 1e-4


def _conv(cin: int, cout: int, k: int, padding: int, *, groups: int = 1, rate: float | None = None, seed: int = 0) -> tuple[nn.Module, dict]:
    """One stride-2 conv + BatchNorm + ReLU (bias folded in), pattern-pruned at ``rate``."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(cin, cout, k, 2, padding, groups=groups, bias=True), nn.BatchNorm2d(cout), nn.ReLU()).eval()
    fixtures.randomize_batchnorm(model, seed)
    masks = fixtures.prune_model(model, rate) if rate else {}
    return model, masks


def _out_w(w: int, k: int, padding: int) -> int:
    return (w + 2 * padding - k) // 2 + 1


# (input h, input w): output widths 15 and 15 (15 + 1 = 16: the kx=2 tap of lane 14 is the last
# float of the phase row; odd w: that column is the zero border, even: a map column), 16 (a whole
# vector, no mask), 17 (two vectors, one lane of the second), 7 (narrow flavour, 7 + 1 = 8), 1
SPARSE_SIZES = [(31, 29), (17, 30), (9, 32), (13, 33), (15, 13), (11, 14), (5, 1)]


@pytest.mark.parametrize("h,w", SPARSE_SIZES, ids=lambda v: str(v))
def test_sparse_3x3_stride_two_matches_pytorch(tmp_path, h, w):
    model, masks = _conv(8, 12, 3, 1, rate=6.0)
    result = verify(export(model, (8, h, w)), masks, HOST, tmp_path, n=2)
    assert result.error <= TOL
    (report,) = result.generated.layers
    assert (report.kind, report.stride, report.out_hw[1]) == ("sparse3x3", 2, _out_w(w, 3, 1))


@pytest.mark.parametrize("rate", [2.25, 12.0])
def test_sparse_3x3_stride_two_without_padding_matches_pytorch(tmp_path, rate):
    model, masks = _conv(16, 8, 3, 0, rate=rate, seed=1)
    result = verify(export(model, (16, 21, 35)), masks, HOST, tmp_path, n=2)
    assert result.error <= TOL


def test_a_strided_first_conv_splits_the_image_in_place(tmp_path):
    # Its column phases are gathered straight from the caller's image (the gather reads only
    # columns and rows inside it), so bp_forward makes no bordered copy; a stride-1 first conv
    # reads the copy. Two images per run: each is read where it lies.
    model, masks = _conv(8, 12, 3, 1, rate=6.0)
    result = verify(export(model, (8, 17, 30)), masks, HOST, tmp_path / "s2", n=2)
    assert result.error <= TOL
    source = (tmp_path / "s2" / "bp_model.c").read_text()
    assert "memcpy(m->buf[0]" not in source.split("static void bp_forward(")[1]
    assert "const float *ip = m->in + ci * 510;" in source
    plain = nn.Sequential(nn.Conv2d(8, 12, 3, 1, 1)).eval()
    assert verify(export(plain, (8, 9, 9)), None, HOST, tmp_path / "s1", n=2).error <= TOL
    assert "memcpy(m->buf[0]" in (tmp_path / "s1" / "bp_model.c").read_text().split("static void bp_forward(")[1]


# 7x7 stems: output widths 13 (13 + 3 = 16, no slack), 13 on an even width, 18 (two vectors),
# 8 (narrow flavour), and 10 output channels (a remainder block of the 8-channel tiles)
STEM_SIZES = [(27, 25), (19, 26), (21, 35), (15, 15)]


@pytest.mark.parametrize("h,w", STEM_SIZES, ids=lambda v: str(v))
def test_dense_7x7_stem_matches_pytorch(tmp_path, h, w):
    model, _ = _conv(3, 10, 7, 3, seed=2)
    result = verify(export(model, (3, h, w)), None, HOST, tmp_path, n=2)
    assert result.error <= TOL
    (report,) = result.generated.layers
    assert (report.kind, report.out_hw[1]) == ("dense", _out_w(w, 7, 3))


@pytest.mark.parametrize(
    "cin,cout,k,padding,groups,h,w",
    [
        (3, 8, 3, 1, 1, 33, 29),  # MobileNet's dense 3x3 stem, 15 wide
        (16, 16, 5, 2, 16, 19, 27),  # depthwise 5x5: 14 + 2 = 16
        (12, 20, 1, 0, 1, 13, 31),  # 1x1 projection: pitch exactly the output width
    ],
    ids=("stem3x3", "depthwise5x5", "proj1x1"),
)
def test_other_stride_two_convs_match_pytorch(tmp_path, cin, cout, k, padding, groups, h, w):
    model, _ = _conv(cin, cout, k, padding, groups=groups, seed=3)
    result = verify(export(model, (cin, h, w)), None, HOST, tmp_path, n=2)
    assert result.error <= TOL


class _Strided(nn.Module):
    """A stem and two pattern-sparse stride-2 stages, the second with a fused 1x1 stride-2 shortcut."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 7, 2, 3)
        self.a = nn.Conv2d(12, 20, 3, 2, 1)
        self.b = nn.Conv2d(20, 28, 3, 2, 1)
        self.proj = nn.Conv2d(20, 28, 1, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(torch.relu(self.stem(x))))
        return torch.relu(self.b(y) + self.proj(y))


def _same_bits_on_one_to_three_threads(tmp_path, model: nn.Module, masks: dict, shape: tuple[int, ...]) -> None:
    """Build ``model`` in ``tmp_path``, run the harness on 1, 2 and 3 threads: identical bytes,
    and within TOL of PyTorch."""
    result = verify(export(model, shape), masks, HOST, tmp_path, n=1)
    assert result.error <= TOL
    x = np.random.default_rng(2).standard_normal((2, *shape)).astype("<f4")
    (tmp_path / "x.bin").write_bytes(x.tobytes())
    outs = {}
    for n in (1, 2, 3):
        out = tmp_path / f"y{n}.bin"
        cmd = [str(tmp_path / "bp_main"), str(tmp_path / "weights.bin"), str(tmp_path / "x.bin"), str(out)]
        subprocess.run(cmd, check=True, env={**os.environ, "BP_THREADS": str(n)}, capture_output=True)
        outs[n] = out.read_bytes()
    assert outs[1] == outs[2] == outs[3]
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert np.abs(np.frombuffer(outs[2], "<f4").reshape(ref.shape) - ref).max() <= TOL * np.abs(ref).max()


def test_stride_two_network_gives_the_same_bits_on_any_thread_count(tmp_path):
    torch.manual_seed(4)
    model = _Strided().eval()
    masks = fixtures.prune_model(model, 6.0)
    assert set(masks) == {"a.weight", "b.weight"}
    _same_bits_on_one_to_three_threads(tmp_path, model, masks, (3, 61, 59))


@pytest.mark.parametrize("channels", [2, 11], ids=("fewer-channels-than-threads", "channels-not-a-multiple"))
@pytest.mark.parametrize("pruned", [False, True], ids=("dense", "pattern"))
def test_strided_depthwise_splits_each_channel_where_it_runs_and_keeps_the_bits(tmp_path, channels, pruned):
    # a stride-2 depthwise conv makes one channel's phase planes at a time, in the running
    # thread's part of the scratch: with more threads than channels some threads have none,
    # and the planes of one channel must not leak into the next (odd width: a zero border)
    model, _ = _conv(channels, channels, 3, 1, groups=channels, seed=5)
    model = nn.Sequential(model, nn.Conv2d(channels, 4, 1)).eval()
    masks = fixtures.prune_model(model, 6.0, depthwise=True) if pruned else {}
    assert pruned == any(k.startswith("0.0") for k in masks)
    _same_bits_on_one_to_three_threads(tmp_path, model, masks, (channels, 23, 37))


def test_strided_channel_blocks_balance_l1_against_per_block_cost():
    """The block rule: as many channels as the L1 budget holds where that gives every filter
    enough work per block; where filters keep too few kernels per channel for that, the
    geometric mean of the cache bound and the work bound, so blocks grow with compression but
    stay below what the work bound alone would ask; then as many blocks as that size needs, of
    one size."""
    slab = 4096
    by_cache = HOST.l1_bytes // slab
    dense_ish = kernels.strided_channel_block(HOST, 256, slab, 1.0, 96.0)
    assert dense_ish == by_cache  # 96 FMAs a channel: the L1 block already amortises
    density = {6: 0.375, 12: 0.1875}  # kept-kernel fraction at each rate
    by_work = {rate: -(-kernels.BLOCK_MIN_FMAS // (d * 28.0)) for rate, d in density.items()}
    sparse = {rate: kernels.strided_channel_block(HOST, 256, slab, d, 28.0) for rate, d in density.items()}
    for rate in density:
        assert by_cache < sparse[rate] < by_work[rate]
        blocks = -(-256 // sparse[rate])
        assert blocks == -(-256 // round((by_cache * by_work[rate]) ** 0.5))
        assert blocks * sparse[rate] - 256 < blocks  # blocks differ by a channel at most
    assert sparse[6] < sparse[12]  # fewer kernels per channel: bigger blocks
    assert kernels.strided_channel_block(HOST, 64, 3328, 0.375, 48.0) == 16  # cache 9, work 29: 16 a block, not 22
    assert kernels.strided_channel_block(HOST, 20, slab, 0.1, 4.0) == 20  # never more than the layer has
    assert kernels.strided_channel_block(HOST, 64, slab, 0.0, 96.0) == 64  # no kernel at all: one block


def test_strided_column_shift_tiles_take_two_thirds_of_the_accumulators():
    """A stride-2 column-shift tile's rows each read two fresh input rows of both phases, so it
    keeps fewer rows than a stride-1 one of the same width: a 28-wide map at 512 bits goes in
    bands of 4 (16 accumulators), not 6, 6, 6, 6, 4 (24), and the registry lists no taller tile."""
    s1, s2 = kernels.SHIFT_SETS[1], kernels.SHIFT_SETS[2]
    assert kernels.shifted_blocking(HOST_AVX512, 28, 2, s2) == 4
    assert kernels.shifted_blocking(HOST_AVX512, 14, 1, s2) == 7 and kernels.shifted_blocking(HOST_AVX512, 7, 1, s2) == 7
    assert kernels.shifted_blocking(HOST_AVX512, 28, 2, s1) == 4  # stride 1: 24 // (3 x 2)
    tall = [k for k in kernels.registry(HOST_AVX512) if k.op == kernels.SHIFTED and k.sets == s2 and k.rows * k.vecs * s2 > 16]
    assert not tall
