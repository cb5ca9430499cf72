"""Data-free pattern pruning: the entity's engine.

Pipeline: find the 3x3 convs of an exported program (``graph``), build a pattern library and
split the kernel budget exactly (``patterns``), make synthetic inputs (``synthetic``), choose each
layer's mask and weights with a recipe, then hand back weights, masks and a canonical-JSON-safe
report (``engine``). The recipes are listed in one table, ``recipes.RECIPES``: ``oneshot``
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
