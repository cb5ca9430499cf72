"""Mobile-network ops against PyTorch: fused activations, squeeze-excitation, depthwise convs
(dense and pattern-sparse), structured 1x1/Linear sparsity, and torchvision's mobile networks
end to end, dense and pruned."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from torch import nn

from codegen import HOST, UnsupportedOpError, fixtures, lower
from codegen.emit import generate
from codegen.ir import Activation, Conv, Linear, Mul
from codegen.verify import export, verify
from tests.helpers import same_bytes_on_any_thread_count

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="host C compiler missing (Debian package gcc)")
TOL = 1e-4


class _Acts(nn.Module):
    """Each activation fused after a conv (ReLU6, hardswish, SiLU, hardtanh, clamp), a squeeze-
    excitation block (pool, 1x1 convs, ReLU, hardsigmoid / sigmoid gate, per-channel mul), a
    sigmoid that cannot fuse (its producer is read twice) and a Linear with hardswish."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, 2, 1)
        self.c2 = nn.Conv2d(16, 16, 1)
        self.c3 = nn.Conv2d(16, 16, 3, 1, 1, groups=16)
        self.fc1 = nn.Conv2d(16, 8, 1)
        self.fc2 = nn.Conv2d(8, 16, 1)
        self.c4 = nn.Conv2d(16, 24, 1)
        self.c5 = nn.Conv2d(24, 24, 3, 1, 1)
        self.head = nn.Linear(24, 10)
        self.out = nn.Linear(10, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.relu6(self.c1(x))
        x = nn.functional.hardswish(self.c2(x))
        x = nn.functional.silu(self.c3(x))
        g = nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(nn.functional.adaptive_avg_pool2d(x, 1)))))
        x = x * g
        y = nn.functional.hardtanh(self.c4(x), -0.5, 0.75)
        z = torch.clamp(self.c5(y), -1.0, 1.0)
        z = torch.sigmoid(z) * z  # z is read twice: a lone sigmoid, then a same-shape product
        v = nn.functional.hardswish(self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(z, 1), 1)))
        return self.out(v)


def test_activations_fuse_into_their_convs_and_match_pytorch(tmp_path):
    torch.manual_seed(0)
    model = _Acts().eval()
    program = export(model, (3, 20, 18))
    graph = lower(program)
    acts = {layer.name: layer.act.kind for layer in graph.layers if isinstance(layer, (Conv, Linear)) and layer.act is not None}
    assert acts == {
        "conv2d": "clamp",
        "conv2d_1": "hardswish",
        "conv2d_2": "silu",
        "conv2d_3": "relu",
        "conv2d_4": "hardsigmoid",
        "conv2d_5": "clamp",
        "conv2d_6": "clamp",
        "linear": "hardswish",
    }
    assert [layer.act.kind for layer in graph.layers if isinstance(layer, Activation)] == ["sigmoid"]
    assert sum(isinstance(layer, Mul) for layer in graph.layers) == 2
    result = verify(program, None, HOST, tmp_path, n=3)
    assert result.error <= TOL


