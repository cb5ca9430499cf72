"""Layer-wise solvers (least-squares refit, ADMM, SLR) and synthetic inputs on tiny models."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from entity.pruning import PruneConfig, prune
from entity.pruning import patterns as pat
from entity.pruning.admm import LayerProblem, RhoSchedule, admm_layer
from entity.pruning.graph import ConvLayer, find_convs
from entity.pruning.refit import accumulate, choose_mask, refit, relative_error
from entity.pruning.slr import alpha, slr_layer
from entity.pruning.synthetic import bn_matched_inputs, bn_nodes, input_bounds, uniform_inputs
from protocol.spec import InputSpec
from simulations.models import SmallVGG

SPEC = InputSpec(shape=(1, 12, 12), mean=(0.2860,), std=(0.3530,))


pytestmark = pytest.mark.usefixtures("one_thread")


def _layer(cin: int = 8, cout: int = 6) -> ConvLayer:
    return ConvLayer(
        index=0,
        node="conv",
        key="w",
        bias=None,
        shape=(cout, cin, 3, 3),
        stride=(1, 1),
        padding=(1, 1),
        dilation=(1, 1),
        groups=1,
        bn=None,
        relu=False,
        is_stem=False,
    )


def _data(cin: int = 8, cout: int = 6, n: int = 24, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    # Correlated inputs (smoothed noise), like real feature maps: magnitude projection is then not optimal.
    x = torch.nn.functional.avg_pool2d(torch.randn(n, cin, 10, 10, generator=gen), 3, 1, 1)
    w = torch.randn(cout, cin, 3, 3, generator=gen)
    layer = _layer(cin, cout)
    return layer, x, w, layer.conv(x, w)


def test_least_squares_refit_beats_magnitude_projection_on_the_layer_error():
    layer, x, w, y = _data()
    stats = accumulate(layer, [(x, y)], offset=False)
    lib = pat.build_library([w], 8)
    mask = pat.project(w, lib, keep=20)
    projected = relative_error(stats, w * mask, None)
    fitted, _ = refit(stats, mask, damping=1e-6)
    assert relative_error(stats, fitted, None) < projected
    assert bool((fitted[~mask] == 0).all())


def test_obs_choice_gives_a_valid_mask_with_lower_refit_error_than_magnitude():
    layer, x, w, y = _data(seed=1)
    stats = accumulate(layer, [(x, y)], offset=False)
    lib = pat.build_library([w], 8)
    mag = pat.project(w, lib, keep=16)
    obs = choose_mask(stats, w, lib, keep=16, damping=1e-6)
    assert int(obs.any(dim=(2, 3)).sum()) == 16
    lib_rows = {tuple(r.reshape(-1).tolist()) for r in lib}
    assert all(tuple(k.tolist()) in lib_rows for k in obs[obs.any(dim=(2, 3))].reshape(-1, 9))
    err_obs = relative_error(stats, refit(stats, obs, 1e-6)[0], None)
    err_mag = relative_error(stats, refit(stats, mag, 1e-6)[0], None)
    assert err_obs <= err_mag + 1e-9


def test_offset_is_fitted_when_the_target_has_one():
    layer, x, w, y = _data(seed=2)
    y = y + torch.arange(y.shape[1], dtype=y.dtype).view(1, -1, 1, 1)
    stats = accumulate(layer, [(x, y)], offset=True)
    full = torch.ones(w.shape, dtype=torch.bool)
    fitted, offset = refit(stats, full, damping=1e-9)
    assert offset is not None
    assert torch.allclose(offset.float(), torch.arange(y.shape[1], dtype=torch.float32), atol=1e-3)
    assert relative_error(stats, fitted, offset) < 1e-6


def _problem(seed: int = 3) -> tuple[LayerProblem, torch.Tensor]:
    layer, x, w, _ = _data(seed=seed)
    w = w / 8.0  # typical conv weight scale, so rho is on the scale of the (mean squared) layer error
    target = torch.relu(layer.conv(x, w))
    lib = pat.build_library([w], 8)
    return LayerProblem(layer, x, target, lambda xb, wt: torch.relu(layer.conv(xb, wt)), lib, 16), w


@pytest.mark.parametrize("solver", ["admm", "slr"])
def test_admm_and_slr_reduce_the_layer_error_below_projection(solver):
    problem, w = _problem()
    baseline = problem.relative_error(problem.project(w))
    kwargs = dict(
        rho=RhoSchedule(1e-2, 10.0, 3), iters=100, lr=1e-2, batch_size=8, update_every=10, optimiser="adam", gen=torch.Generator().manual_seed(0)
    )
    if solver == "admm":
        out = admm_layer(problem, w, **kwargs)
    else:
        out = slr_layer(problem, w, m=300.0, r=0.1, **kwargs)
    assert problem.relative_error(out) < baseline
    mask = pat.project(out, problem.library, problem.keep)
    assert torch.equal(out != 0, (out * mask) != 0)  # the result lies in the constraint set
    assert int(mask.any(dim=(2, 3)).sum()) == problem.keep


def test_slr_step_factor_is_in_the_unit_interval_and_grows_to_one():
    values = [alpha(k, 300.0, 0.1) for k in (1, 2, 10, 1000)]
    assert all(0 < v < 1 for v in values)
    assert values[-1] > values[0]


@pytest.fixture(scope="module")
def program() -> torch.export.ExportedProgram:
    torch.manual_seed(0)
    model = SmallVGG(1, 10, widths=(8, 16, 16)).eval()
    # Non-trivial BatchNorm statistics, as after training.
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    batch = torch.export.Dim("batch", min=1, max=4096)
    return torch.export.export(model, (torch.randn(2, *SPEC.shape),), dynamic_shapes=({0: batch},))


def test_synthetic_inputs_lie_in_the_valid_range_and_are_seeded():
    a = uniform_inputs(SPEC, 8, seed=1)
    lo, hi = input_bounds(SPEC)
    assert a.shape == (8, *SPEC.shape)
    assert bool((a >= lo - 1e-6).all() and (a <= hi + 1e-6).all())
    assert torch.equal(a, uniform_inputs(SPEC, 8, seed=1))
    assert not torch.equal(a, uniform_inputs(SPEC, 8, seed=2))


def test_bn_matching_lowers_the_statistics_mismatch(program):
    gm = program.module()
    assert len(bn_nodes(gm)) == 6
    _, short = bn_matched_inputs(gm, SPEC, 16, seed=0, steps=1, batch_size=16)
    x, long = bn_matched_inputs(gm, SPEC, 16, seed=0, steps=40, batch_size=16)
    assert long[0] < short[0]
    lo, hi = input_bounds(SPEC)
    assert bool((x >= lo - 1e-5).all() and (x <= hi + 1e-5).all())


FAST = dict(synthetic_images=16, synthetic_steps=5, eval_images=8)
# Each recipe's own settings, shortened (refit has no iterations to cut).
FAST_OPTIONS: dict[str, dict] = {"refit": {}, "admm": {"admm_iters": 10, "rho_stages": 2}, "slr": {"admm_iters": 10, "rho_stages": 2}}


@pytest.mark.parametrize("recipe", ["refit", "admm", "slr"])
def test_every_recipe_hits_the_rate_keeps_its_zeros_and_is_deterministic(program, recipe):
    cfg = PruneConfig(rate=8.0, recipe=recipe, seed=5, options=FAST_OPTIONS[recipe], **FAST)
    a = prune(program, SPEC, cfg)
    b = prune(program, SPEC, cfg)
    assert a.report["recipe"] == recipe
    assert a.report["kept_weights"] == pat.kept_kernels_for_rate(a.report["prunable_weights"] // 9, 8.0) * 4
    for key, mask in a.masks.items():
        assert bool((a.state_dict[key][~mask] == 0).all())
    for key in a.state_dict:
        assert torch.equal(a.state_dict[key], b.state_dict[key]), key


def test_sensitivity_allocation_keeps_the_global_rate_and_moves_kernels(program):
    base = PruneConfig(rate=12.0, recipe="refit", synthetic="uniform", options={"allocation": "uniform"}, **FAST)
    uniform = prune(program, SPEC, base)
    sens = prune(program, SPEC, dataclasses.replace(base, options={"allocation": "sensitivity"}))
    assert sens.report["kept_weights"] == uniform.report["kept_weights"]
    assert sens.report["allocation"] == "sensitivity"
    assert [lay["kept_kernels"] for lay in sens.report["layers"]] != [lay["kept_kernels"] for lay in uniform.report["layers"]]


def test_rescaling_a_conv_against_its_batchnorm_keeps_the_function(program):
    from types import SimpleNamespace

    from entity.pruning.graph import get_tensor
    from entity.pruning.refit import write_layer

    dense = program.module()
    work = program.module()
    layer = [lay for lay in find_convs(work) if lay.bn is not None][2]
    w = get_tensor(work, layer.key).clone()
    write_layer(SimpleNamespace(work=work), layer, w * 0.37, None, 0.37)
    assert torch.allclose(get_tensor(work, layer.key), w * 0.37)
    x = uniform_inputs(SPEC, 8, seed=9)
    with torch.no_grad():
        assert torch.allclose(work(x), dense(x), rtol=1e-4, atol=1e-5)


def test_masked_retraining_keeps_the_pruned_zeros(program):
    from owner.retrain import masked_retrain
    from protocol.spec import RetrainRecipe

    result = prune(program, SPEC, PruneConfig(rate=16.0, recipe="oneshot"))
    torch.manual_seed(0)
    model = SmallVGG(1, 10, widths=(8, 16, 16))
    model.load_state_dict(result.state_dict)
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, *SPEC.shape, generator=gen), torch.randint(0, 10, (16,), generator=gen)) for _ in range(3)]
    masked_retrain(model, result.masks, data, RetrainRecipe(epochs=1, lr=0.1))
    sd = model.state_dict()
    for key, mask in result.masks.items():
        assert bool((sd[key][~mask] == 0).all())
        assert bool((sd[key][mask] != 0).any())
