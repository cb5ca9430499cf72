"""Data-free pattern pruning: the entity's engine.

Pipeline: find the prunable layers of an exported program (``graph``: group-1 3x3 convs,
depthwise 3x3 convs, and for a whole-model rate 1x1 convs and linear layers), build a pattern
library and split the kernel and column budgets exactly (``patterns``, ``structured``), make
synthetic inputs (``synthetic``), choose each 3x3 conv's mask and weights with a recipe and the
other layers' with ``extra_layers`` (``depthwise``: one pattern per channel; ``structured``: whole
input columns), then hand back weights, masks and a canonical-JSON-safe report (``engine``).
The recipes are listed in one table, ``recipes.RECIPES``: ``oneshot``
(magnitude projection), ``admm`` (the paper's layer-wise ADMM on uniform noise), ``slr``
(surrogate Lagrangian relaxation), ``refit`` (BN-matched synthetic images, OBS-style choice,
least-squares refit, weight-norm rescale), ``distill`` (refit, then masked end-to-end
distillation from the dense model on synthetic images). Each owns its settings (``options.RecipeSettings``
subclasses), which ``PruneConfig.options`` overrides.
"""

from .engine import PruneConfig, PruneResult, prune
from .options import PruneError, RecipeSettings
from .recipes import DEFAULT_RECIPE, RECIPES, Recipe, recipe_settings

__all__ = ["DEFAULT_RECIPE", "RECIPES", "PruneConfig", "PruneError", "PruneResult", "Recipe", "RecipeSettings", "prune", "recipe_settings"]
