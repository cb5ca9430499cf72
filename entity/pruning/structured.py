"""Structured pruning of 1x1 convs and linear layers: whole input columns, exact counts.

Pure tensor functions, no graph or model knowledge. A weight (O, I) (a 1x1 conv's (O, I, 1, 1)
alike) keeps a set of input columns and loses every other one whole. Columns, not output rows:
the layer's output keeps its shape, so nothing downstream changes (no BatchNorm, residual or
classifier output to rewire), the code generator skips an input channel no kept weight reads,
and the kept weights can be refitted by least squares to reproduce the dense layer's outputs
(a removed output row cannot be compensated at all). A classifier therefore keeps all its
classes (rows) and may lose input features (columns), like any other linear layer.

The choice is OBS-style where the layer's input statistics are known: with ``H = U^T U`` over
the layer's inputs U and the unconstrained least-squares weights ``W*``, removing column j costs
``||W*[:, j]||^2 / (H^-1)_jj`` after the other columns compensate; columns are removed in a few
rounds, cheapest first, re-solving between rounds. Without statistics, columns are ranked by
their norm (times the input channel's energy when known). Ties go to the lower column index.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .patterns import RateError

ROUNDS = 8  # OBS removal rounds: the cost ranking is refreshed this often while columns go


def column_scores(weight: torch.Tensor, energy: torch.Tensor | None = None) -> torch.Tensor:
    """Magnitude score of each input column: ``||W[:, j]||^2`` (times ``energy[j]`` if given)."""
    w = weight.detach().float().reshape(weight.shape[0], weight.shape[1], -1)
    score = w.pow(2).sum(dim=(0, 2))
    return score if energy is None else score * energy.float().to(score.device)


def top_columns(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """A bool vector keeping the ``keep`` highest-scoring columns (ties to the lower index)."""
    if not 0 < keep <= scores.numel():
        raise RateError(f"cannot keep {keep} of {scores.numel()} input columns")
    order = torch.sort(scores, descending=True, stable=True).indices
    kept = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    kept[order[:keep]] = True
    return kept


def column_mask(shape: Sequence[int], columns: torch.Tensor) -> torch.Tensor:
    """The weight-shaped bool mask that keeps exactly the input columns ``columns`` (I,) marks."""
    view = [1, int(shape[1])] + [1] * (len(shape) - 2)
    return columns.to(torch.bool).cpu().reshape(view).expand(*shape).clone()


def columns_of(mask: torch.Tensor) -> torch.Tensor:
    """The kept input columns of a column mask, as an (I,) bool vector."""
    return mask.reshape(mask.shape[0], mask.shape[1], -1).any(dim=2).any(dim=0)


def obs_columns(gram: torch.Tensor, cross: torch.Tensor, in_columns: int, keep: int, rounds: int = ROUNDS) -> torch.Tensor:
    """Keep ``keep`` of ``in_columns`` columns, removing the cheapest (OBS cost) in ``rounds`` rounds.

    ``gram`` is the damped (D, D) input Gram matrix and ``cross`` the (D, O) input-target
    products, with D = ``in_columns`` (+ 1 for an offset column, which is always kept).
    """
    if not 0 < keep <= in_columns:
        raise RateError(f"cannot keep {keep} of {in_columns} input columns")
    d = gram.shape[0]
    alive = torch.ones(d, dtype=torch.bool, device=gram.device)
    to_remove = in_columns - keep
    removed = 0
    for r in range(rounds):
        step = math.ceil((to_remove - removed) / (rounds - r)) if r < rounds - 1 else to_remove - removed
        if step <= 0:
            break
        idx = alive.nonzero().flatten()
        h = gram[idx][:, idx]
        hinv = torch.linalg.inv(h)
        w = hinv @ cross[idx]  # (d', O)
        cost = w.pow(2).sum(dim=1) / hinv.diagonal().clamp_min(1e-30)
        candidates = idx < in_columns  # the offset column is never removed
        cost = torch.where(candidates, cost, torch.full_like(cost, math.inf))
        order = torch.sort(cost, stable=True).indices[:step]
        alive[idx[order]] = False
        removed += step
    return alive[:in_columns].cpu()


def refit_columns(gram: torch.Tensor, cross: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Least-squares weights (D, O) on the kept columns (and the offset column, if D > I): zero elsewhere."""
    d = gram.shape[0]
    support = torch.cat([columns.to(gram.device), torch.ones(d - columns.numel(), dtype=torch.bool, device=gram.device)])
    idx = support.nonzero().flatten()
    out = torch.zeros(d, cross.shape[1], dtype=gram.dtype, device=gram.device)
    out[idx] = torch.linalg.solve(gram[idx][:, idx], cross[idx])
    return out


def allocate_columns(rows: Sequence[int], columns: Sequence[int], budget: int) -> list[int]:
    """Input columns each layer keeps so that ``sum(rows[i] * kept[i])`` is as close to ``budget`` as it can be.

    Layer i has ``rows[i]`` outputs and ``columns[i]`` input columns; a kept column keeps
    ``rows[i]`` weights. Every layer gets the same kept fraction where it can (at least one
    column, at most all: water-filling, as ``patterns.allocate_kernels`` shares kernels), then
    single columns are added or taken back, largest remainder first, while that brings the total
    closer to ``budget``. Raises ``RateError`` when the budget is below one column per layer or
    above every column.
    """
    n = len(rows)
    if n == 0:
        if budget != 0:
            raise RateError(f"{budget} weights left for structured layers, but there are none")
        return []
    low = sum(rows)
    high = sum(r * c for r, c in zip(rows, columns, strict=True))
    if budget < low or budget > high:
        raise RateError(f"{budget} weights cannot be kept by whole columns: the 1x1 and linear layers keep between {low} and {high}")
    share = [0.0] * n
    active = list(range(n))
    left = float(budget)
    while active:
        mass = sum(rows[i] * columns[i] for i in active)
        fraction = left / mass
        capped = [i for i in active if fraction * columns[i] >= columns[i] or fraction * columns[i] <= 1]
        if not capped:
            for i in active:
                share[i] = fraction * columns[i]
            break
        for i in capped:
            share[i] = float(columns[i]) if fraction * columns[i] >= columns[i] else 1.0
            left -= rows[i] * share[i]
            active.remove(i)
    kept = [max(1, min(columns[i], math.floor(share[i]))) for i in range(n)]
    order = sorted(range(n), key=lambda i: (-(share[i] - math.floor(share[i])), i))
    total = sum(r * k for r, k in zip(rows, kept, strict=True))
    moved = True
    while moved and total != budget:
        moved = False
        for i in order if total < budget else reversed(order):
            step = 1 if total < budget else -1
            target = kept[i] + step
            if 1 <= target <= columns[i] and abs(budget - total - step * rows[i]) < abs(budget - total):
                kept[i] = target
                total += step * rows[i]
                moved = True
                if total == budget:
                    break
    return kept
