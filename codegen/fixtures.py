"""Deterministic pattern pruning for codegen's tests and benchmarks.

The entity's real pruner (data-free ADMM/SLR) lives in ``entity/``; codegen only needs models
whose 3x3 convs have the same *structure* as its output: a library of ``n_patterns`` 4-entry
patterns (centre + 3 neighbours), one per kept kernel, and whole kernels removed so that the conv
compression rate is ``9/4 / kept-kernel fraction``. Magnitude projection gives exactly that.
:func:`kernel_probe` builds the models that check every instance of the kernel registry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from .kernels import DENSE, SHIFT_SETS, SHIFTED, SPARSE, Kernel, shifted_blocking
from .targets import Target

NEIGHBOURS = (0, 1, 2, 3, 5, 6, 7, 8)


def pattern_library(weight: torch.Tensor, n_patterns: int) -> torch.Tensor:
    """(P, 9) bool: the most frequent "centre + 3 largest neighbours" patterns of a layer."""
    flat = weight.detach().abs().reshape(-1, 9)
    nb = flat[:, list(NEIGHBOURS)]
    top = nb.topk(3, dim=1).indices
    codes = torch.zeros(flat.shape[0], dtype=torch.int64) + (1 << 4)
    idx = torch.tensor(NEIGHBOURS)[top]
    codes = codes + (1 << idx).sum(dim=1)
    uniq, counts = codes.unique(return_counts=True)
    chosen = uniq[counts.argsort(descending=True)[:n_patterns]].tolist()
    # pad with fixed patterns if the layer shows fewer distinct ones
    extra = [
        (1 << 4) | (1 << a) | (1 << b) | (1 << c)
        for a, b, c in ((1, 3, 5), (3, 5, 7), (1, 5, 7), (1, 3, 7), (0, 1, 3), (1, 2, 5), (5, 7, 8), (3, 6, 7))
    ]
    for code in extra:
        if len(chosen) >= n_patterns:
            break
        if code not in chosen:
            chosen.append(code)
    return torch.tensor([[(c >> t) & 1 for t in range(9)] for c in chosen], dtype=torch.bool)


def pattern_mask(weight: torch.Tensor, rate: float, n_patterns: int = 8) -> torch.Tensor:
    """Mask of a (Cout, Cin, 3, 3) weight: best-energy library pattern per kernel, then the
    largest-norm kernels kept so that the layer's compression rate is ``rate`` (>= 2.25)."""
    cout, cin = weight.shape[:2]
    lib = pattern_library(weight, n_patterns).to(weight.dtype)  # (P, 9)
    energy = weight.detach().reshape(-1, 9).pow(2) @ lib.T  # (K, P)
    best = energy.argmax(dim=1)
    mask = lib[best].bool()
    kept_energy = energy.gather(1, best[:, None]).squeeze(1)
    keep = max(0, min(cout * cin, round(cout * cin * 2.25 / rate)))
    alive = torch.zeros(cout * cin, dtype=torch.bool)
    if keep:
        alive[kept_energy.topk(keep).indices] = True
    return (mask & alive[:, None]).reshape(weight.shape)


def depthwise_mask(weight: torch.Tensor, n_patterns: int = 8) -> torch.Tensor:
    """Mask of a (C, 1, 3, 3) depthwise weight: each channel's kernel keeps its best-energy
    library pattern (PatDNN's depthwise pattern pruning: no kernel removed, 9/4 compression)."""
    lib = pattern_library(weight, n_patterns).to(weight.dtype)
    energy = weight.detach().reshape(-1, 9).pow(2) @ lib.T
    return lib[energy.argmax(dim=1)].bool().reshape(weight.shape)


def structured_mask(weight: torch.Tensor, rate: float) -> torch.Tensor:
    """Mask of a 1x1 conv or Linear weight that keeps whole input columns and whole output rows:
    the ``1/sqrt(rate)`` largest-norm columns, then as many largest-norm rows, so the kept weight
    fraction is about ``1/rate``."""
    w = weight.detach().reshape(weight.shape[0], weight.shape[1], -1).pow(2).sum(-1)
    cout, cin = w.shape
    keep_c = max(1, min(cin, round(cin / rate**0.5)))
    keep_r = max(1, min(cout, round(cout / rate**0.5)))
    cols = torch.zeros(cin, dtype=torch.bool)
    cols[w.sum(0).topk(keep_c).indices] = True
    rows = torch.zeros(cout, dtype=torch.bool)
    rows[(w * cols).sum(1).topk(keep_r).indices] = True
    mask = rows[:, None] & cols[None, :]
    return mask.reshape(cout, cin, *([1] * (weight.dim() - 2))).expand(weight.shape).clone()


def prune_model(
    model: nn.Module, rate: float, n_patterns: int = 8, skip_first: bool = True, *, depthwise: bool = False, structured: float | None = None
) -> dict[str, torch.Tensor]:
    """Pattern-prune every 3x3 conv (groups=1) in place; returns masks keyed by state_dict name.

    ``skip_first`` leaves a conv with fewer than 4 input channels dense (the usual stem rule).
    ``depthwise`` also pattern-prunes 3x3 depthwise convs; ``structured`` (a rate) also prunes
    1x1 convs and Linear layers by whole input columns and output rows.
    """
    masks: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        mask = None
        if isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3) and module.groups == 1:
            if skip_first and module.in_channels < 4:
                continue
            mask = pattern_mask(module.weight, rate, n_patterns)
        elif isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3) and depthwise and module.groups == module.in_channels > 1:
            mask = depthwise_mask(module.weight, n_patterns)
        elif structured and isinstance(module, (nn.Linear, nn.Conv2d)) and (isinstance(module, nn.Linear) or module.kernel_size == (1, 1)):
            if isinstance(module, nn.Conv2d) and module.groups != 1:
                continue
            mask = structured_mask(module.weight, structured)
        if mask is None:
            continue
        with torch.no_grad():
            module.weight.mul_(mask)
        masks[f"{name}.weight" if name else "weight"] = mask
    return masks


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Give BatchNorm layers non-trivial statistics so that folding is actually exercised."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            assert module.running_mean is not None and module.running_var is not None  # track_running_stats
            with torch.no_grad():
                module.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                module.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                module.weight.copy_(torch.rand(n, generator=g) + 0.5)
                module.bias.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)


