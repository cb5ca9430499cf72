"""Synthetic inputs: the only images the entity ever feeds the owner's model.

Three sources. ``uniform`` is the paper's: every pixel uniform in the owner's pixel range, pushed
through the model's own normalisation. ``bn`` (ZeroQ-style, Cai et al. 2020) starts from noise
and optimises the images so that the batch statistics at every BatchNorm input match the running
statistics stored in the model, with a small total-variation prior: the model itself says what
its inputs looked like on average, and nothing about any single owner image. A model without
BatchNorm has no such statistics; ``inversion`` (DeepInversion-style, Yin et al. 2020) then makes
images the model assigns to balanced class targets, under a prior taken from the input
specification instead (normalised inputs have per-channel mean 0 and standard deviation 1).

All are deterministic for a seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import fx

from protocol.spec import InputSpec

from .graph import _BN_OPS, get_tensor, record

Progress = Callable[[dict], None] | None


def synthesize(
    kind: str, gm: fx.GraphModule, spec: InputSpec, count: int, seed: int, steps: int, device: str | torch.device, progress: Progress = None
) -> tuple[torch.Tensor, dict[str, str]]:
    """``count`` images from source ``kind`` ("uniform", "bn" or "inversion") and the report notes on them.

    One entry point for every caller (the engine's inputs, distillation's held-out images), so a
    source is made the same way wherever it is used.
    """
    if kind == "inversion":
        x, losses = inversion_inputs(gm, spec, count, seed, steps, device, progress)
        return x, {"inversion_prior_loss": f"{max(losses):.4f}"}
    if kind == "bn":
        x, losses = bn_matched_inputs(gm, spec, count, seed, steps=steps, device=device, progress=progress)
        return x, {"bn_match_loss": f"{max(losses):.4f}" if losses else "none"}
    return uniform_inputs(spec, count, seed, device), {}


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


def has_batchnorm(gm: fx.GraphModule) -> bool:
    """Whether the model stores BatchNorm running statistics to match (else the inversion path runs)."""
    return bool(bn_nodes(gm))


def _js(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence between the softmaxes of two logit batches (mean over the batch)."""
    p, q = p_logits.softmax(dim=1), q_logits.softmax(dim=1)
    m = ((p + q) / 2).clamp_min(1e-8).log()
    kl = torch.nn.functional.kl_div
    return 0.5 * (kl(m, p, reduction="batchmean") + kl(m, q, reduction="batchmean"))


def invert(
    teacher: fx.GraphModule,
    spec: InputSpec,
    x: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    lr: float = 0.1,
    ce_weight: float = 1.0,
    tv_weight: float = 0.01,
    stats_weight: float = 1.0,
    student: torch.nn.Module | None = None,
    adv_weight: float = 0.0,
) -> tuple[torch.Tensor, float]:
    """Optimise images ``x`` so the teacher calls them ``labels`` (DeepInversion, Yin et al. 2020).

    The prior that keeps them image-like comes from the model itself where it can: with BatchNorm,
    each BN input's batch statistics are matched to its running statistics; without BatchNorm
    (nothing stored to match), the batch's per-channel mean and standard deviation are matched to
    0 and 1, which is what the owner's own normalisation (``spec``) makes of its data. With a
    ``student`` and ``adv_weight`` > 0 the images are also pushed to where student and teacher
    disagree (DeepInversion's adaptive competition term, maximising their Jensen-Shannon
    divergence), so that refreshed images carry what the student has not learnt yet.
    Returns the images (clamped to the valid input range) and the final prior loss.
    """
    bns = bn_nodes(teacher)
    targets = [(name, get_tensor(teacher, m).float(), get_tensor(teacher, v).float().clamp_min(0).sqrt()) for name, m, v in bns]
    logits_node = _logits_node(teacher)
    want = {f"in:{name}" for name, _, _ in bns} | {logits_node}
    lo, hi = input_bounds(spec, x.device)
    x = x.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    prior_value = math.nan
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        seen = record(teacher, x, want)
        prior = x.new_zeros(())
        if targets:
            for name, mean, std in targets:
                act = seen[f"in:{name}"]
                dims = [0] + list(range(2, act.dim()))
                prior = prior + (act.mean(dim=dims) - mean).pow(2).mean() + (act.var(dim=dims, unbiased=False).add(1e-8).sqrt() - std).pow(2).mean()
        else:
            prior = prior + x.mean(dim=(0, 2, 3)).pow(2).mean() + (x.std(dim=(0, 2, 3)) - 1).pow(2).mean()
        logits = seen[logits_node]
        loss = stats_weight * prior + tv_weight * _tv(x) + ce_weight * torch.nn.functional.cross_entropy(logits, labels)
        if student is not None and adv_weight > 0:
            loss = loss - adv_weight * _js(logits, student(x))
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            x.clamp_(lo, hi)
        prior_value = float(prior.detach())
    return x.detach(), prior_value


def balanced_labels(count: int, classes: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` class targets covering the classes as evenly as possible, in random order."""
    labels = torch.arange(count) % classes
    return labels[torch.randperm(count, generator=gen)]


def inversion_inputs(
    gm: fx.GraphModule, spec: InputSpec, count: int, seed: int, steps: int, device: str | torch.device = "cpu", progress: Progress = None
) -> tuple[torch.Tensor, list[float]]:
    """Synthetic inputs for any classifier, BatchNorm or not: class-balanced model inversion.

    The path a model without BatchNorm takes (``bn_matched_inputs`` has nothing to match there);
    see :func:`invert` for the prior. Deterministic for a seed.
    """
    batch_size = 128
    gen = torch.Generator().manual_seed(seed)
    lo, hi = input_bounds(spec, device)
    for params in gm.parameters():
        params.requires_grad_(False)
    logits_node = _logits_node(gm)
    with torch.no_grad():
        classes = int(record(gm, torch.zeros((1, *spec.shape), device=device), {logits_node})[logits_node].shape[1])
    labels = balanced_labels(count, classes, gen).to(device)
    out, losses = [], []
    batches = math.ceil(count / batch_size)
    for b in range(batches):
        n = min(batch_size, count - b * batch_size)
        x = torch.randn((n, *spec.shape), generator=gen).to(device)
        x = (x * 0.5 + (lo + hi) / 2).clamp(lo, hi)
        x, loss = invert(gm, spec, x, labels[b * batch_size : b * batch_size + n], steps=steps)
        out.append(x)
        losses.append(loss)
        if progress is not None:
            progress({"event": "synthetic", "batch": b, "batches": batches, "step": steps - 1, "steps": steps, "loss": f"{loss:.4f}"})
    return torch.cat(out), losses
