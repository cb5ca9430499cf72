"""Final model -> pattern-sparse C for aarch64 NEON and the host.

Pipeline: :func:`ir.lower` turns the owner's exported program (ATen graph) and pruning masks into
fused layers (BatchNorm folded into convs; ReLU, ReLU6/hardtanh, hardswish, hardsigmoid, sigmoid
and SiLU and residual adds fused; depthwise convs, squeeze-excitation products); :mod:`patterns`
finds each 3x3 or depthwise layer's kernel patterns, reorders filters and packs compact weights; :mod:`emit` renders C for a
:mod:`targets` entry (vector width and intrinsic spellings are data there), taking its register
tiles from the one table in :mod:`kernels` and its fixed text from ``templates/*.in`` (including
a small pthread pool: each layer splits its output channels over the threads, so results are
bit-identical for any thread count); :mod:`build` writes, compiles and runs it.
``python -m codegen MODEL --target aarch64-neon|host --out DIR`` is the command-line front end.

Adding a target: a :class:`~codegen.targets.Target` entry in ``targets.py`` (toolchain, register
budget) with a :class:`~codegen.targets.VectorIsa` (width, name; spellings and a prelude template in
``templates/`` only for a vector flavour other than GCC vector extensions). Its kernel registry and
kernel names follow from that data; its tests run the registry through ``check_registered_tiles``
(tests/test_codegen_host.py), as the aarch64 tests do.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .emit import Generated, LayerReport, Options, generate
from .ir import CodegenError, Graph, UnsupportedOpError, lower
from .targets import AARCH64_NEON, HOST, HOST_AVX2, HOST_AVX512, TARGETS, Target

__all__ = [
    "AARCH64_NEON",
    "HOST",
    "HOST_AVX2",
    "HOST_AVX512",
    "TARGETS",
    "CodegenError",
    "Generated",
    "Graph",
    "LayerReport",
    "Options",
    "Target",
    "UnsupportedOpError",
    "compile_program",
    "generate",
    "lower",
]


def compile_program(
    program: torch.export.ExportedProgram, masks: Mapping[str, torch.Tensor] | None, target: Target = HOST, options: Options = Options()
) -> Generated:
    """Exported program + masks (state_dict key -> bool tensor) -> generated library files."""
    return generate(lower(program, masks), target, options)
