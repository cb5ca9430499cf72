"""Generated host C vs PyTorch: every supported op, whole models, several compression rates."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from codegen import HOST, Options, fixtures
from codegen.verify import export, verify
from tests.helpers import harness_bytes, same_bytes_on_any_thread_count

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="host C compiler missing (Debian package gcc)")
TOL = 1e-4


class OpsNet(nn.Module):
    """One model touching every op: 7x7 stride-2 stem with bias, BN, ReLU, 3x3 max pool with
    padding, sparse 3x3 stride 1 and 2, 1x1 stride-2 projection, fused residual add, average pool
    without padding counts, unpruned dense 3x3, a standalone add, a standalone ReLU, adaptive
    average pooling to 2x2 from an odd size, flatten and two linears (one with ReLU)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 7, 2, 3, bias=True)
        self.bn0 = nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.a = nn.Conv2d(16, 16, 3, 1, 1, bias=False)
        self.bna = nn.BatchNorm2d(16)
        self.b = nn.Conv2d(16, 24, 3, 2, 1, bias=False)
        self.bnb = nn.BatchNorm2d(24)
        self.proj = nn.Conv2d(16, 24, 1, 2, 0, bias=False)
        self.bnp = nn.BatchNorm2d(24)
        self.avg = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.dense = nn.Conv2d(24, 24, 3, 1, 1, bias=True)
        self.head = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(96, 20)
        self.fc2 = nn.Linear(20, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn0(self.stem(x))))
        y = torch.relu(self.bna(self.a(x)))
        z = torch.relu(self.bnb(self.b(y)) + self.bnp(self.proj(x)))
        u = self.avg(z)
        v = torch.relu(self.dense(u))
        w = torch.relu(u + v)  # standalone add: both operands are read again below
        w = w + u
        return self.fc2(torch.relu(self.fc1(torch.flatten(self.head(torch.relu(w)), 1))))


class PoolNet(nn.Module):
    """Odd sizes and ceil-mode windows: 2x2 max pool (ceil), 3x3/2 average pool with padding
    (ceil, counting padding), adaptive 3x3 average from a non-divisible size, linear on 4-d flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 12, 3, 1, 1)
        self.mp = nn.MaxPool2d(2, ceil_mode=True)
        self.ap = nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=True)
        self.ad = nn.AdaptiveAvgPool2d(3)
        self.fc = nn.Linear(12 * 9, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ad(self.ap(self.mp(self.conv(x))))
        return self.fc(torch.flatten(x, 1))


def _prepared(model: nn.Module, rate: float | None, seed: int = 0) -> tuple[nn.Module, dict]:
    torch.manual_seed(seed)
    fixtures.randomize_batchnorm(model, seed)
    masks = fixtures.prune_model(model, rate) if rate else {}
    return model.eval(), masks


def test_every_op_matches_pytorch(tmp_path):
    model, masks = _prepared(OpsNet(), 6.0)
    assert set(masks) == {"a.weight", "b.weight", "dense.weight"}
    masks.pop("dense.weight")  # stays dense: exercises the dense 3x3 path
    with torch.no_grad():
        model.dense.weight.copy_(torch.randn_like(model.dense.weight) * 0.1)
    result = verify(export(model, (3, 37, 41)), masks, HOST, tmp_path, n=3)
    assert result.error <= TOL
    kinds = {r.name: r.kind for r in result.generated.layers}
    assert sorted(kinds.values()).count("sparse3x3") == 2


def test_pooling_windows_match_pytorch(tmp_path):
    model, _ = _prepared(PoolNet(), None)
    result = verify(export(model, (2, 13, 11)), None, HOST, tmp_path, n=2)
    assert result.error <= TOL


@pytest.mark.parametrize("rate", [2.25, 6.0, 12.0])
def test_demo_model_matches_pytorch_at_rate(tmp_path, rate):
    from simulations.models import small_vgg

    model, masks = _prepared(small_vgg(), rate)
    result = verify(export(model, (1, 28, 28)), masks, HOST, tmp_path, n=3)
    assert result.error <= TOL
    sparse = [r for r in result.generated.layers if r.kind == "sparse3x3"]
    assert len(sparse) == 5  # the 1-channel first conv stays dense
    assert all(r.patterns <= 8 for r in sparse)


def _adversarial_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every layer uses all 8 library patterns (plus kernels of 1, 2 and 9 taps), a filter keeps no
    kernel at all, and another keeps exactly one."""
    g = torch.Generator().manual_seed(3)
    library = fixtures.pattern_library(torch.randn(64, 9, 3, 3, generator=g), 8)
    assert library.shape == (8, 9)
    masks = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3) and module.in_channels >= 4:
            cout, cin = module.weight.shape[:2]
            ids = torch.randint(0, 8, (cout, cin), generator=g)
            mask = library[ids].reshape(cout, cin, 3, 3).clone()
            mask &= torch.rand(cout, cin, generator=g)[:, :, None, None] < 0.5
            mask[0] = False  # empty filter
            mask[1] = False
            mask[1, 2] = library[5].reshape(3, 3)  # a filter with a single kernel
            mask[2, 0] = torch.tensor([[0, 0, 0], [0, 1, 0], [0, 0, 0]], dtype=torch.bool)
            mask[2, 1] = torch.tensor([[1, 0, 0], [0, 0, 0], [0, 0, 1]], dtype=torch.bool)
            mask[2, 2] = True
            with torch.no_grad():
                module.weight.mul_(mask)
            masks[f"{name}.weight"] = mask
    return masks