class _Depthwise(nn.Module):
    """Depthwise 3x3 stride 1 and 2 and 5x5 stride 1 and 2, with BatchNorm and ReLU6, on an odd size."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(4, 24, 1, bias=False)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(24, 24, k, s, k // 2, groups=24, bias=False), nn.BatchNorm2d(24), nn.ReLU6())
            for k, s in ((3, 1), (3, 2), (5, 1), (5, 2))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.expand(x)
        for block in self.blocks:
            x = block(x)
        return x


@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "patterns"])
def test_depthwise_convs_dense_and_pattern_sparse_match_pytorch(tmp_path, pruned):
    torch.manual_seed(1)
    model = _Depthwise().eval()
    fixtures.randomize_batchnorm(model, 1)
    masks = fixtures.prune_model(model, 6.0, depthwise=True) if pruned else {}
    assert len(masks) == (2 if pruned else 0)  # the two 3x3 depthwise convs
    result = verify(export(model, (4, 29, 27)), masks, HOST, tmp_path, n=2)
    assert result.error <= TOL
    dw = [r for r in result.generated.layers if r.kind == "depthwise"]
    assert [r.shape[2:] for r in dw] == [(3, 3), (3, 3), (5, 5), (5, 5)]
    if pruned:  # one 4-tap library pattern per channel: at most 8 distinct, 4 MACs per output
        assert all(r.patterns <= 8 and r.macs == 24 * 4 * r.out_hw[0] * r.out_hw[1] for r in dw[:2])
    else:
        assert all(r.patterns == 1 for r in dw)


class _Structured(nn.Module):
    """1x1 convs (one with a fused residual) and Linear layers whose masks zero whole rows and columns."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(16, 32, 1)
        self.b = nn.Conv2d(32, 16, 1)
        self.fc1 = nn.Linear(16 * 4, 40)
        self.fc2 = nn.Linear(40, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.relu6(self.a(x))
        z = torch.relu(self.b(y) + x)  # residual: dead output rows still add it
        z = nn.functional.adaptive_avg_pool2d(z, 2)
        return self.fc2(nn.functional.hardswish(self.fc1(torch.flatten(z, 1))))


def test_structured_1x1_and_linear_skip_pruned_rows_and_columns(tmp_path):
    torch.manual_seed(2)
    model = _Structured().eval()
    dense_size = len(generate(lower(export(model, (16, 11, 13))), HOST).files["weights.bin"])
    masks = fixtures.prune_model(model, 6.0, structured=4.0)
    assert set(masks) == {"a.weight", "b.weight", "fc1.weight", "fc2.weight"}
    result = verify(export(model, (16, 11, 13)), masks, HOST, tmp_path, n=3)
    assert result.error <= TOL
    blocking = {r.name: r.blocking for r in result.generated.layers}
    # only a's kept rows that b reads (b's kept columns) are computed: nothing reads the others
    # (b's other columns read a's pruned rows, act(bias) planes)
    rows_a = masks["a.weight"].flatten(1).any(1)
    cols_b = masks["b.weight"].flatten(1).any(0)
    both = int((rows_a & cols_b).sum())
    assert 0 < both < 16
    assert blocking["conv2d"].endswith(f"out{both}/32 in8/16") and blocking["conv2d_1"].endswith("out8/16 in16/32")
    # zero weights of the masked layers are neither stored nor computed
    assert len(result.generated.files["weights.bin"]) < 0.5 * dense_size


def test_depthwise_convs_on_pruned_rows_are_known_planes_neither_computed_nor_stored(tmp_path):
    # The pruned rows of the expand 1x1 are act(bias) planes known at generation time; the
    # depthwise conv reading them (stride 1) knows its planes of those channels, and so does the
    # strided one after it: neither is stored until the 1x1 conv that loads them. Only the live
    # channels that conv reads are computed (the others nothing reads), on any thread count with
    # the same bytes, and PyTorch's values.
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(8, 32, 1),
        nn.ReLU6(),
        nn.Conv2d(32, 32, 3, 1, 1, groups=32),
        nn.Hardswish(),
        nn.Conv2d(32, 32, 3, 2, 1, groups=32),
        nn.ReLU6(),
        nn.Conv2d(32, 12, 1),
    ).eval()
    fixtures.randomize_batchnorm(model, 4)
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Conv2d):
                layer.bias.uniform_(-2.0, 2.0)  # dead rows: planes of 0, of the bias, and of 6
    masks = fixtures.prune_model(model, 6.0, depthwise=True, structured=4.0)
    shape = (8, 21, 19)
    result = verify(export(model, shape), masks, HOST, tmp_path, n=2)
    assert result.error <= TOL
    # computed: the channels the last conv reads (its kept columns) that the expand conv keeps
    rows = masks["0.weight"].flatten(1).any(1)
    cols = masks["6.weight"].flatten(1).any(0)
    live = int((rows & cols).sum())
    assert 0 < live < int(cols.sum())
    dw = [r for r in result.generated.layers if r.kind == "depthwise"]
    assert [r.blocking.split()[-1] for r in dw] == [f"live{live}/32"] * 2
    assert all(r.macs == live * 4 * r.out_hw[0] * r.out_hw[1] for r in dw)
    source = (tmp_path / "bp_model.c").read_text()
    expand = source.split("static void layer0(bp_model")[1].split("\n}\n")[0]
    assert "d[x] = " not in expand, "the expand conv's pruned rows are not stored"
    assert source.count("d[x] = ") == 1, "the last conv's pruned rows are (the network's output)"
    assert source.count("memcpy(d + y * ") == 1, "only the strided depthwise conv stores its known planes"
    same_bytes_on_any_thread_count(tmp_path, model, shape, seed=5)


