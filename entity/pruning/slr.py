"""Surrogate Lagrangian relaxation (SLR; Gurevin et al. 2020, Zhou et al. 2021) as a second solver.

Same splitting as ADMM (W free, Z in the pattern + connectivity set) with the Lagrangian
``L(W, Z, L) = f(W) + <L, W - Z> + rho/2 ||W - Z||^2``, but the multiplier moves only when the
step just taken decreased L (the surrogate optimality condition), and by a step size that shrinks
by ``alpha_k = 1 - 1 / (M k^(1 - 1/k^r))`` times the ratio of successive constraint violations.
That is what makes SLR converge where ADMM's fixed steps oscillate at high compression.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .admm import AdmmSettings, LayerProblem, RhoSchedule, _optimiser, run_layer_solver

if TYPE_CHECKING:
    from .engine import Job


@dataclass(frozen=True)
class SlrSettings(AdmmSettings):
    """SLR's options: ADMM's (iterations, learning rate, rho schedule) plus the step-size factor's M and r."""

    slr_m: float = 300.0
    slr_r: float = 0.1


def alpha(k: int, m: float, r: float) -> float:
    """SLR's step-size factor alpha_k = 1 - 1/(M k^(1 - 1/k^r)), k >= 1."""
    return 1.0 - 1.0 / (m * k ** (1.0 - 1.0 / k**r))


def slr_layer(
    problem: LayerProblem,
    weight: torch.Tensor,
    *,
    rho: RhoSchedule,
    iters: int,
    lr: float,
    batch_size: int,
    update_every: int,
    optimiser: str,
    m: float,
    r: float,
    gen: torch.Generator,
) -> torch.Tensor:
    """SLR for one layer; returns the hard-pruned weight."""
    w = weight.detach().clone().requires_grad_(True)
    z = problem.project(w)
    lam = torch.zeros_like(w)
    opt = _optimiser(optimiser, [w], lr)
    n = problem.inputs.shape[0]
    probe = torch.arange(min(n, 128), device=w.device)  # fixed subset for the surrogate condition
    step: float | None = None
    prev_violation: float | None = None
    k = 0

    def lagrangian(wt: torch.Tensor, zt: torch.Tensor, rho_now: float) -> float:
        with torch.no_grad():
            return float(problem.loss(wt, probe) + (lam * (wt - zt)).sum() + rho_now / 2 * (wt - zt).pow(2).sum())

    for rho_now in rho:
        if step is None:
            step = rho_now
        block_start = lagrangian(w.detach(), z, rho_now)
        for it in range(iters):
            idx = torch.randint(0, n, (min(batch_size, n),), generator=gen).to(w.device)
            opt.zero_grad(set_to_none=True)
            loss = problem.loss(w, idx) + (lam * (w - z)).sum() + rho_now / 2 * (w - z).pow(2).sum()
            loss.backward()
            opt.step()
            if (it + 1) % update_every:
                continue
            with torch.no_grad():
                wd = w.detach()
                # W-step surrogate condition: move the multiplier only if the W-steps lowered L.
                if lagrangian(wd, z, rho_now) < block_start:
                    violation = float((wd - z).norm())
                    if prev_violation is not None and violation > 0:
                        k += 1
                        step = alpha(k, m, r) * step * prev_violation / violation
                    lam = lam + step * (wd - z)
                    prev_violation = max(violation, 1e-12)
                # Z-step, and its surrogate condition.
                before = lagrangian(wd, z, rho_now)
                z_new = problem.project(wd + lam / rho_now)
                if lagrangian(wd, z_new, rho_now) < before:
                    z = z_new
                    violation = float((wd - z).norm())
                    if prev_violation is not None and violation > 0:
                        k += 1
                        step = alpha(k, m, r) * step * prev_violation / violation
                    lam = lam + step * (wd - z)
                    prev_violation = max(violation, 1e-12)
                if not math.isfinite(step):
                    step = rho_now
                block_start = lagrangian(wd, z, rho_now)
    return problem.project(w)


def run_slr(job: Job) -> None:
    """The recipe: layer by layer in topological order, SLR then hard prune."""
    opts = job.recipe_settings(SlrSettings)
    batch_size = job.config.batch_size
    run_layer_solver(
        job,
        lambda problem, dense_w, schedule, gen: slr_layer(
            problem,
            dense_w,
            rho=schedule,
            iters=opts.admm_iters,
            lr=opts.admm_lr,
            batch_size=batch_size,
            update_every=opts.admm_update_every,
            optimiser=opts.admm_optimiser,
            m=opts.slr_m,
            r=opts.slr_r,
            gen=gen,
        ),
        opts.rho,
    )