def test_empty_filters_and_all_patterns_match_pytorch(tmp_path):
    from simulations.models import resnet20

    torch.manual_seed(1)
    model = resnet20().eval()
    fixtures.randomize_batchnorm(model, 1)
    masks = _adversarial_masks(model)
    result = verify(export(model, (1, 16, 16)), masks, HOST, tmp_path, n=2)
    assert result.error <= TOL
    sparse = [r for r in result.generated.layers if r.kind == "sparse3x3"]
    assert sparse and all(r.patterns == 11 for r in sparse)


def test_rare_patterns_beyond_the_cap_are_widened_exactly(tmp_path):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, bias=False)).eval()
    with torch.no_grad():
        model[0].weight.mul_(torch.rand(8, 8, 3, 3) < 0.4)  # ~ dozens of distinct random tap sets
    result = verify(export(model, (8, 9, 9)), None, HOST, tmp_path, n=2)
    assert result.error <= TOL
    assert result.generated.layers[0].kind == "sparse3x3"
    assert result.generated.layers[0].patterns <= Options().max_patterns


@pytest.mark.parametrize("reorder,compact,lre", [(False, False, False), (True, False, False), (False, True, True), (True, True, False)])
def test_optimisation_switches_keep_results_exact(tmp_path, reorder, compact, lre):
    from simulations.models import resnet20

    model, masks = _prepared(resnet20(), 6.0, seed=4)
    opts = Options(reorder=reorder, compact=compact, lre=lre)
    result = verify(export(model, (1, 12, 12)), masks, HOST, tmp_path, options=opts, n=2)
    assert result.error <= TOL


def test_batch_of_one_and_many_agree(tmp_path):
    from codegen import build

    model, masks = _prepared(nn.Sequential(nn.Conv2d(4, 8, 3, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 3)), 6.0)
    result = verify(export(model, (4, 8, 8)), masks, HOST, tmp_path, n=1)
    x = torch.randn(5, 4, 8, 8)
    many, _ = build.run_harness(tmp_path, HOST, x.numpy(), result.generated.out_shape)
    ones = [build.run_harness(tmp_path, HOST, x[i : i + 1].numpy(), result.generated.out_shape)[0] for i in range(5)]
    assert (many == torch.cat([torch.from_numpy(o) for o in ones]).numpy()).all()
    with torch.no_grad():
        assert abs(many - model(x).numpy()).max() <= TOL * abs(model(x).numpy()).max()


