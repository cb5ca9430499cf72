"""Deterministic pattern pruning for codegen's tests and benchmarks.

The entity's real pruner (data-free ADMM/SLR) lives in ``entity/``; codegen only needs models
whose 3x3 convs have the same *structure* as its output: a library of ``n_patterns`` 4-entry
patterns (centre + 3 neighbours), one per kept kernel, and whole kernels removed so that the conv
compression rate is ``9/4 / kept-kernel fraction``. Magnitude projection gives exactly that.
"""
from __future__ import annotations

import torch
from torch import nn

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
    extra = [(1 << 4) | (1 << a) | (1 << b) | (1 << c) for a, b, c in ((1, 3, 5), (3, 5, 7), (1, 5, 7), (1, 3, 7),
                                                                        (0, 1, 3), (1, 2, 5), (5, 7, 8), (3, 6, 7))]
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
    energy = weight.detach().reshape(-1, 9).pow(2) @ lib.T      # (K, P)
    best = energy.argmax(dim=1)
    mask = lib[best].bool()
    kept_energy = energy.gather(1, best[:, None]).squeeze(1)
    keep = max(0, min(cout * cin, round(cout * cin * 2.25 / rate)))
    alive = torch.zeros(cout * cin, dtype=torch.bool)
    if keep:
        alive[kept_energy.topk(keep).indices] = True
    return (mask & alive[:, None]).reshape(weight.shape)


def prune_model(model: nn.Module, rate: float, n_patterns: int = 8, skip_first: bool = True) -> dict[str, torch.Tensor]:
    """Pattern-prune every 3x3 conv (groups=1) in place; returns masks keyed by state_dict name.

    ``skip_first`` leaves a conv with fewer than 4 input channels dense (the usual stem rule).
    """
    masks: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3) and module.groups == 1:
            if skip_first and module.in_channels < 4:
                continue
            mask = pattern_mask(module.weight, rate, n_patterns)
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
            with torch.no_grad():
                module.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                module.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                module.weight.copy_(torch.rand(n, generator=g) + 0.5)
                module.bias.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
