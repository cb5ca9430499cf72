"""Pattern library, kernel-pattern and connectivity projections, exact compression rates.

Pure tensor functions, no graph or model knowledge. A 3x3 kernel is pattern-pruned by keeping
exactly four entries, the centre plus three neighbours, chosen from a small library of such
patterns (PatDNN / Gong et al. 2020): the code generator then emits one specialised inner loop
per library pattern. Connectivity pruning removes whole kernels on top. With patterns of four
entries, the conv compression rate is ``9 / 4 / kept-kernel fraction``; the smallest rate is
therefore 2.25 (patterns only).

Everything here is deterministic: ties are broken by position (lowest index wins), never by the
order a sort happens to return.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence

import torch

KERNEL_SIZE = 9
PATTERN_SIZE = 4
CENTRE = 4
MIN_RATE = KERNEL_SIZE / PATTERN_SIZE


class RateError(ValueError):
    """A requested compression rate cannot be met."""


def candidate_patterns() -> torch.Tensor:
    """All 56 four-entry patterns that keep the centre, as a (56, 9) bool tensor.

    Ordered lexicographically by the three neighbour positions, so a pattern's index is stable.
    """
    neighbours = [p for p in range(KERNEL_SIZE) if p != CENTRE]
    rows = []
    for combo in itertools.combinations(neighbours, PATTERN_SIZE - 1):
        row = torch.zeros(KERNEL_SIZE, dtype=torch.bool)
        row[list(combo)] = True
        row[CENTRE] = True
        rows.append(row)
    return torch.stack(rows)


def _flat_kernels(weight: torch.Tensor) -> torch.Tensor:
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"expected a conv weight of shape (O, I, 3, 3), got {tuple(weight.shape)}")
    return weight.detach().reshape(-1, KERNEL_SIZE).float()


def _stable_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries along the last dim; ties go to the lower index."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order[..., :k]


def natural_pattern_ids(weight: torch.Tensor) -> torch.Tensor:
    """For each kernel, the index (into ``candidate_patterns()``) of centre + its 3 largest neighbours."""
    flat = _flat_kernels(weight).abs()
    flat = flat.clone()
    flat[:, CENTRE] = -1.0  # never picked as a neighbour
    top = _stable_top(flat, PATTERN_SIZE - 1)
    chosen = torch.zeros(flat.shape, dtype=torch.bool)
    chosen.scatter_(1, top, True)
    chosen[:, CENTRE] = True
    cands = candidate_patterns()
    # A kernel's pattern is the unique candidate equal to its chosen set.
    match = (chosen[:, None, :] == cands[None, :, :]).all(dim=-1)
    return match.float().argmax(dim=1)


def build_library(weights: Iterable[torch.Tensor], size: int = 8) -> torch.Tensor:
    """The ``size`` most frequent natural patterns over all kernels of ``weights``, as (size, 3, 3) bool.

    Ties in frequency go to the lower candidate index, so the library is a pure function of the
    weights.
    """
    if not 1 <= size <= 56:
        raise ValueError(f"pattern library size must be between 1 and 56, got {size}")
    counts = torch.zeros(56, dtype=torch.long)
    for weight in weights:
        counts += torch.bincount(natural_pattern_ids(weight), minlength=56)
    top = _stable_top(counts, size)
    return candidate_patterns()[top].reshape(size, 3, 3)


def pattern_scores(weight: torch.Tensor, library: torch.Tensor) -> torch.Tensor:
    """Energy (sum of squares) each library pattern would keep, per kernel: shape (O, I, P)."""
    energy = _flat_kernels(weight) ** 2
    lib = library.reshape(library.shape[0], KERNEL_SIZE).float()
    return (energy @ lib.T).reshape(weight.shape[0], weight.shape[1], library.shape[0])


def project_patterns(weight: torch.Tensor, library: torch.Tensor, cost: torch.Tensor | None = None) -> torch.Tensor:
    """Kernel-pattern projection: one library pattern per kernel, as a bool mask of ``weight``'s shape.

    By default each kernel takes the pattern that keeps the most energy (the Euclidean projection
    onto the pattern set). ``cost`` (O, I, P), if given, replaces that choice: the pattern with the
    lowest cost wins (e.g. the reconstruction error its removal causes). Ties go to the earlier
    library pattern.
    """
    if cost is None:
        choice = _stable_top(pattern_scores(weight, library), 1)[..., 0]
    else:
        choice = _stable_top(-cost, 1)[..., 0]
    return library[choice].to(weight.device)


def kernel_norms(weight: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """L2 norm of each (masked) kernel: shape (O, I)."""
    w = weight.detach().float()
    if mask is not None:
        w = w * mask
    return w.pow(2).sum(dim=(2, 3)).sqrt()


def connectivity_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Keep exactly ``keep`` kernels, those with the largest ``scores`` (O, I); ties to the lower index."""
    total = scores.numel()
    if not 0 <= keep <= total:
        raise RateError(f"cannot keep {keep} of {total} kernels")
    flat = torch.zeros(total, dtype=torch.bool, device=scores.device)
    flat[_stable_top(scores.reshape(-1), keep)] = True
    return flat.reshape(scores.shape)


