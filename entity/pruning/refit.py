"""Reconstruction-error pruning: OBS-style choice of patterns and kernels, least-squares refit.

For a conv followed by BatchNorm, matching its pre-activation output ``Y = W X`` is linear least
squares, so everything follows from two sufficient statistics of the layer's im2col inputs U:
``G = U^T U`` and ``C = U^T Y``. With ``H^-1 = (G + damping)^-1`` and the unconstrained optimum
``w* = H^-1 C``, removing a set Q of one output channel's weights costs (Optimal Brain Surgeon)
``w*_Q^T [(H^-1)_QQ]^-1 w*_Q`` after the others compensate. Each kernel takes the library pattern
whose five removed entries cost least; a layer keeps the kernels whose removal would cost most on
top of that; the kept weights (plus an offset folded into BatchNorm's running mean) are then
refitted in closed form per output channel.

Refitted weights come out far larger than the one-shot projection's (1.1-1.7x the dense norm vs
0.45-0.6x here). Behind BatchNorm an SGD step's effect scales like lr / ||w||^2, so such a model
retrains several times slower and loses its head start; ``rescale`` brings each layer back to the
one-shot weight norm and adjusts BatchNorm's running statistics so the function is unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from . import patterns as pat
from .graph import ConvLayer, Layer, get_tensor, set_tensor
from .layerwise import pairs, unfold
from .options import PruneError, RecipeSettings

if TYPE_CHECKING:
    from .engine import Job


@dataclass(frozen=True)
class RefitSettings(RecipeSettings):
    """The refit recipe's options; the defaults are the measured winner (benchmarks/results/paper_table.md)."""

    damping: float = 1e-3  # relative ridge on the least-squares problems
    refit_choice: str = "obs"  # "obs" (reconstruction error) or "magnitude"
    # Kernels per layer: "uniform" rate, or "sensitivity" measured on synthetic data ("auto": sensitivity).
    allocation: str = "auto"
    rescale: bool = True  # bring each layer back to the one-shot weight norm (see the module docstring)

    def __post_init__(self) -> None:
        if self.allocation not in ("auto", "uniform", "sensitivity"):
            raise PruneError(f"allocation must be 'auto', 'uniform' or 'sensitivity', got {self.allocation!r}")
        if self.refit_choice not in ("obs", "magnitude"):
            raise PruneError(f"refit_choice must be 'obs' or 'magnitude', got {self.refit_choice!r}")


@dataclass(frozen=True)
class LayerStats:
    """Sufficient statistics of one layer's least-squares problem (float64)."""

    gram: torch.Tensor  # (D, D), D = in_channels * 9 (+ 1 with an offset column)
    cross: torch.Tensor  # (D, O)
    target_energy: torch.Tensor  # (O,) sum of Y^2 per output channel
    offset: bool


def accumulate(layer: ConvLayer, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], offset: bool) -> LayerStats:
    """G = U^T U, C = U^T Y and ||Y||^2 over (input, target) batches of one conv."""
    rows = ((unfold(layer, xin), y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])) for xin, y in batches)
    return sum_stats(rows, offset)


def sum_stats(rows: Iterable[tuple[torch.Tensor, torch.Tensor]], offset: bool) -> LayerStats:
    """``LayerStats`` from chunks of (U, Y) rows: U (positions, inputs), Y (positions, outputs).

    float32 products per chunk (fast), float64 sums across chunks (accurate enough for the solves);
    ``offset`` appends a column of ones to U (a bias the refit may move).
    """
    gram = cross = energy = None
    for u, t in rows:
        u, t = u.float(), t.float()
        if offset:
            u = torch.cat([u, torch.ones(u.shape[0], 1, dtype=u.dtype, device=u.device)], dim=1)
        g, c, e = (u.T @ u).double(), (u.T @ t).double(), t.double().pow(2).sum(dim=0)
        gram = g if gram is None else gram + g
        cross = c if cross is None else cross + c
        energy = e if energy is None else energy + e
    if gram is None or cross is None or energy is None:
        raise ValueError("no synthetic data")
    return LayerStats(gram, cross, energy, offset)


def damped(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """G + damping * mean(diag G) * I: keeps the solves well posed when inputs are degenerate."""
    lam = damping * float(gram.diagonal().mean().clamp_min(1e-12))
    return gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)


