"""The layers a recipe does not prune: depthwise 3x3 convs (patterns) and 1x1 / linear layers (columns).

The recipes (``recipes.RECIPES``) prune group-1 3x3 convs, each with its own solver. The other
kinds are pruned here, after the recipe, in graph order, by the recipe's ``extra`` method:

- ``magnitude`` (the one-shot recipe: no data): a depthwise kernel takes the library pattern
  keeping most energy; a structured layer keeps its largest-norm input columns.
- ``refit`` (every recipe that has synthetic inputs): the layer's inputs come from the model
  whose earlier layers are already pruned, its targets from the dense model (``layerwise.pairs``);
  a depthwise kernel takes the pattern of least OBS cost and a structured layer keeps the
  columns that cost least to lose (``structured.obs_columns``); the kept weights are refitted by
  least squares, an offset folded into the bias or BatchNorm, and, under the refit recipe's
  ``rescale``, the layer brought back to the magnitude choice's weight norm (``refit.write_layer``).

ADMM and SLR get the closed-form refit here rather than their iterative solvers: these layers'
targets are linear in the weights (matched before BatchNorm and activation), so the least-squares
solution is the exact minimiser the iterations would approach. The layers are fitted after every
3x3 conv, so a 3x3 conv downstream of a 1x1 conv was fitted on that 1x1 conv's dense output.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from . import depthwise as dw
from . import patterns as pat
from . import structured as st
from .graph import ConvLayer, Layer, LinearLayer, kind_of
from .layerwise import pairs, unfold
from .recipes import RECIPES
from .refit import LayerStats, RefitSettings, damped, relative_error, sum_stats, write_layer

if TYPE_CHECKING:
    from .engine import Job

DEFAULT_DAMPING = 1e-3
# Above this many input columns the (D, D) Gram matrix is not formed (a VGG classifier's 25088
# inputs would need 5 GB): columns are chosen by norm times input energy, and only the kept
# columns' Gram matrix is formed for the refit.
MAX_GRAM_COLUMNS = 4096


def _settings(job: Job) -> tuple[float, bool]:
    """(damping, rescale): the refit recipe's own, else the defaults (no rescale)."""
    settings = job.config.settings
    if isinstance(settings, RefitSettings):
        return settings.damping, settings.rescale
    return DEFAULT_DAMPING, False


def _rows(layer: Layer, xin: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of a 1x1 conv or linear layer as rows: one per output position."""
    if isinstance(layer, ConvLayer):
        return unfold(layer, xin).float(), y.permute(0, 2, 3, 1).reshape(-1, layer.shape[0]).float()
    return xin.reshape(-1, layer.shape[1]).float(), y.reshape(-1, layer.shape[0]).float()


def input_energy(layer: Layer, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Sum of squares of each input column over the data (the Gram matrix's diagonal, without the rest)."""
    energy = torch.zeros(layer.shape[1], dtype=torch.float64)
    for xin, y in batches:
        energy += _rows(layer, xin, y)[0].double().pow(2).sum(dim=0).cpu()
    return energy


def structured_stats(
    layer: Layer, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], offset: bool, columns: torch.Tensor | None = None
) -> LayerStats:
    """``refit.LayerStats`` of a 1x1 conv or linear layer: rows are positions, columns its input
    channels (only those ``columns`` marks, when given)."""

    def rows() -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        for xin, y in batches:
            u, t = _rows(layer, xin, y)
            yield (u if columns is None else u[:, columns.to(u.device)]), t

    return sum_stats(rows(), offset)


def _can_refit(layer: Layer) -> bool:
    return not (isinstance(layer, ConvLayer) and isinstance(layer.padding, str))


def _offset(layer: Layer) -> bool:
    """An offset can be absorbed only by a bias or by the BatchNorm right after the conv."""
    return layer.bias is not None or layer.bn is not None


def _scale(job: Job, layer: Layer, weight: torch.Tensor, magnitude: torch.Tensor, rescale: bool) -> float:
    """The refit recipe's rescale behind BatchNorm: back to the magnitude choice's weight norm."""
    if not rescale or layer.bn is None:
        return 1.0
    norm = float(weight.norm())
    return float((job.dense_weight(layer).cpu() * magnitude).norm()) / norm if norm > 0 else 1.0


