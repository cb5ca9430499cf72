"""Synthetic inputs: the only images the entity ever feeds the owner's model.

Two sources. ``uniform`` is the paper's: every pixel uniform in the owner's pixel range, pushed
through the model's own normalisation. ``bn`` (ZeroQ-style, Cai et al. 2020) starts from noise
and optimises the images so that the batch statistics at every BatchNorm input match the running
statistics stored in the model, with a small total-variation prior: the model itself says what
its inputs looked like on average, and nothing about any single owner image.

Both are deterministic for a seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import fx

from protocol.spec import InputSpec

from .graph import _BN_OPS, get_tensor, record


def normalise(pixels: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """Raw pixels in [pixel_min, pixel_max] -> what the model sees: ``(p/(max-min) - mean)/std``."""
    scale = float(spec.pixel_max - spec.pixel_min)
    mean = torch.tensor(spec.mean, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    return (pixels / scale - mean) / std


def input_bounds(spec: InputSpec, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (low, high) of valid model inputs, shaped (1, C, 1, 1)."""
    lo = torch.full((1, spec.shape[0], 1, 1), float(spec.pixel_min), device=device)
    hi = torch.full((1, spec.shape[0], 1, 1), float(spec.pixel_max), device=device)
    return normalise(lo, spec), normalise(hi, spec)


def uniform_inputs(spec: InputSpec, count: int, seed: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """The paper's synthetic inputs: integer pixels uniform in the pixel range, normalised."""
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(spec.pixel_min, spec.pixel_max + 1, (count, *spec.shape), generator=gen).float()
    return normalise(pixels, spec).to(device)


def bn_nodes(gm: fx.GraphModule) -> list[tuple[str, str, str]]:
    """(node name, running-mean key, running-var key) of every inference BatchNorm in the graph."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _BN_OPS:
            mean, var = node.args[3], node.args[4]
            if isinstance(mean, fx.Node) and mean.op == "get_attr" and isinstance(var, fx.Node) and var.op == "get_attr":
                out.append((node.name, str(mean.target), str(var.target)))
    return out


def _logits_node(gm: fx.GraphModule) -> str:
    """Name of the node whose value the model returns (its first output)."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    first = out.args[0]
    while isinstance(first, (tuple, list)):
        first = first[0]
    return first.name


def _tv(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def bn_matched_inputs(
    gm: fx.GraphModule,
    spec: InputSpec,
    count: int,
    seed: int,
    *,
    steps: int = 200,
    batch_size: int = 128,
    lr: float = 0.2,
    tv_weight: float = 0.01,
    ce_weight: float = 0.0,
    device: str | torch.device = "cpu",
    progress: Callable[[dict], None] | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """ZeroQ-style synthetic inputs whose BatchNorm statistics match the model's running statistics.

    Images are optimised with Adam (cosine-decayed learning rate) on
    ``sum_bn ||mean_batch - running_mean||^2 + ||std_batch - running_std||^2`` (averaged over
    channels) plus ``tv_weight`` x total variation, clamped to the valid input range after every
    step. With ``ce_weight`` > 0 (DeepInversion-style) each image is also pushed towards a random
    class of the model's own output, so batches cover the classes instead of only matching
    averages. Returns the images and the final matching loss of each batch. Falls back to uniform
    inputs when the model has no BatchNorm (there is nothing to match).
    """
    bns = bn_nodes(gm)
    if not bns:
        return uniform_inputs(spec, count, seed, device), []
    targets = [(name, get_tensor(gm, m).float(), get_tensor(gm, v).float().clamp_min(0).sqrt()) for name, m, v in bns]
    want = {f"in:{name}" for name, _, _ in bns}
    logits_node = _logits_node(gm)
    if ce_weight > 0:
        want.add(logits_node)
    lo, hi = input_bounds(spec, device)
    gen = torch.Generator().manual_seed(seed)
    out, losses = [], []
    for params in gm.parameters():
        params.requires_grad_(False)
    batches = math.ceil(count / batch_size)
    for b in range(batches):
        n = min(batch_size, count - b * batch_size)
        x = torch.randn((n, *spec.shape), generator=gen).to(device)
        x = (x * 0.5 + (lo + hi) / 2).clamp(lo, hi).requires_grad_(True)
        labels = None
        if ce_weight > 0:
            classes = int(record(gm, x[:1].detach(), {logits_node})[logits_node].shape[1])
            labels = torch.randint(0, classes, (n,), generator=gen).to(device)
        opt = torch.optim.Adam([x], lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        loss_value = math.nan
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            seen = record(gm, x, want)
            loss = x.new_zeros(())
            for name, mean, std in targets:
                act = seen[f"in:{name}"]
                dims = [0] + list(range(2, act.dim()))
                bm = act.mean(dim=dims)
                bs = act.var(dim=dims, unbiased=False).add(1e-8).sqrt()
                loss = loss + (bm - mean).pow(2).mean() + (bs - std).pow(2).mean()
            match = loss.detach()
            loss = loss + tv_weight * _tv(x)
            if labels is not None:
                loss = loss + ce_weight * torch.nn.functional.cross_entropy(seen[logits_node], labels)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                x.clamp_(lo, hi)
            loss_value = float(match)
            if progress is not None and (step % 50 == 0 or step == steps - 1):
                progress({"event": "synthetic", "batch": b, "batches": batches, "step": step, "steps": steps, "loss": f"{loss_value:.4f}"})
        out.append(x.detach())
        losses.append(loss_value)
    return torch.cat(out), losses
