"""Kernel patterns, filter kernel reorder and compact weight storage for pattern-sparse 3x3 convs.

A kernel's pattern is the set of taps its mask keeps (any number, any shape: the generator does not
assume the paper's library of 8; any kernel size, so 5x5 depthwise kernels have patterns too).
Each layer's distinct patterns get ids by frequency; beyond ``max_patterns`` the rare ones are
widened to the full kernel (their extra weights are zero), which keeps the emitted code bounded
while staying exact.

Filter kernel reorder: filters are sorted by kernel count and pattern mix, and each filter's
kernels are grouped by pattern, so the inner loops run one pattern at a time without branches.
Compact storage: per kernel the input-channel index (uint16) and only the kept weights; the
pattern ids are implicit in the per-filter, per-pattern counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FULL_PATTERN = tuple(range(9))


@dataclass(frozen=True)
class PatternSet:
    """Distinct tap sets of a layer and each kernel's id in it (-1: kernel removed)."""

    patterns: tuple[tuple[int, ...], ...]
    ids: np.ndarray  # (Cout, Cin) int32

    def count(self) -> np.ndarray:
        return np.bincount(self.ids[self.ids >= 0], minlength=len(self.patterns))


def kernel_patterns(mask: np.ndarray, max_patterns: int = 32) -> PatternSet:
    """Patterns of a (Cout, Cin, kh, kw) boolean mask (kh * kw <= 62), most frequent first."""
    cout, cin = mask.shape[:2]
    n_taps = int(np.prod(mask.shape[2:]))
    flat = mask.reshape(cout * cin, n_taps)
    codes = (flat.astype(np.int64) << np.arange(n_taps)).sum(axis=1)
    present = codes[codes != 0]
    uniq, counts = np.unique(present, return_counts=True)
    order = sorted(zip(-counts, uniq, strict=True))
    kept = [int(c) for _, c in order]
    full_code = (1 << n_taps) - 1
    if len(kept) > max_patterns:
        kept = kept[: max_patterns - 1]
        if full_code not in kept:
            kept.append(full_code)
    index = {c: i for i, c in enumerate(kept)}
    full_id = index.get(full_code, -1)
    ids = np.array([-1 if c == 0 else index.get(int(c), full_id) for c in codes], dtype=np.int32)
    patterns = tuple(tuple(t for t in range(n_taps) if (c >> t) & 1) for c in kept)
    return PatternSet(patterns, ids.reshape(cout, cin))


@dataclass(frozen=True)
class SparseWeights:
    """Arrays the emitted pattern-sparse kernel walks, in traversal order (block, filter, pattern).

    ``counts[b, f, p]`` kernels of pattern p in filter f and input-channel block b (reordered form);
    ``nk[b, f]`` kernels per block and filter and ``kpat`` per-kernel pattern ids (natural order).
    ``weights`` holds only kept taps (compact) or is the dense (Cout, Cin, 9) tensor.
    """

    perm: np.ndarray  # (Cout,) original output channel of each filter slot
    counts: np.ndarray  # (NB, Cout, NP) uint16 (reordered) or (NB, Cout) (natural)
    kci: np.ndarray  # (K,) uint16 input-channel index per kernel
    kpat: np.ndarray  # (K,) uint8 pattern id per kernel (natural order only)
    weights: np.ndarray  # float32
    blocks: tuple[int, ...]  # input-channel block starts
    reorder: bool
    compact: bool


# the filter order is sorted within this many chunks of output channels: threads take contiguous
# runs of filters, and a run then writes a contiguous range of output planes (sorted across the
# whole layer, the two cores' planes would interleave)
FILTER_CHUNKS = 8


def _filter_order(ps: PatternSet) -> np.ndarray:
    """Within each chunk of output channels, filters with more kernels first, ties broken by
    their pattern histogram (similar together): runs of filters alike in their control flow."""
    n_pat = len(ps.patterns)
    hist = np.stack([np.bincount(row[row >= 0], minlength=n_pat) for row in ps.ids]) if n_pat else np.zeros((ps.ids.shape[0], 0), dtype=np.int64)
    keys = [(-int(h.sum()), tuple(-h)) for h in hist]
    chunk = max(1, -(-len(keys) // FILTER_CHUNKS))
    order = [i for s in range(0, len(keys), chunk) for i in sorted(range(s, min(s + chunk, len(keys))), key=lambda i: (keys[i], i))]
    return np.array(order, dtype=np.int32)


def pack(weight: np.ndarray, ps: PatternSet, ci_block: int, *, reorder: bool, compact: bool, depthwise: bool = False) -> SparseWeights:
    """Lay out a (Cout, Cin, kh, kw) weight for the emitted kernel; ``depthwise``: a (C, 1, kh, kw)
    weight whose filter o reads input channel o (the stored channel index is then o)."""
    cout, cin = weight.shape[:2]
    w9 = weight.reshape(cout, cin, -1).astype(np.float32)
    blocks = tuple(range(0, cin, ci_block))
    perm = _filter_order(ps) if reorder else np.arange(cout, dtype=np.int32)
    n_pat = len(ps.patterns)
    counts = np.zeros((len(blocks), cout, n_pat) if reorder else (len(blocks), cout), dtype=np.uint16)
    kci: list[int] = []
    kpat: list[int] = []
    vals: list[np.ndarray] = []
    for b, start in enumerate(blocks):
        stop = min(cin, start + ci_block)
        for f, o in enumerate(perm):
            ids = ps.ids[o, start:stop]
            chans = np.nonzero(ids >= 0)[0] + start
            if reorder:
                chans = np.asarray(sorted(chans, key=lambda c: (ps.ids[o, c], c)), dtype=chans.dtype)
                for c in chans:
                    counts[b, f, ps.ids[o, c]] += 1
            else:
                counts[b, f] = len(chans)
            for c in chans:
                p = int(ps.ids[o, c])
                kci.append(int(o) if depthwise else int(c))
                kpat.append(p)
                if compact:
                    vals.append(w9[o, c, list(ps.patterns[p])])
    weights = np.concatenate(vals).astype(np.float32) if compact and vals else (np.zeros(0, np.float32) if compact else w9.reshape(-1))
    if max(cin, cout if depthwise else 0) > 65535:
        raise ValueError("more than 65535 input channels")
    return SparseWeights(perm, counts, np.array(kci, dtype=np.uint16), np.array(kpat, dtype=np.uint8), weights, blocks, reorder, compact)


@dataclass(frozen=True)
class StorageReport:
    """Bytes of one layer's weights in three formats (biases excluded: the same in all)."""

    dense: int
    csr: int
    compact: int
    kernels: int
    nonzeros: int


def storage_sizes(weight_mask: np.ndarray, ps: PatternSet) -> StorageReport:
    """Dense fp32, CSR (fp32 values, int32 column indices, int32 row pointers) and our compact form.

    Compact: per kernel a uint16 input-channel index and its kept fp32 weights, per filter a
    uint16 count per pattern, per filter an int32 slot, and the pattern table (9 bits each, as 2
    bytes).
    """
    cout, cin = weight_mask.shape[:2]
    kernels = int((ps.ids >= 0).sum())
    taps = sum(len(ps.patterns[p]) * int(n) for p, n in enumerate(ps.count()))
    nnz = int(weight_mask.sum())
    dense = int(weight_mask.size) * 4
    csr = nnz * 8 + (cout + 1) * 4
    compact = kernels * 2 + taps * 4 + cout * len(ps.patterns) * 2 + cout * 4 + len(ps.patterns) * 2
    return StorageReport(dense, csr, compact, kernels, nnz)