def obs_costs(stats: LayerStats, shape: tuple[int, int, int, int], library: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per kernel: the OBS cost of each library pattern (O, I, P) and of removing the kernel (O, I)."""
    out_ch, in_ch = shape[0], shape[1]
    h = damped(stats.gram, damping)
    hinv = torch.linalg.inv(h)
    w_star = torch.linalg.solve(h, stats.cross).T  # (O, D)
    w = w_star[:, : in_ch * 9].reshape(out_ch, in_ch, 9)
    blocks = torch.stack([hinv[9 * i : 9 * i + 9, 9 * i : 9 * i + 9] for i in range(in_ch)])  # (I, 9, 9)
    lib = library.reshape(library.shape[0], 9).to(w.device)
    removed = torch.stack([(~p).nonzero().flatten() for p in lib])  # (P, 5)
    sub = blocks[:, removed[:, :, None], removed[:, None, :]]  # (I, P, 5, 5)
    m = torch.linalg.inv(sub)
    wq = w[:, :, removed]  # (O, I, P, 5)
    pattern_cost = torch.einsum("oipq,ipqr,oipr->oip", wq, m, wq)
    kernel_cost = torch.einsum("oiq,iqr,oir->oi", w, torch.linalg.inv(blocks), w)
    return pattern_cost, kernel_cost


def choose_mask(stats: LayerStats, weight: torch.Tensor, library: torch.Tensor, keep: int, damping: float) -> torch.Tensor:
    """OBS-style mask: cheapest pattern per kernel, then the kernels dearest to remove."""
    pattern_cost, kernel_cost = obs_costs(stats, tuple(weight.shape), library, damping)  # type: ignore[arg-type]
    pattern = pat.project_patterns(weight.cpu(), library, cost=pattern_cost.float().cpu())
    best = pattern_cost.min(dim=2).values
    gain = (kernel_cost - best).float().cpu()
    kept = pat.connectivity_mask(gain, keep)
    return pattern & kept[:, :, None, None]


def refit(stats: LayerStats, mask: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Least-squares weights on the mask's support (and the offset), one output channel at a time."""
    out_ch = mask.shape[0]
    h = damped(stats.gram, damping)
    d = h.shape[0]
    flat = mask.reshape(out_ch, -1).to(h.device)
    weights = torch.zeros(out_ch, d, dtype=h.dtype, device=h.device)
    for o in range(out_ch):
        support = flat[o].nonzero().flatten()
        if stats.offset:
            support = torch.cat([support, torch.tensor([d - 1], device=h.device)])
        if support.numel() == 0:
            continue
        sol = torch.linalg.solve(h[support][:, support], stats.cross[support, o])
        weights[o, support] = sol
    offset = weights[:, -1] if stats.offset else None
    w = weights[:, : flat.shape[1]].reshape(mask.shape)
    return w, offset


def relative_error(stats: LayerStats, w: torch.Tensor, offset: torch.Tensor | None) -> float:
    """||U w - Y||^2 / ||Y||^2 from the statistics (no second pass over the data)."""
    flat = w.reshape(w.shape[0], -1).double().to(stats.gram.device)
    if stats.offset:
        assert offset is not None
        flat = torch.cat([flat, offset.double().to(flat.device)[:, None]], dim=1)
    err = stats.target_energy - 2 * (flat * stats.cross.T).sum(dim=1) + ((flat @ stats.gram) * flat).sum(dim=1)
    return float(err.sum().clamp_min(0) / stats.target_energy.sum().clamp_min(1e-30))


def write_layer(job: Job, layer: Layer, weight: torch.Tensor, offset: torch.Tensor | None, scale: float) -> None:
    """Store refitted weights; fold the offset into bias or BatchNorm, rescale BN to keep the function."""
    model = job.work
    if layer.bias is not None and offset is not None:
        set_tensor(model, layer.bias, offset.float() * scale)
    elif layer.bias is not None:
        set_tensor(model, layer.bias, get_tensor(model, layer.bias) * scale)
    bn = layer.bn
    if bn is not None:
        mean = get_tensor(model, bn.running_mean).double()
        var = get_tensor(model, bn.running_var).double()
        if layer.bias is None and offset is not None:
            mean = mean - offset.to(mean.device)
        mean = mean * scale
        var = (scale**2 * (var + bn.eps) - bn.eps).clamp_min(0)
        set_tensor(model, bn.running_mean, mean)
        set_tensor(model, bn.running_var, var)
    set_tensor(model, layer.key, weight.float())


def sensitivity_allocation(job: Job, x: torch.Tensor) -> dict[str, int]:
    """Kernels per layer chosen by measured sensitivity instead of a uniform rate.

    On the dense model, each kernel's OBS gain (cost of removing it beyond its pattern's cost),
    divided by its layer's output energy, estimates the relative reconstruction error its removal
    causes. Keeping the globally largest such gains, with the total fixed by the requested rate,
    minimises the summed relative layer errors (under the independent-removal approximation).
    Every layer keeps at least a quarter of its uniform share, so no layer is starved by a poor
    estimate. Pinned layers (``layer_rates``) keep their counts.
    """
    damping = job.recipe_settings(RefitSettings).damping
    pinned = {key for key, _ in job.config.layer_rates}
    free = [lay for lay in job.layers if lay.key not in pinned]
    if not free:
        return dict(job.keep)
    budget = sum(job.keep[lay.key] for lay in free)
    gains, floors = [], {}
    for lay in free:
        offset = lay.bias is not None or lay.bn is not None
        stats = accumulate(lay, pairs(job.dense, job.dense, lay, x), offset)
        pattern_cost, kernel_cost = obs_costs(stats, lay.shape, job.library, damping)
        gain = (kernel_cost - pattern_cost.min(dim=2).values).clamp_min(0)
        gain = gain / stats.target_energy.sum().clamp_min(1e-30)
        gains.append(gain.reshape(-1).float().cpu())
        floors[lay.key] = max(1, job.keep[lay.key] // 4)
    keep = dict(floors)
    left = budget - sum(floors.values())
    # Candidates beyond each layer's floor, ranked globally (stable: ties to earlier layers).
    cand_scores, cand_layer = [], []
    for lay, gain in zip(free, gains, strict=True):
        ranked = torch.sort(gain, descending=True, stable=True).values[floors[lay.key] :]
        cand_scores.append(ranked)
        cand_layer.append(torch.full((ranked.numel(),), free.index(lay)))
    scores, owner = torch.cat(cand_scores), torch.cat(cand_layer)
    top = torch.sort(scores, descending=True, stable=True).indices[: max(left, 0)]
    counts = torch.bincount(owner[top], minlength=len(free))
    for i, lay in enumerate(free):
        keep[lay.key] += int(counts[i])
    return {**job.keep, **keep}


def run_refit(job: Job) -> None:
    """The recipe: per layer in topological order, statistics -> mask -> refit -> rescale."""
    cfg = job.recipe_settings(RefitSettings)
    x = job.synthetic()
    total = len(job.layers)
    if cfg.allocation in ("sensitivity", "auto"):
        job.keep = sensitivity_allocation(job, x)
        job.notes["allocation"] = "sensitivity"
    for i, layer in enumerate(job.layers):
        start = time.perf_counter()
        # An offset can be absorbed only by a bias or by the BatchNorm right after the conv.
        offset = layer.bias is not None or layer.bn is not None
        stats = accumulate(layer, pairs(job.work, job.dense, layer, x), offset)
        dense_w = job.dense_weight(layer)
        keep = job.keep[layer.key]
        if cfg.refit_choice == "obs":
            mask = choose_mask(stats, dense_w.to(stats.gram.device), job.library, keep, cfg.damping)
        else:
            mask = pat.project(dense_w.cpu(), job.library, keep)
        w, b = refit(stats, mask, cfg.damping)
        err = relative_error(stats, w, b)
        scale = 1.0
        if cfg.rescale and layer.bn is not None:
            oneshot = dense_w.cpu() * pat.project(dense_w.cpu(), job.library, keep)
            norm = float(w.norm())
            scale = float(oneshot.norm()) / norm if norm > 0 else 1.0
        write_layer(job, layer, (w * scale).float(), b, scale)
        job.apply(layer, mask.cpu())
        job.progress(
            {
                "event": "layer",
                "layer": layer.key,
                "index": i,
                "total": total,
                "kept": keep,
                "kernels": layer.kernels,
                "error": f"{err**0.5:.4f}",
                "scale": f"{scale:.3f}",
                "seconds": f"{time.perf_counter() - start:.2f}",
            }
        )