def prune_depthwise(job: Job, layer: ConvLayer, refit: bool) -> dict[str, str]:
    """One library pattern per channel's kernel; with ``refit``, OBS choice and refitted weights."""
    dense_w = job.dense_weight(layer).cpu()
    magnitude = pat.project_patterns(dense_w, job.library).cpu()
    if not (refit and _can_refit(layer)):
        job.apply(layer, magnitude, dense_w)
        return {}
    damping, rescale = _settings(job)
    pad = layer.padding
    assert not isinstance(pad, str)
    stats = dw.accumulate(pairs(job.work, job.dense, layer, job.synthetic()), layer.stride, pad, layer.dilation, _offset(layer))
    cost = dw.pattern_costs(stats, job.library, damping).float().cpu()
    mask = pat.project_patterns(dense_w, job.library, cost=cost[:, None, :]).cpu()
    w, offset = dw.refit(stats, mask, damping)
    err = dw.relative_error(stats, w, offset)
    scale = _scale(job, layer, w.float().cpu(), magnitude, rescale)
    write_layer(job, layer, (w * scale).float(), offset, scale)
    job.apply(layer, mask)
    return {"error": f"{err**0.5:.4f}", "scale": f"{scale:.3f}"}


def prune_structured(job: Job, layer: Layer, refit: bool) -> dict[str, str]:
    """Keep ``job.columns[key]`` whole input columns; with ``refit``, OBS choice and refitted weights."""
    keep = job.columns[layer.key]
    dense_w = job.dense_weight(layer).cpu()
    magnitude = st.column_mask(dense_w.shape, st.top_columns(st.column_scores(dense_w), keep))
    if not (refit and _can_refit(layer)):
        job.apply(layer, magnitude, dense_w)
        return {}
    damping, rescale = _settings(job)
    x = job.synthetic()
    in_ch = layer.shape[1]
    if in_ch > MAX_GRAM_COLUMNS:
        columns = st.top_columns(st.column_scores(dense_w, input_energy(layer, pairs(job.work, job.dense, layer, x))), keep)
        stats = structured_stats(layer, pairs(job.work, job.dense, layer, x), _offset(layer), columns)
        h = damped(stats.gram, damping)
        solved = st.refit_columns(h, stats.cross, torch.ones(keep, dtype=torch.bool))  # (keep (+1), O)
        w = torch.zeros(in_ch, layer.shape[0], dtype=solved.dtype)
        w[columns] = solved[:keep].cpu()
        w = w.T.reshape(dense_w.shape)
        offset = solved[keep] if stats.offset else None
        err = relative_error(stats, w.reshape(w.shape[0], -1)[:, columns], offset)
    else:
        stats = structured_stats(layer, pairs(job.work, job.dense, layer, x), _offset(layer))
        h = damped(stats.gram, damping)
        columns = st.obs_columns(h, stats.cross, in_ch, keep)
        solved = st.refit_columns(h, stats.cross, columns)  # (D, O)
        w = solved[:in_ch].T.reshape(dense_w.shape)
        offset = solved[in_ch] if stats.offset else None
        err = relative_error(stats, w, offset)
    scale = _scale(job, layer, w.float().cpu(), magnitude, rescale)
    write_layer(job, layer, (w * scale).float(), offset, scale)
    job.apply(layer, st.column_mask(dense_w.shape, columns))
    return {"error": f"{err**0.5:.4f}", "scale": f"{scale:.3f}"}


def prune_extra_layers(job: Job) -> None:
    """Mask every depthwise and structured layer of the job that has no mask yet, in graph order."""
    refit = RECIPES[job.config.recipe].extra == "refit"
    todo = [lay for lay in job.pruned_layers() if lay.key not in job.masks and not (isinstance(lay, ConvLayer) and kind_of(lay) == "3x3")]
    total, done = len(job.pruned_layers()), len(job.pruned_layers()) - len(todo)
    for i, layer in enumerate(todo):
        start = time.perf_counter()
        if isinstance(layer, ConvLayer) and kind_of(layer) == "depthwise":
            notes = prune_depthwise(job, layer, refit)
            kept = {"kept": layer.shape[0], "kernels": layer.shape[0]}
        else:
            assert isinstance(layer, (ConvLayer, LinearLayer))
            notes = prune_structured(job, layer, refit)
            kept = {"kept_columns": job.columns[layer.key], "columns": layer.shape[1]}
        job.progress(
            {
                "event": "layer",
                "layer": layer.key,
                "kind": kind_of(layer),
                "index": done + i,
                "total": total,
                **kept,
                **notes,
                "seconds": f"{time.perf_counter() - start:.2f}",
            }
        )
