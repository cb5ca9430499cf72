"""The baseline recipe: magnitude projection onto the pattern library plus connectivity, no data.

Each kernel takes the library pattern that keeps most of its energy; each layer then keeps its
largest patterned kernels. It needs no synthetic inputs, so it is also the fastest recipe and
the one the protocol tests run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import patterns as pat

if TYPE_CHECKING:
    from .engine import Job


def run_oneshot(job: Job) -> None:
    """Most-energy pattern per kernel, then the largest patterned kernels, layer by layer."""
    for i, layer in enumerate(job.layers):
        weight = job.dense_weight(layer)
        job.apply(layer, pat.project(weight, job.library, job.keep[layer.key]))
        job.progress(
            {"event": "layer", "layer": layer.key, "index": i, "total": len(job.layers), "kept": job.keep[layer.key], "kernels": layer.kernels}
        )