class _Blocked(nn.Module):
    """Wide enough inputs that input channels are processed in several blocks (s1 and s2)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(64, 64, 3, 1, 1, bias=False)
        self.c2 = nn.Conv2d(64, 32, 3, 2, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.c2(torch.relu(self.c1(x) + x)))


def test_input_channel_blocks_with_late_first_kernels_and_empty_blocks_match_pytorch(tmp_path):
    torch.manual_seed(5)
    model = _Blocked().eval()
    masks = fixtures.prune_model(model, 6.0)
    for key in ("c1.weight", "c2.weight"):
        m = masks[key]
        m[0, :40] = False  # first kernels only in a late block
        m[1] = False  # no kernel at all: bias and epilogue only
        m[2, 8:] = False  # kernels only in the first block
        m[3, 10:50] = False  # empty middle blocks
        with torch.no_grad():
            dict(model.named_parameters())[key].mul_(m)
    result = verify(export(model, (64, 40, 40)), masks, HOST, tmp_path, n=2)
    assert result.error <= TOL
    blocks = [int(r.blocking.split("cb")[1]) for r in result.generated.layers]
    assert all(cb < 64 for cb in blocks), blocks  # both convs really run in several blocks


def _at_stride(k, stride: int) -> bool:
    """Whether a conv of ``stride`` can take tile ``k`` (a column-shift tile serves one stride)."""
    from codegen.kernels import SHIFT_SETS, SHIFTED

    return k.op != SHIFTED or k.sets == SHIFT_SETS[stride]


def _registry_chains(target, stride: int = 1) -> list[tuple[str, int, str]]:
    """The kernel registry split into one probe chain (one compile) per (op, vectors, flavour)
    of the tiles a conv of ``stride`` takes."""
    from codegen.kernels import registry

    return sorted({(k.op, k.vecs, k.isa) for k in registry(target) if _at_stride(k, stride)})


def check_registered_tiles(target, op: str, vecs: int, isa: str, tmp_path, stride: int = 1) -> None:
    """Every registry instance of (op, vecs, isa) for ``target``, each used by its own conv(s) of
    a probe chain (``stride`` 2: reading column-phase planes), against PyTorch. Plain sparse
    tiles are probed with the column-shift tiles off: those take every stride-1 row they fit."""
    from dataclasses import replace

    from codegen.kernels import SPARSE, registry

    kernels = [k for k in registry(target) if (k.op, k.vecs, k.isa) == (op, vecs, isa) and _at_stride(k, stride)]
    probe = fixtures.kernel_probe(kernels, target, stride=stride)
    target = replace(target, shift_sets=False) if op == SPARSE else target
    result = verify(export(probe.model, probe.shape), probe.masks, target, tmp_path, n=2)
    assert result.error <= TOL
    assert tuple(t for r in result.generated.layers for t in r.tiles) == probe.tiles


@pytest.mark.parametrize("op,vecs,isa", _registry_chains(HOST), ids=lambda v: str(v))
def test_every_registered_host_tile_matches_pytorch(tmp_path, op, vecs, isa):
    check_registered_tiles(HOST, op, vecs, isa, tmp_path)


@pytest.mark.parametrize("op,vecs,isa", _registry_chains(HOST, stride=2), ids=lambda v: str(v))
def test_every_registered_host_tile_at_stride_two_matches_pytorch(tmp_path, op, vecs, isa):
    check_registered_tiles(HOST, op, vecs, isa, tmp_path, stride=2)


def test_dense_tiles_of_narrow_rows_span_rows_and_keep_the_bits(tmp_path):
    # A row narrower than a dense tile's vectors (a 7-wide map) is tiled over several rows, so a
    # broadcast weight feeds a vector of each; every output still sees the same FMAs in the same
    # order as with one-row tiles: the same bytes, on any thread count, and PyTorch's values.
    # 13 rows leave a remainder band on every host target; the residual and the structured
    # pruned 1x1 (dead output rows, skipped input columns) go through the spanning tiles too.
    from dataclasses import replace

    import numpy as np

    class Narrow(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.expand = nn.Conv2d(16, 40, 1)
            self.dense = nn.Conv2d(40, 16, 3, 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.dense(nn.functional.relu6(self.expand(x))) + x)

    torch.manual_seed(3)
    model = Narrow().eval()
    # the 1x1 alone (pruning the 3x3 would make it pattern-sparse)
    masks = {f"expand.{k.split('.')[-1]}": m for k, m in fixtures.prune_model(nn.Sequential(model.expand), 6.0, structured=4.0).items()}
    assert set(masks) == {"expand.weight"}
    shape = (16, 13, 7)
    one_row = replace(HOST, dense_u=1)  # a tile of one vector of one row
    x = np.random.default_rng(1).standard_normal((2, *shape)).astype("<f4")
    outs = {}
    for name, target in (("span", HOST), ("one", one_row)):
        result = verify(export(model, shape), masks, target, tmp_path / name, n=1)
        assert result.error <= TOL
        spans = [r.blocking for r in result.generated.layers if r.kind == "dense"]
        assert len(spans) == 2 and all((" y" in b) == (name == "span") for b in spans), spans
        for threads in (1, 2, 3) if name == "span" else (1,):
            outs[name, threads] = harness_bytes(tmp_path / name, x, threads)
    assert len(set(outs.values())) == 1
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert np.abs(np.frombuffer(outs["span", 1], "<f4").reshape(ref.shape) - ref).max() <= TOL * np.abs(ref).max()


def test_pattern_sparse_convs_and_pools_split_by_rows_give_the_same_bytes_on_any_thread_count(tmp_path):
    # 83 rows make at least 16 band slots (and a remainder band) on every host target, so the
    # first pattern-sparse conv hands two threads runs of bands; with three or more (fewer than
    # eight slots each) it deals filters, as the second conv (42 rows) always does. The pool
    # between them is split by output rows. Every thread count gives the one-thread bytes.
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(3, 2, 1), nn.Conv2d(16, 16, 3, 1, 1)).eval()
    masks = fixtures.prune_model(model, 6.0)
    shape = (8, 83, 20)
    result = verify(export(model, shape), masks, HOST, tmp_path, n=1)
    assert result.error <= TOL
    assert [r.kind for r in result.generated.layers] == ["sparse3x3", "sparse3x3"]
    source = (tmp_path / "bp_model.c").read_text()
    assert source.count("if (nth * 8 <= ") == 1, "the 83-row conv should split by rows"
    same_bytes_on_any_thread_count(tmp_path, model, shape, seed=3)


@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "pattern"])
def test_layers_split_by_rows_give_the_same_bytes_on_any_thread_count(tmp_path, pruned):
    # A stride-1 depthwise conv and a dense conv whose input outweighs its weights deal runs of
    # row bands to the threads (each core reads its own rows); 25 and 7 rows leave a remainder
    # band of each on every host target (the dense band spans rows of the 10-wide map), and with
    # more threads than bands both fall back to the channel split. The Linear's rows (a group of
    # rows summed side by side and three leftover rows) are runs too. Every thread count gives
    # the one-thread bytes and PyTorch's values.
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(24, 24, 3, 1, 1, groups=24),
        nn.ReLU6(),
        nn.MaxPool2d(4, ceil_mode=True),
        nn.Conv2d(24, 8, 3, 1, 1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 7 * 10, 7),
    ).eval()
    # the depthwise conv alone (pruning the dense one would make it pattern-sparse)
    masks = fixtures.prune_model(nn.Sequential(model[0]), 6.0, depthwise=True) if pruned else {}
    assert set(masks) == ({"0.weight"} if pruned else set())
    shape = (24, 25, 40)
    result = verify(export(model, shape), masks, HOST, tmp_path, n=1)
    assert result.error <= TOL
    convs = [r for r in result.generated.layers if r.kind in ("depthwise", "dense")]
    assert [r.kind for r in convs] == ["depthwise", "dense"]
    source = (tmp_path / "bp_model.c").read_text()
    assert source.count("if (nth <= ") == 2, "both convs should split by rows"
    same_bytes_on_any_thread_count(tmp_path, model, shape, seed=2)
