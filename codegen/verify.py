"""Build a generated library and compare it with PyTorch on random inputs.

Used by the CLI's ``--verify``, the tests and the benchmark: the reference is always the exported
program itself (``program.module()``), so BatchNorm folding, fusion and layout are all checked.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import build
from .emit import Generated, Options, generate
from .ir import lower
from .targets import Target


def export(model: nn.Module, shape: tuple[int, ...]) -> torch.export.ExportedProgram:
    """Export in eval mode with a dynamic batch dimension, as the owner does."""
    example = torch.randn(2, *shape)
    batch = torch.export.Dim("batch", min=1, max=1024)
    return torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},))


def relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got - ref| / max |ref|: the tolerance the issue sets (1e-4) is on this."""
    return float(np.abs(got - ref).max() / max(1e-12, float(np.abs(ref).max())))


@dataclass(frozen=True)
class Verification:
    error: float
    generated: Generated
    out_dir: Path


def verify(
    program: torch.export.ExportedProgram,
    masks: Mapping[str, torch.Tensor] | None,
    target: Target,
    out_dir: Path,
    *,
    options: Options = Options(),
    n: int = 3,
    seed: int = 0,
) -> Verification:
    """Generate, build and run ``n`` random inputs through the harness; compare with PyTorch."""
    gen = generate(lower(program, masks), target, options)
    build.write_files(gen.files, out_dir)
    build.compile_dir(out_dir, target)
    x = torch.randn(n, *gen.in_shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = program.module()(x).numpy()
    got, _ = build.run_harness(out_dir, target, x.numpy(), gen.out_shape)
    return Verification(relative_error(got, ref.reshape(got.shape)), gen, out_dir)