def project(weight: torch.Tensor, library: torch.Tensor, keep: int) -> torch.Tensor:
    """Magnitude projection onto the pattern + connectivity set: the one-shot baseline's mask.

    Patterns first (most energy kept), then the ``keep`` kernels with the largest patterned norm.
    """
    pattern = project_patterns(weight, library)
    kept = connectivity_mask(kernel_norms(weight, pattern), keep)
    return pattern & kept[:, :, None, None]


def kept_kernels_for_rate(kernels: int, rate: float) -> int:
    """Kernels to keep so that ``9 * kernels / (4 * kept)`` is as close to ``rate`` as possible (>= 1)."""
    if not math.isfinite(rate) or rate < MIN_RATE - 1e-9:
        raise RateError(f"compression rate {rate} is below {MIN_RATE} (four-entry patterns keep 4 of 9 weights)")
    return max(1, min(kernels, round(KERNEL_SIZE * kernels / (PATTERN_SIZE * rate))))


def compression_rate(total_weights: int, kept_weights: int) -> float:
    """Dense weights over kept weights."""
    return total_weights / kept_weights if kept_weights else math.inf


def allocate_kernels(kernels: Sequence[int], rate: float, fixed: dict[int, float] | None = None, weights: Sequence[float] | None = None) -> list[int]:
    """Kernels each layer keeps so the rate over all layers is ``rate`` (exact up to one kernel).

    ``kernels[i]`` is layer i's kernel count. Layers in ``fixed`` (index -> own rate) get exactly
    their own rate; the others share what remains in proportion to ``kernels[i] * weights[i]``
    (uniform when ``weights`` is None), by largest remainder, at least one kernel each and never
    more than they have. Raises ``RateError`` if the split is impossible.
    """
    fixed = dict(fixed or {})
    n = len(kernels)
    if weights is None:
        weights = [1.0] * n
    out = [0] * n
    for i, own in fixed.items():
        out[i] = kept_kernels_for_rate(kernels[i], own)
    free = [i for i in range(n) if i not in fixed]
    if not free:
        return out
    total_keep = kept_kernels_for_rate(sum(kernels), rate)
    remaining = total_keep - sum(out)
    capacity = sum(kernels[i] for i in free)
    if remaining < len(free) or remaining > capacity:
        raise RateError(
            f"rate {rate} cannot be met: {remaining} kernels left for {len(free)} layers holding {capacity} (every layer keeps at least one kernel)"
        )
    # Water-filling: proportional shares, capped at each layer's size, at least one kernel.
    cap = {i: kernels[i] for i in free}
    share = {i: 0.0 for i in free}
    active = list(free)
    budget = float(remaining)
    while active:
        mass = sum(kernels[i] * weights[i] for i in active)
        capped = []
        for i in active:
            share[i] = budget * kernels[i] * weights[i] / mass if mass > 0 else budget / len(active)
            if share[i] >= cap[i]:
                capped.append(i)
        if not capped:
            break
        for i in capped:
            share[i] = float(cap[i])
            budget -= cap[i]
            active.remove(i)
    for i in free:
        out[i] = max(1, min(cap[i], math.floor(share[i])))
    left = remaining - sum(out[i] for i in free)
    order = sorted(free, key=lambda i: (-(share[i] - math.floor(share[i])), i))
    step = 1 if left > 0 else -1
    while left != 0:
        moved = False
        for i in order:
            if left == 0:
                break
            target = out[i] + step
            if 1 <= target <= cap[i]:
                out[i] = target
                left -= step
                moved = True
        if not moved:
            raise RateError(f"rate {rate} cannot be met exactly")
    return out
