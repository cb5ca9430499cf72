"""Pattern pruning of depthwise 3x3 convs: one library pattern per channel's kernel, refitted.

Pure tensor functions, no graph or model knowledge. A depthwise conv (weight (C, 1, 3, 3), groups
C) is C independent 9-input filters, each reading its own channel; PatDNN prunes MobileNet-V2's
this way, every kernel keeping one 4-entry library pattern and none removed whole (a removed
kernel is a dead channel), so every such layer has the fixed rate 9/4.

Each channel is its own small least-squares problem: with U_c the 3x3 neighbourhoods of channel
c (+ an offset column where a bias or BatchNorm can take it) and Y_c the dense output, the
statistics ``G_c = U_c^T U_c`` (10 x 10) and ``C_c = U_c^T Y_c`` give the OBS cost of each
pattern (as ``refit.obs_costs`` does for ordinary 3x3 kernels) and the refitted kept weights,
one batched solve for all channels.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

KERNEL = 9


@dataclass(frozen=True)
class DepthwiseStats:
    """Per-channel least-squares statistics (float64): Gram (C, D, D), cross (C, D), ||Y||^2 (C,)."""

    gram: torch.Tensor
    cross: torch.Tensor
    target_energy: torch.Tensor
    offset: bool


def neighbourhoods(x: torch.Tensor, stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]) -> torch.Tensor:
    """(C, positions, 9): each channel's 3x3 input neighbourhoods, as the depthwise conv reads them."""
    n, c = x.shape[:2]
    cols = torch.nn.functional.unfold(x, (3, 3), dilation=dilation, padding=padding, stride=stride)  # (N, C*9, L)
    return cols.reshape(n, c, KERNEL, -1).permute(1, 0, 3, 2).reshape(c, -1, KERNEL)


def accumulate(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]], stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int], offset: bool
) -> DepthwiseStats:
    """G_c, C_c and ||Y_c||^2 over (input, dense output) batches of one depthwise conv."""
    gram = cross = energy = None
    for xin, y in batches:
        u = neighbourhoods(xin.float(), stride, padding, dilation)  # (C, P, 9)
        if offset:
            u = torch.cat([u, torch.ones(*u.shape[:2], 1, dtype=u.dtype, device=u.device)], dim=2)
        t = y.float().permute(1, 0, 2, 3).reshape(y.shape[1], -1)  # (C, P)
        g = torch.bmm(u.transpose(1, 2), u).double()
        c = torch.bmm(u.transpose(1, 2), t[:, :, None]).squeeze(2).double()
        e = t.double().pow(2).sum(dim=1)
        gram = g if gram is None else gram + g
        cross = c if cross is None else cross + c
        energy = e if energy is None else energy + e
    if gram is None or cross is None or energy is None:
        raise ValueError("no synthetic data")
    return DepthwiseStats(gram, cross, energy, offset)


def _damped(gram: torch.Tensor, damping: float) -> torch.Tensor:
    lam = damping * gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-12)
    return gram + lam[:, None, None] * torch.eye(gram.shape[1], dtype=gram.dtype, device=gram.device)


def pattern_costs(stats: DepthwiseStats, library: torch.Tensor, damping: float) -> torch.Tensor:
    """OBS cost (C, P) of each library pattern per channel: the output error its five removed entries cause."""
    h = _damped(stats.gram, damping)
    hinv = torch.linalg.inv(h)
    w = torch.linalg.solve(h, stats.cross[:, :, None]).squeeze(2)[:, :KERNEL]  # (C, 9)
    lib = library.reshape(library.shape[0], KERNEL).to(w.device)
    removed = torch.stack([(~p).nonzero().flatten() for p in lib])  # (P, 5)
    sub = hinv[:, removed[:, :, None], removed[:, None, :]]  # (C, P, 5, 5)
    wq = w[:, removed]  # (C, P, 5)
    return torch.einsum("cpq,cpqr,cpr->cp", wq, torch.linalg.inv(sub), wq)


def refit(stats: DepthwiseStats, mask: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Least-squares weights (C, 1, 3, 3) on each channel's pattern (and its offset (C,), if any)."""
    h = _damped(stats.gram, damping)
    c, d = stats.cross.shape
    support = mask.reshape(c, KERNEL).to(h.device)
    if stats.offset:
        support = torch.cat([support, torch.ones(c, 1, dtype=torch.bool, device=h.device)], dim=1)
    idx = torch.stack([row.nonzero().flatten() for row in support])  # (C, k): every channel keeps k entries
    hs = torch.gather(torch.gather(h, 1, idx[:, :, None].expand(-1, -1, d)), 2, idx[:, None, :].expand(-1, idx.shape[1], -1))
    sol = torch.linalg.solve(hs, torch.gather(stats.cross, 1, idx)[:, :, None]).squeeze(2)
    full = torch.zeros(c, d, dtype=h.dtype, device=h.device).scatter(1, idx, sol)
    offset = full[:, -1] if stats.offset else None
    return full[:, :KERNEL].reshape(c, 1, 3, 3), offset


def relative_error(stats: DepthwiseStats, weight: torch.Tensor, offset: torch.Tensor | None) -> float:
    """||U w - Y||^2 / ||Y||^2 over all channels, from the statistics."""
    w = weight.reshape(weight.shape[0], KERNEL).double().to(stats.gram.device)
    if stats.offset:
        assert offset is not None
        w = torch.cat([w, offset.double().to(w.device)[:, None]], dim=1)
    quad = torch.einsum("cd,cde,ce->c", w, stats.gram, w)
    err = stats.target_energy - 2 * (w * stats.cross).sum(dim=1) + quad
    return float(err.sum().clamp_min(0) / stats.target_energy.sum().clamp_min(1e-30))
