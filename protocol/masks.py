"""Pruning masks: their bit-packed wire form (``pack_masks`` / ``unpack_masks``, in
``_wire.masks``) and what a received mask may say.

``check_result_masks`` is the receiving owner's check of what a mask may say (DESIGN "Pruning"),
by the role the owner's own graph gives each weight (``tensors.graph_roles``):

- a group-1 3x3 conv weight: every kernel removed whole (connectivity pruning) or keeping one
  pattern of the library (four entries, the centre among them) — ``check_pattern_masks``;
- a depthwise 3x3 weight (C, 1, 3, 3): every channel's kernel keeps one library pattern, none is
  removed (a removed kernel is a dead channel the entity never makes);
- a 1x1 conv or linear weight: whole input columns kept or removed, nothing else, at least one kept;
- any other weight: no mask at all.

A mask that keeps a fifth weight, drops the centre, uses a pattern outside the library or cuts a
column in part describes a model the code generator cannot emit and the entity did not say it made.
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
    "MaskSummary",
    "check_pattern_masks",
    "check_result_masks",
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


@dataclass(frozen=True)
class MaskSummary:
    """What the masks of a result keep, per role and per weight: the counts every claimed rate is made of."""

    conv: MaskStats  # group-1 3x3 pattern masks: the conv rate
    depthwise: MaskStats
    structured: MaskStats
    layers: Mapping[str, tuple[int, int]]  # weight -> (weights, kept)

    @property
    def removed(self) -> int:
        """Weights the masks remove, over every role."""
        return sum(total - kept for total, kept in self.layers.values())


def _live_patterns(name: str, mask: torch.Tensor, allowed: Set[tuple[int, ...]] | None, *, whole_kernels: bool) -> tuple[set[tuple[int, ...]], int]:
    """The distinct kept patterns of a 3x3 mask (each checked) and its kept count; all-zero kernels only if ``whole_kernels``."""
    rows = mask.reshape(-1, KERNEL).to(torch.int64)
    live_rows = rows.any(dim=1)
    if not whole_kernels and not bool(live_rows.all()):
        raise MaskError(f"mask {name!r} removes a whole depthwise kernel (a dead channel): each channel must keep one library pattern")
    live = rows[live_rows]
    patterns = {tuple(row) for row in torch.unique(live, dim=0).tolist()} if live.numel() else set()
    for row in sorted(patterns):
        if not _is_pattern(row):
            raise MaskError(
                f"mask {name!r} keeps kernel entries {list(row)}: not {PATTERN_ENTRIES} weights "
                "including the centre (a library pattern)" + (" nor an all-zero kernel" if whole_kernels else "")
            )
        if allowed is not None and row not in allowed:
            raise MaskError(f"mask {name!r} uses pattern {list(row)}, which is not in the report's pattern library")
    return patterns, int(live.sum())


def check_structured_mask(name: str, mask: torch.Tensor) -> int:
    """The kept count of a 1x1 conv or linear mask if it keeps whole input columns (at least one); else ``MaskError``."""
    if mask.dim() not in (2, 4) or (mask.dim() == 4 and tuple(mask.shape[2:]) != (1, 1)):
        raise MaskError(f"mask {name!r} has shape {list(mask.shape)}, not that of a 1x1 convolution or linear weight")
    flat = mask.reshape(mask.shape[0], mask.shape[1]).to(torch.bool)
    columns = flat.any(dim=0)
    if not torch.equal(flat, columns[None, :].expand_as(flat)):
        bad = int((flat.any(dim=0) & ~flat.all(dim=0)).nonzero()[0])
        raise MaskError(f"mask {name!r} cuts input column {bad} in part: a 1x1 or linear mask keeps or removes whole input columns")
    if not bool(columns.any()):
        raise MaskError(f"mask {name!r} keeps no input column at all")
    return int(columns.sum()) * mask.shape[0]


def check_result_masks(
    masks: Mapping[str, torch.Tensor],
    *,
    pattern: Set[str],
    depthwise: Set[str] = frozenset(),
    structured: Set[str] = frozenset(),
    library: torch.Tensor | None = None,
    library_size: int = DEFAULT_LIBRARY_SIZE,
) -> MaskSummary:
    """Refuse (``MaskError``) any mask that is not exactly what the engine makes for its weight's role.

    ``pattern``, ``depthwise`` and ``structured`` are the weights of each role (from the owner's
    graph). Pattern and depthwise masks share one library: ``library`` (P, 9) when the entity
    stated it, else at most ``library_size`` distinct 4-entry patterns over both.
    """
    if not masks:
        raise MaskError("the result holds no masks: nothing was pruned")
    allowed = None if library is None else {tuple(int(v) for v in row) for row in library.to(torch.int64).tolist()}
    seen: set[tuple[int, ...]] = set()
    counts = {"3x3": [0, 0, 0], "depthwise": [0, 0, 0], "structured": [0, 0, 0]}  # total, kept, patterns
    layers: dict[str, tuple[int, int]] = {}
    for name in sorted(masks):
        mask = masks[name]
        if name in pattern or name in depthwise:
            role = "3x3" if name in pattern else "depthwise"
            if mask.dim() != 4 or tuple(mask.shape[2:]) != (3, 3) or (role == "depthwise" and mask.shape[1] != 1):
                what = "a 3x3 convolution weight" if role == "3x3" else "a depthwise 3x3 convolution weight (C, 1, 3, 3)"
                raise MaskError(f"mask {name!r} has shape {list(mask.shape)}, not that of {what}")
            patterns, kept = _live_patterns(name, mask, allowed, whole_kernels=role == "3x3")
            seen |= patterns
        elif name in structured:
            role, kept = "structured", check_structured_mask(name, mask)
        else:
            raise MaskError(
                f"mask {name!r} is not on a prunable weight: only 3x3 convolution (groups=1), depthwise 3x3, "
                "1x1 convolution and linear weights are masked"
            )
        counts[role][0] += mask.numel()
        counts[role][1] += kept
        layers[name] = (mask.numel(), kept)
    if allowed is None and len(seen) > library_size:
        raise MaskError(f"masks use {len(seen)} distinct patterns, more than a library of {library_size}")

    def stats(role: str) -> MaskStats:
        return MaskStats(total=counts[role][0], kept=counts[role][1], patterns=len(seen) if role != "structured" else 0)

    return MaskSummary(conv=stats("3x3"), depthwise=stats("depthwise"), structured=stats("structured"), layers=layers)


def check_pattern_masks(
    masks: Mapping[str, torch.Tensor], prunable: Set[str], library: torch.Tensor | None = None, library_size: int = DEFAULT_LIBRARY_SIZE
) -> MaskStats:
    """``check_result_masks`` for a result holding group-1 3x3 pattern masks only: their counts."""
    return check_result_masks(masks, pattern=prunable, library=library, library_size=library_size).conv
