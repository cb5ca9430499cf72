"""Data-free pattern pruning: the entity's engine.

Pipeline: find the 3x3 convs of an exported program (``graph``), build a pattern library and
split the kernel budget exactly (``patterns``), make synthetic inputs (``synthetic``), choose each
layer's mask and weights with a recipe, then hand back weights, masks and a canonical-JSON-safe
report (``engine``). Recipes: ``oneshot`` (magnitude projection), ``admm`` (the paper's layer-wise
ADMM on uniform noise), ``slr`` (surrogate Lagrangian relaxation), ``refit`` (BN-matched synthetic
images, OBS-style choice, least-squares refit, weight-norm rescale).
"""
from . import admm as _admm  # noqa: F401  (each solver module registers its recipe)
from . import refit as _refit  # noqa: F401
from . import slr as _slr  # noqa: F401
from .engine import RECIPES, PruneConfig, PruneError, PruneResult, prune

__all__ = ["RECIPES", "PruneConfig", "PruneError", "PruneResult", "prune"]