@dataclass(frozen=True)
class Probe:
    """A model exercising registered kernels, and the tile each of its convs must use."""

    model: nn.Module
    masks: dict[str, torch.Tensor]
    shape: tuple[int, ...]  # per-image input shape
    tiles: tuple[str, ...]  # expected LayerReport.tiles of each conv, one registry name each


def _stride_one_reader(k: Kernel, target: Target) -> list[str]:
    """The tiles of the stride-1 conv that reads a strided column-shift tile's output (same map):
    stride-1 column-shift tiles of as many rows as fit, then the remainder band's."""
    rows = shifted_blocking(target, k.rows, k.vecs, SHIFT_SETS[1])
    if rows is None:
        raise ValueError(f"no stride-1 column-shift tile reads {k.name}'s rows")
    bands = sorted({rows, k.rows % rows} - {0})
    return [replace(k, rows=r, sets=SHIFT_SETS[1]).name for r in bands]


def kernel_probe(kernels: Sequence[Kernel], target: Target, channels: int = 6, seed: int = 0, stride: int = 1) -> Probe:
    """A chain model whose convs use exactly the register tiles ``kernels``, in order.

    Why: the kernel registry's instances are checked against PyTorch through the real emitter,
    one compile per chain instead of one per instance. Each link is an adaptive average pool to
    the size that makes the blocking rules pick the tile (no wider than one narrow vector for a tile
    of the target's narrow flavour, wider for the others), then a 3x3 conv with padding 1:
    pattern-pruned (two patterns, to keep the C small) for a sparse tile of ``rows`` output rows
    x ``vecs`` vectors, unpruned for a dense tile of ``rows`` output channels (on a map ``span``
    rows high where its rows are narrower than the tile's vectors). A masked tile ends
    in a partial vector (its length varies with ``rows``) and its conv is followed by a second
    one of the same tile that reads it directly, so lanes the mask must zero are read back through
    the right padding. Weights are rescaled so every conv's output has unit deviation, keeping a
    deep chain well inside float32. With ``stride`` 2 each link pools to twice the size and its
    first conv has stride 2 (its input then goes through the column-phase split, so the tile reads
    phase planes, not the bordered map); the second conv of a masked tile stays stride 1.
    A column-shift tile (``SHIFTED``) serves one stride (``SHIFT_SETS``); a masked one at stride 2
    is read back by the stride-1 column-shift tiles its row takes. On a target that has them,
    the plain sparse tiles are probed with ``shift_sets`` off (else their rows take the shift
    tiles).
    """
    if any(k.op == SHIFTED and k.sets != SHIFT_SETS.get(stride) for k in kernels):
        raise ValueError(f"column-shift tiles of other strides than {stride} in a stride-{stride} probe")
    g = torch.Generator().manual_seed(seed)
    narrow = target.isa.narrow
    links: list[nn.Module] = []
    masks: dict[str, torch.Tensor] = {}
    tiles: list[str] = []
    cin = channels
    for k in kernels:
        v = narrow.vec if narrow is not None and k.isa == narrow.name else target.vec
        floor = narrow.vec if narrow is not None and k.isa != narrow.name and k.vecs == 1 else 0  # a wide tile must not fit the narrow flavour
        width = k.vecs * v if not k.masked else (k.vecs - 1) * v + 1 + floor + k.rows % (v - 1 - floor)
        if k.op in (SPARSE, SHIFTED):
            size, cout = (k.rows, width), channels
        elif k.op == DENSE:
            # a row narrower than the tile's vectors makes it span rows: then exactly k.span rows
            spans = target.dense_u // k.vecs > 1
            size, cout = (k.span if spans else 1 + k.rows % 3, width), k.rows
        else:
            raise ValueError(f"no probe for kernel op {k.op}")
        links.append(nn.AdaptiveAvgPool2d((stride * size[0], stride * size[1])))
        for j in range(2 if k.masked else 1):
            conv = nn.Conv2d(cin, cout, 3, stride if j == 0 else 1, 1, bias=True)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
                conv.bias.copy_(torch.randn(cout, generator=g) * 0.1)  # type: ignore[union-attr]  # built with bias=True
                if k.op in (SPARSE, SHIFTED):
                    mask = pattern_mask(conv.weight, 6.0, n_patterns=2)
                    conv.weight.mul_(mask)
                    masks[f"{len(links)}.weight"] = mask
            links.append(conv)
            tiles.extend(_stride_one_reader(k, target) if j == 1 and k.op == SHIFTED and stride != 1 else [k.name])
            cin = cout
    model = nn.Sequential(*links).eval()
    shape = (channels, 9, 9)
    x = torch.randn(4, *shape, generator=g)
    with torch.no_grad():
        for link in model:
            x = link(x)
            if isinstance(link, nn.Conv2d):
                scale = float(x.std()) or 1.0
                link.weight.div_(scale)
                link.bias.div_(scale)  # type: ignore[union-attr]  # every chain conv is built with bias=True
                x = x / scale
    return Probe(model, masks, shape, tuple(tiles))