def test_channels_no_layer_reads_are_not_computed(tmp_path):
    # The 1x1 conv keeps 5 of its 16 input columns, so the pattern-sparse conv before it computes
    # those 5 filters only, and the dense conv before that only the 8 channels they read (one
    # whole input channel of the sparse conv is pruned away). The network's output is whole.
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 9, 3, 1, 1), nn.ReLU(), nn.Conv2d(9, 16, 3, 1, 1), nn.ReLU(), nn.Conv2d(16, 4, 1)).eval()
    masks = fixtures.prune_model(model, 6.0)
    masks["2.weight"][:, 4] = False
    masks["4.weight"] = torch.zeros_like(model[4].weight, dtype=torch.bool)
    masks["4.weight"][:, [1, 6, 7, 11, 15]] = True
    with torch.no_grad():
        for name, mask in masks.items():
            model.get_parameter(name).mul_(mask)
    shape = (3, 18, 21)
    result = verify(export(model, shape), masks, HOST, tmp_path, n=2)
    assert result.error <= TOL
    first, sparse, last = result.generated.layers
    assert sparse.kind == "sparse3x3" and sparse.blocking.endswith("live5/16")
    reads = int(masks["2.weight"][[1, 6, 7, 11, 15]].flatten(2).any(2).any(0).sum())
    assert reads == 8 and first.blocking.endswith(f"out{reads}/9 in3/3")
    assert last.blocking.endswith("out4/4 in5/16")
    same_bytes_on_any_thread_count(tmp_path, model, shape, seed=6)


def test_depthwise_with_channel_multiplier_is_refused_with_its_node():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=4))
    with pytest.raises(UnsupportedOpError, match=r"grouped convolution \(groups=4.*at node conv2d"):
        lower(export(model, (4, 8, 8)))


def _torchvision(name: str) -> nn.Module:
    import torchvision

    torch.manual_seed(3)
    model = getattr(torchvision.models, name)(weights=None).eval()
    fixtures.randomize_batchnorm(model, 3)
    return model


# dense ResNets hold no op the older tests do not cover; every net is also run pruned
CASES = [(name, False) for name in ("mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0")] + [
    (name, True) for name in ("mobilenet_v2", "mobilenet_v3_small", "resnet18", "resnet50", "efficientnet_b0")
]


@pytest.mark.parametrize("name,pruned", CASES, ids=lambda v: {True: "pruned", False: "dense"}.get(v, v) if isinstance(v, bool) else v)
def test_torchvision_mobile_network_matches_pytorch(tmp_path, name, pruned):
    """Whole network at 32x32 (the smallest size every one of them takes), one net per test."""
    model = _torchvision(name)
    masks = fixtures.prune_model(model, 6.0, depthwise=True, structured=4.0) if pruned else {}
    result = verify(export(model, (3, 32, 32)), masks, HOST, tmp_path, n=2)
    assert result.error <= TOL
    if pruned:
        kinds = {r.kind for r in result.generated.layers}
        assert "dense" in kinds and ("depthwise" in kinds or "sparse3x3" in kinds)


def test_thread_count_does_not_change_a_single_bit(tmp_path):
    import os
    import subprocess

    model = _torchvision("mobilenet_v3_small")
    masks = fixtures.prune_model(model, 6.0, depthwise=True, structured=4.0)
    result = verify(export(model, (3, 32, 32)), masks, HOST, tmp_path, n=1)
    assert result.error <= TOL
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype("<f4")
    (tmp_path / "x.bin").write_bytes(x.tobytes())
    outs = {}
    for n in (1, 2, 3, 7):
        out = tmp_path / f"y{n}.bin"
        cmd = [str(tmp_path / "bp_main"), str(tmp_path / "weights.bin"), str(tmp_path / "x.bin"), str(out)]
        subprocess.run(cmd, check=True, env={**os.environ, "BP_THREADS": str(n)}, capture_output=True)
        outs[n] = out.read_bytes()
    assert len(outs[1]) == 3 * 1000 * 4
    assert all(outs[n] == outs[1] for n in outs)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert np.abs(np.frombuffer(outs[2], "<f4").reshape(ref.shape) - ref).max() <= TOL * np.abs(ref).max()


def test_bad_thread_count_in_the_environment_is_one_line(tmp_path):
    import os
    import subprocess

    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1)).eval()
    verify(export(model, (2, 6, 6)), None, HOST, tmp_path, n=1)
    (tmp_path / "x.bin").write_bytes(np.zeros(72, "<f4").tobytes())
    cmd = [str(tmp_path / "bp_main"), str(tmp_path / "weights.bin"), str(tmp_path / "x.bin"), str(tmp_path / "y.bin")]
    proc = subprocess.run(cmd, env={**os.environ, "BP_THREADS": "0"}, capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.strip() == "bp_load: cannot start 0 threads (1..64)"
