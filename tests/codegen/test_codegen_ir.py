"""Lowering, pattern analysis and compact storage (no compiler needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from codegen import AARCH64_NEON, HOST, HOST_AVX2, HOST_AVX512, UnsupportedOpError, fixtures, lower
from codegen.emit import checksum64, generate
from codegen.ir import Add, Conv, Linear
from codegen.kernels import lookup, registry
from codegen.patterns import kernel_patterns, pack, storage_sizes
from codegen.verify import export


def test_batchnorm_is_folded_and_relu_fused():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()).eval()
    fixtures.randomize_batchnorm(model)
    graph = lower(export(model, (3, 8, 8)))
    assert len(graph.layers) == 1
    conv = graph.layers[0]
    assert isinstance(conv, Conv) and conv.relu
    bn = model[1]
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().double().numpy()
    np.testing.assert_allclose(conv.weight, model[0].weight.detach().double().numpy() * scale[:, None, None, None], rtol=1e-6)
    np.testing.assert_allclose(conv.bias, (bn.bias.detach().double().numpy() - bn.running_mean.double().numpy() * scale), rtol=1e-6, atol=1e-9)


def test_residual_add_is_fused_into_the_later_conv():
    from simulations.models import resnet20

    graph = lower(export(resnet20(), (1, 16, 16)))
    convs = [layer for layer in graph.layers if isinstance(layer, Conv)]
    assert sum(c.residual is not None for c in convs) == 9
    assert not any(isinstance(layer, Add) for layer in graph.layers)
    assert isinstance(graph.layers[-1], Linear)


def test_decomposed_program_lowers_to_the_same_layers():
    from simulations.models import resnet20

    program = export(resnet20(), (1, 16, 16))
    a = lower(program)
    b = lower(program.run_decompositions())
    assert [type(layer).__name__ for layer in a.layers] == [type(layer).__name__ for layer in b.layers]
    for la, lb in zip(a.layers, b.layers, strict=False):
        if isinstance(la, Conv):
            np.testing.assert_allclose(la.weight, lb.weight)
            assert (la.relu, la.residual is None, la.stride) == (lb.relu, lb.residual is None, lb.stride)


class _Tanh(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x))


def test_unsupported_op_error_names_op_and_node():
    with pytest.raises(UnsupportedOpError, match=r"unsupported op aten\.tanh\.default at node tanh"):
        lower(export(_Tanh(), (3, 8, 8)))


def test_grouped_conv_is_refused_with_its_node():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(UnsupportedOpError, match="at node conv2d"):
        lower(export(model, (4, 8, 8)))


def test_mask_for_unknown_weight_is_refused():
    model = nn.Sequential(nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match="nope.weight"):
        lower(export(model, (4, 8, 8)), {"nope.weight": torch.ones(4, 4, 3, 3, dtype=torch.bool)})


def test_patterns_come_from_the_mask_not_a_fixed_library():
    mask = np.zeros((3, 4, 3, 3), dtype=bool)
    mask[0, 0].flat[[4, 0, 1, 2]] = True
    mask[0, 1].flat[[4, 0, 1, 2]] = True
    mask[1, 2].flat[[4, 6, 7, 8]] = True
    mask[2, 3].flat[[4]] = True
    ps = kernel_patterns(mask)
    assert ps.patterns[0] == (0, 1, 2, 4)
    assert set(ps.patterns) == {(0, 1, 2, 4), (4, 6, 7, 8), (4,)}
    assert (ps.ids >= 0).sum() == 4
    assert ps.ids[0, 2] == -1


def test_pattern_cap_widens_rare_patterns_to_full_kernel():
    rng = np.random.default_rng(0)
    mask = rng.random((16, 16, 3, 3)) < 0.5
    ps = kernel_patterns(mask, max_patterns=6)
    assert len(ps.patterns) == 6 and tuple(range(9)) in ps.patterns
    for o, i in zip(*np.nonzero(ps.ids >= 0), strict=True):
        assert set(np.flatnonzero(mask[o, i])) <= set(ps.patterns[ps.ids[o, i]])


@pytest.mark.parametrize("reorder", [True, False])
def test_packing_keeps_every_kernel_and_groups_by_pattern(reorder):
    torch.manual_seed(0)
    w = torch.randn(12, 10, 3, 3)
    mask = fixtures.pattern_mask(w, 6.0)
    w = (w * mask).double().numpy()
    ps = kernel_patterns(mask.numpy())
    sw = pack(w, ps, ci_block=4, reorder=reorder, compact=True)
    assert len(sw.kci) == int((ps.ids >= 0).sum()) == sw.counts.sum()
    assert len(sw.weights) == 4 * len(sw.kci)
    assert sorted(sw.perm.tolist()) == list(range(12))
    if reorder:  # filters with more kernels first, within each chunk of output channels
        from codegen.patterns import FILTER_CHUNKS

        chunk = -(-12 // FILTER_CHUNKS)
        for s in range(0, 12, chunk):
            run = sw.perm[s : s + chunk]
            assert sorted(run.tolist()) == list(range(s, min(12, s + chunk)))  # a run writes its own planes
            totals = [(ps.ids[o] >= 0).sum() for o in run]
            assert totals == sorted(totals, reverse=True)
        # within a (block, filter) kernels run pattern by pattern: the stored weights follow
        k = 0
        for b in range(sw.counts.shape[0]):
            for f in range(12):
                for p in range(len(ps.patterns)):
                    for _ in range(sw.counts[b, f, p]):
                        c = sw.kci[k]
                        assert ps.ids[sw.perm[f], c] == p and b * 4 <= c < b * 4 + 4
                        np.testing.assert_allclose(sw.weights[4 * k : 4 * k + 4], w[sw.perm[f], c].reshape(9)[list(ps.patterns[p])], rtol=1e-6)
                        k += 1


def test_compact_storage_is_smaller_than_csr():
    torch.manual_seed(0)
    w = torch.randn(64, 64, 3, 3)
    for rate in (2.25, 6.0, 12.0):
        mask = fixtures.pattern_mask(w, rate).numpy()
        rep = storage_sizes(mask, kernel_patterns(mask))
        assert rep.nonzeros == 4 * rep.kernels
        assert rep.compact < 0.65 * rep.csr < rep.dense


def test_weight_file_checksum_detects_a_flipped_bit():
    data = bytearray(np.arange(64, dtype=np.float32).tobytes())
    before = checksum64(bytes(data))
    data[17] ^= 1
    assert checksum64(bytes(data)) != before


def test_generated_source_names_kernels_and_is_deterministic():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, bias=False)).eval()
    masks = fixtures.prune_model(model, 6.0)
    program = export(model, (8, 10, 10))
    a = generate(lower(program, masks), HOST)
    b = generate(lower(program, masks), HOST)
    assert a.files == b.files
    src = a.files["bp_model.c"].decode()
    assert "layer0_t" in src and f"vector_size({4 * HOST.vec})" in src


@pytest.mark.parametrize("target", [HOST, HOST_AVX512, AARCH64_NEON], ids=lambda t: t.name)
def test_kernel_registry_names_encode_parameters_and_fit_the_register_budget(target):
    reg = registry(target)
    assert len({k.name for k in reg}) == len(reg)
    narrow = target.isa.narrow
    for k in reg:
        span = f"y{k.span}" if k.span > 1 else ""
        sets = f"s{k.sets}" if k.sets > 1 else ""
        assert k.name == f"{k.op}_{k.rows}x{span}{k.vecs}{'m' if k.masked else ''}{sets}__{k.isa}"
        assert k.isa == target.isa.name or (narrow is not None and k.isa == narrow.name and k.vecs == 1)
        if k.op == "sparse3x3":
            assert k.vecs <= target.max_u and k.rows * k.vecs <= target.accumulators
        elif k.op == "sparse3x3sh":
            assert target.shift_sets and k.sets in (2, 3) and k.vecs <= target.max_u and (k.masked or k.sets == 3)
            assert k.rows * k.vecs * k.sets <= target.accumulators
        else:
            assert k.op == "dense" and k.vecs * k.span <= target.dense_u and k.rows <= 8
            assert k.rows * k.vecs * k.span <= target.dense_acc


@pytest.mark.parametrize("target", [HOST_AVX2, HOST_AVX512, AARCH64_NEON], ids=lambda t: t.name)
def test_dense_tiles_keep_their_live_values_in_the_register_file(target):
    # accumulators, the operand held for a whole tap (the fewer of inputs and weights) and the
    # streamed one: more than the ISA has spills accumulators to the stack in the inner loop
    registers = {target.isa.name: target.isa.registers}
    if target.isa.narrow is not None:
        registers[target.isa.narrow.name] = target.isa.narrow.registers
    for k in registry(target):
        if k.op == "dense":
            positions = k.vecs * k.span  # vectors per channel (over all the rows it spans)
            assert k.rows * positions + min(k.rows, positions) + 1 <= registers[k.isa], k.name


def test_rows_on_avx512_take_column_shift_tiles_whose_input_loads_are_all_aligned():
    # a misaligned 64-byte load splits a cache line; the column-shift tile loads the aligned
    # vector once for all its tap columns and shifts its accumulators instead: three sets at
    # stride 1, two on a strided conv's phase planes. A depthwise conv, a row too wide for three
    # sets and a strided row whose last output reads past its last vector keep the plain tiles.
    import re

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(16, 16, 3, 1, 1, bias=False),
        nn.Conv2d(16, 16, 3, 2, 1, bias=False),
        nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False),
    ).eval()
    masks = fixtures.prune_model(model, 6.0, depthwise=True)
    gen = generate(lower(export(model, (16, 56, 56)), masks), HOST_AVX512)
    shifted, strided, depthwise = gen.layers
    assert all(t.startswith("sparse3x3sh_") and t.endswith("s3__avx512") for t in shifted.tiles), shifted.tiles
    assert all(t.startswith("sparse3x3sh_") and t.endswith("ms2__avx512") for t in strided.tiles), strided.tiles
    assert not any(t.startswith("sparse3x3sh_") for t in depthwise.tiles)
    src = gen.files["bp_model.c"].decode()
    for i in (0, 1):
        body = src[src.index(f"void layer{i}_tile_") : src.index(f"static void layer{i}(")]
        offsets = [int(v) for v in re.findall(r"ld\(s \+ (-?\d+)\)", body)]
        assert offsets and all(v % 16 == 0 for v in offsets), offsets
    conv, key = nn.Sequential(model[0]), {"0.weight": masks["0.weight"]}
    wide = generate(lower(export(conv, (16, 8, 90)), key), HOST_AVX512)
    assert not any(t.startswith("sparse3x3sh_") for t in wide.layers[0].tiles)  # 6 vectors x 3 sets: no 2 rows fit
    conv = nn.Sequential(model[1])
    full = generate(lower(export(conv, (16, 8, 64)), {"0.weight": masks["1.weight"]}), HOST_AVX512)
    assert not any(t.startswith("sparse3x3sh_") for t in full.layers[0].tiles)  # 32 outputs: the 33rd element is unloaded


def test_tile_symbols_name_layer_patterns_blocking_and_isa():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, bias=False), nn.Conv2d(8, 4, 1)).eval()
    masks = fixtures.prune_model(model, 6.0)
    gen = generate(lower(export(model, (8, 10, 10)), masks), AARCH64_NEON)
    src = gen.files["bp_model.c"].decode()
    sparse, dense = gen.layers
    assert sparse.kind == "sparse3x3" and dense.kind == "dense"
    for i, (rep, detail) in enumerate(((sparse, f"_p{sparse.patterns}"), (dense, "1x1"))):
        assert rep.tiles
        for name in rep.tiles:
            op, blocking = name.removesuffix("__neon").split("_")
            assert f"void layer{i}_tile_{op}{detail}_{blocking}__neon(" in src


def test_unregistered_tile_is_refused():
    with pytest.raises(ValueError, match="not in the kernel registry"):
        lookup(HOST, "sparse3x3", HOST.accumulators + 1, 1, False)


def test_host_target_is_the_widest_flavour_the_cpu_runs(monkeypatch):
    from codegen.targets import HOST_AVX2, HOST_AVX512, best_host

    monkeypatch.delenv("BP_HOST_TARGET", raising=False)
    assert best_host(frozenset({"avx2", "fma", "avx512f"})) is HOST_AVX512
    assert best_host(frozenset({"avx2", "fma"})) is HOST_AVX2
    assert best_host(frozenset()) is HOST_AVX2
    monkeypatch.setenv("BP_HOST_TARGET", "host-avx2")
    assert best_host(frozenset({"avx2", "fma", "avx512f"})) is HOST_AVX2
    monkeypatch.setenv("BP_HOST_TARGET", "host-sse")
    with pytest.raises(ValueError, match="BP_HOST_TARGET=host-sse is not one of host-avx512, host-avx2"):
        best_host()


def test_avx512_tiles_are_sixteen_floats_wide_and_within_its_register_budget():
    from codegen.targets import HOST_AVX512

    model = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, bias=False)).eval()
    masks = fixtures.prune_model(model, 6.0)
    gen = generate(lower(export(model, (8, 20, 40)), masks), HOST_AVX512)
    source = gen.files["bp_model.c"].decode()
    assert "vector_size(64)" in source and "__avx512" in source
    assert all(k.rows * k.vecs <= HOST_AVX512.accumulators for k in registry(HOST_AVX512))


def test_a_host_target_the_cpu_cannot_run_is_refused_before_building(monkeypatch, tmp_path):
    from codegen import build, targets

    monkeypatch.setattr(targets, "host_cpu_flags", lambda: frozenset({"avx2", "fma"}))
    with pytest.raises(build.BuildError, match="^target host-avx512 needs a CPU with avx512f$"):
        build.compile_dir(tmp_path, targets.HOST_AVX512)
