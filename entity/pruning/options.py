"""Recipe options: each recipe's own settings, a frozen dataclass whose field defaults are its defaults.

As torch.ao.pruning's sparsifiers own their ``defaults`` and merge a config over them, each
recipe (``recipes.RECIPES``) names a ``RecipeSettings`` subclass: the options a caller passes
(``PruneConfig.options``, the operator's ``recipe_options``) are merged over its defaults by
:meth:`RecipeSettings.merged`, which refuses an option the recipe does not have (naming the ones
it has) or a value of the wrong type. Settings every recipe shares (rate, skips, synthetic data,
seed, device) stay on ``PruneConfig``.

``PruneError`` lives here, not in ``engine``, because the recipes' settings raise it and the
engine imports the recipes.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from entity._typed import Scalar, check_value

# What an option's value may be: it crosses into the pruning process as JSON.
OptionValue = Scalar


class PruneError(ValueError):
    """The request cannot be carried out (bad rate, nothing to prune, unsupported graph, bad option)."""


@dataclass(frozen=True)
class RecipeSettings:
    """Base of every recipe's settings; a recipe without options uses it as is."""

    @classmethod
    def option_names(cls) -> list[str]:
        """The options this recipe takes, in declaration order."""
        return [f.name for f in fields(cls)]

    @classmethod
    def merged(cls, recipe: str, options: Mapping[str, Any]) -> RecipeSettings:
        """The recipe's defaults with ``options`` over them; one-line ``PruneError`` on a bad option.

        Unknown names are refused rather than ignored: a misspelt option would otherwise run the
        recipe with its default and nobody would notice.
        """
        known = cls.option_names()
        unknown = sorted(set(options) - set(known))
        if unknown:
            has = f"its options are {', '.join(known)}" if known else "it takes none"
            raise PruneError(f"recipe {recipe!r} has no option {', '.join(map(repr, unknown))}; {has}")
        hints = typing.get_type_hints(cls)
        try:
            values = {name: check_value(f"recipe {recipe!r} option {name!r}", value, hints[name]) for name, value in options.items()}
        except TypeError as exc:
            raise PruneError(str(exc)) from None
        return cls(**values)

    def to_json(self) -> dict[str, OptionValue]:
        """Plain values, as ``merged`` takes them back (no references, like torch.ao's ``state_dict``)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}
