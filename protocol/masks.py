"""Pruning masks: their bit-packed wire form (``pack_masks`` / ``unpack_masks``, in
``_wire.masks``) and what a received mask may say.

``check_pattern_masks`` is the receiving owner's check of what a mask may say (DESIGN "Pruning"):
masks only on pattern-prunable conv weights, and every 3x3 kernel either removed whole
(connectivity pruning) or keeping one pattern of the library (four entries, the centre among
them). A mask that keeps a fifth weight, drops the centre, or uses a pattern outside the library
describes a model the code generator cannot emit and the entity did not say it made.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass
from typing import Any

import torch

from ._wire.masks import MAGIC, MAX_HEADER, MAX_RANK, pack_masks, unpack_masks
from .errors import MaskError

__all__ = [
    "CENTRE",
    "DEFAULT_LIBRARY_SIZE",
    "KERNEL",
    "MAGIC",
    "MAX_HEADER",
    "MAX_LIBRARY",
    "MAX_RANK",
    "MaskStats",
    "PATTERN_ENTRIES",
    "check_pattern_masks",
    "pack_masks",
    "parse_library",
    "unpack_masks",
]

KERNEL = 9
CENTRE = 4
PATTERN_ENTRIES = 4
DEFAULT_LIBRARY_SIZE = 8  # DESIGN "Pruning": m = 8 unless the report states its library
MAX_LIBRARY = 56  # every 4-entry pattern that keeps the centre


@dataclass(frozen=True)
class MaskStats:
    """What a set of pattern masks keeps: the counts the achieved compression rate is made of."""

    total: int  # weights covered by masks
    kept: int  # weights the masks keep
    patterns: int  # distinct kernel patterns in use


def _is_pattern(row: tuple[int, ...]) -> bool:
    return len(row) == KERNEL and sum(row) == PATTERN_ENTRIES and row[CENTRE] == 1


def parse_library(value: Any) -> torch.Tensor:
    """The pattern library a report states (a list of 9-entry 0/1 lists) as a (P, 9) bool tensor."""
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_LIBRARY:
        raise MaskError(f"pattern library must be a list of 1..{MAX_LIBRARY} patterns")
    rows: list[tuple[int, ...]] = []
    for item in value:
        if not isinstance(item, list) or len(item) != KERNEL or any(type(v) is not int or v not in (0, 1) for v in item):
            raise MaskError("pattern library entries must be lists of nine 0/1 integers")
        row = tuple(item)
        if not _is_pattern(row):
            raise MaskError(f"pattern library entry {list(row)} does not keep exactly {PATTERN_ENTRIES} weights including the centre")
        if row in rows:
            raise MaskError(f"pattern library lists {list(row)} twice")
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool)


def check_pattern_masks(
    masks: Mapping[str, torch.Tensor], prunable: Set[str], library: torch.Tensor | None = None, library_size: int = DEFAULT_LIBRARY_SIZE
) -> MaskStats:
    """Refuse (``MaskError``) any mask that is not a pattern mask of a prunable conv weight.

    ``prunable`` holds the weights a mask may cover (see ``protocol.tensors.graph_roles``). Every
    kernel keeps nothing or exactly one pattern: one of ``library`` (P, 9) when the entity stated
    it, else any four entries including the centre, with at most ``library_size`` distinct
    patterns over all layers (the library is one set for the whole model).
    """
    if not masks:
        raise MaskError("the result holds no masks: nothing was pattern-pruned")
    allowed = None if library is None else {tuple(int(v) for v in row) for row in library.to(torch.int64).tolist()}
    seen: set[tuple[int, ...]] = set()
    total = kept = 0
    for name in sorted(masks):
        if name not in prunable:
            raise MaskError(f"mask {name!r} is not on a 3x3 convolution weight (groups=1): only those are pattern-pruned")
        mask = masks[name]
        if mask.dim() != 4 or tuple(mask.shape[2:]) != (3, 3):
            raise MaskError(f"mask {name!r} has shape {list(mask.shape)}, not that of a 3x3 convolution weight")
        rows = mask.reshape(-1, KERNEL).to(torch.int64)
        live = rows[rows.any(dim=1)]
        patterns = {tuple(row) for row in torch.unique(live, dim=0).tolist()} if live.numel() else set()
        for row in sorted(patterns):
            if not _is_pattern(row):
                raise MaskError(
                    f"mask {name!r} keeps kernel entries {list(row)}: not {PATTERN_ENTRIES} weights "
                    "including the centre (a library pattern) nor an all-zero kernel"
                )
            if allowed is not None and row not in allowed:
                raise MaskError(f"mask {name!r} uses pattern {list(row)}, which is not in the report's pattern library")
        seen |= patterns
        total += mask.numel()
        kept += int(live.sum())
    if allowed is None and len(seen) > library_size:
        raise MaskError(f"masks use {len(seen)} distinct patterns, more than a library of {library_size}")
    return MaskStats(total=total, kept=kept, patterns=len(seen))
