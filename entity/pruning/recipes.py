"""Every pruning recipe, in one table: name -> how it runs, its settings, its synthetic data, what it is.

The table is explicit (no registration by import side effect), so the recipes an entity offers
are the ones listed here and nowhere else. A recipe is a module with a run function
(``Job -> None``: choose every layer's mask and weights) and, if it has options, a
``RecipeSettings`` subclass whose defaults are its defaults. Adding one is that module plus one
line below. The names are part of the protocol: the offer lists them and the job report names
the one that ran.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .admm import AdmmSettings, run_admm
from .distill import DistillSettings, run_distill
from .oneshot import run_oneshot
from .options import PruneError, RecipeSettings
from .refit import RefitSettings, run_refit
from .slr import SlrSettings, run_slr

if TYPE_CHECKING:
    from .engine import Job


@dataclass(frozen=True)
class Recipe:
    """One recipe: its run function, its settings class, the synthetic data it wants, a description."""

    run: Callable[[Job], None]
    settings: type[RecipeSettings]
    # "uniform" (the paper's noise) or "bn" (BatchNorm-matched images, class inversion for a model
    # without BatchNorm); PruneConfig.synthetic overrides
    synthetic: str
    description: str  # goes into the job report
    # How the layers beyond the recipe's 3x3 convs (depthwise, 1x1, linear; ``extra_layers``) are
    # chosen: "magnitude" (no data, as the recipe itself) or "refit" (OBS-style choice and
    # least-squares refit on the recipe's synthetic inputs).
    extra: str = "refit"


RECIPES: dict[str, Recipe] = {
    "oneshot": Recipe(run_oneshot, RecipeSettings, "uniform", "magnitude projection onto patterns + connectivity (no data)", extra="magnitude"),
    "admm": Recipe(
        run_admm, AdmmSettings, "uniform", "the paper: layer-wise ADMM (Adam W-step, magnitude projection, rho 1e-4 x10 to 1e-1) on uniform noise"
    ),
    "slr": Recipe(run_slr, SlrSettings, "uniform", "surrogate Lagrangian relaxation (layer-wise, same inputs and projection as admm)"),
    "refit": Recipe(
        run_refit, RefitSettings, "bn", "BN-matched synthetic images, OBS-style pattern/kernel choice, least-squares refit, weight-norm rescale"
    ),
    "distill": Recipe(
        run_distill,
        DistillSettings,
        "bn",
        "refit, then masked end-to-end distillation from the dense model (tempered KL + per-layer feature match) on its synthetic images",
    ),
}

# The measured winner on benchmarks/results/paper_table.md: BN-matched synthetic images, OBS-style
# choice, least-squares refit, weight-norm rescale, per-layer rates by sensitivity.
DEFAULT_RECIPE = "refit"


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``; an unknown name is a one-line ``PruneError`` listing the known ones."""
    try:
        return RECIPES[name]
    except (KeyError, TypeError):
        raise PruneError(f"unknown recipe {name!r}; choose one of {', '.join(sorted(RECIPES))}") from None


def recipe_settings(name: str, options: Mapping[str, Any]) -> RecipeSettings:
    """Recipe ``name``'s settings with ``options`` merged over its defaults (refusing unknown options)."""
    return get_recipe(name).settings.merged(name, options)
