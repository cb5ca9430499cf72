"""Data-free pattern pruning: the entity's engine.

Pipeline: find the 3x3 convs of an exported program (``graph``), build a pattern library and
split the kernel budget exactly (``patterns``), make synthetic inputs (``synthetic``), choose each
layer's mask and weights with a recipe (one-shot projection, the paper's ADMM, SLR, or the
least-squares refit), then hand back weights, masks and a canonical-JSON-safe report (``engine``).
"""
from .engine import RECIPES, PruneConfig, PruneError, PruneResult, prune

__all__ = ["RECIPES", "PruneConfig", "PruneError", "PruneResult", "prune"]
