"""Every register tile the emitter can choose, in one table (XNNPACK's ``f32-spmm-minmax.inc``).

A conv layer is rendered as a per-layer driver calling register-tile kernels: a pattern-sparse
3x3 tile covers ``rows`` output rows x ``vecs`` vectors of one filter; a dense tile covers
``rows`` output channels x ``vecs`` vectors of one row (of ``span`` rows where a row is narrower
than the tile's vectors, e.g. a 7x7 map); a column-shift tile (targets with ``shift_sets``) is
a pattern-sparse tile as wide as its row with one accumulator set per column shift of its taps
(``sets``). The blocking rules below pick the tile sizes from a target's budget (and a strided
pattern-sparse conv's input-channel block), and :func:`registry` lists every (op, rows, vecs,
masked, span, sets) those rules can produce for a target,
so the emitter, the tests (each instance against PyTorch through :func:`codegen.fixtures.kernel_probe`,
at stride 1 and 2) and the benchmark all read the same list. The emitter asks :func:`lookup` for
each tile it renders, which refuses anything the table does not list.

Names encode the parameters, XNNPACK style: ``sparse3x3_4x3m__neon`` is the pattern-sparse 3x3
tile of 4 rows x 3 vectors whose last vector is masked, for NEON; ``dense_8xy31m__avx512y`` the
dense tile of 8 channels x 3 rows of one masked vector each. In the C a tile's symbol adds
the layer and what is baked into it (``layer2_tile_sparse3x3_p8_4x3m__neon``: specialised for
that layer's 8 patterns, offsets and pitches).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

from .ir import CodegenError
from .targets import Target

SPARSE = "sparse3x3"
SHIFTED = "sparse3x3sh"  # pattern-sparse 3x3, one accumulator set per column shift of its taps
# accumulator sets of a 3x3 column-shift tile by conv stride: columns -1, 0, +1 of the bordered
# map; at stride 2 offsets 0 and +1 of the column-phase planes
SHIFT_SETS = {1: 3, 2: 2}
DENSE = "dense"
DENSE_MAX_CHANNELS = 8  # output channels per dense tile, whatever the accumulator budget


@dataclass(frozen=True, order=True)
class Kernel:
    """One register-tile instance."""

    op: str  # SPARSE | DENSE (the LayerReport kind of the layers using it)
    rows: int  # sparse: output rows per tile; dense: output channels per tile
    vecs: int  # vectors along the output row
    masked: bool  # the last vector's lanes past the row end are zeroed on store
    isa: str  # VectorIsa.name
    span: int = 1  # dense: output rows per tile (a map narrower than the tile's vectors)
    sets: int = 1  # SHIFTED: accumulator sets, one per column shift of the taps

    @property
    def blocking(self) -> str:
        rows = f"y{self.span}" if self.span > 1 else ""
        sets = f"s{self.sets}" if self.sets > 1 else ""
        return f"{self.rows}x{rows}{self.vecs}{'m' if self.masked else ''}{sets}"

    @property
    def name(self) -> str:
        return f"{self.op}_{self.blocking}__{self.isa}"

    def symbol(self, layer: str, detail: str) -> str:
        """The C function of this tile in ``layer``; ``detail`` names what the layer bakes in."""
        return f"{layer}_tile_{self.op}{detail}_{self.blocking}__{self.isa}"


def even_parts(total: int, most: int) -> int:
    """Size of the parts ``total`` rows (or input channels) are cut into, at most ``most``: as
    few parts as that allows, as even as they can be. A short last part pays a tile's fixed
    costs for little work (a band: the weight broadcasts, channel index and loop of every kernel,
    and input rows loaded for few outputs; a channel block: the accumulators loaded and stored):
    14 rows go as 7 + 7, not 12 + 2, and 128 channels as 4 x 32, not 3 x 42 + 2."""
    most = max(1, min(total, most))
    return -(-total // -(-total // most))


def sparse_blocking(target: Target, out_h: int, n_vec: int, lre: bool) -> tuple[int, int]:
    """(rows, vecs) of a pattern-sparse tile: as wide as ``max_u`` allows, then as many rows as
    the accumulators hold, in even bands; without load redundancy elimination one vector of one
    row."""
    if not lre:
        return 1, 1
    u = min(target.max_u, n_vec)
    return even_parts(out_h, target.accumulators // u), u


def shifted_blocking(target: Target, out_h: int, n_vec: int, sets: int) -> int | None:
    """Rows of a column-shift tile (``sets`` accumulator sets of a whole row's ``n_vec``
    vectors), or None where the target has no such tiles or fewer than two rows fit: one row
    would load every input row once per output row, as the plain tile does.

    A strided tile (``SHIFT_SETS[2]``) takes two thirds of the accumulators: each of its rows
    reads two fresh input rows of both phases, so its band's slab grows twice as fast with rows
    as a stride-1 tile's, and past that share the slab of a channel block falls out of L1 before
    the extra rows pay (a 28-wide map at 512 bits: 7 bands of 4 rows beat 6, 6, 6, 6, 4)."""
    budget = shifted_accumulators(target, sets)
    if not target.shift_sets or n_vec > target.max_u or sets * n_vec * 2 > budget:
        return None
    return even_parts(out_h, budget // (sets * n_vec))


def shifted_accumulators(target: Target, sets: int) -> int:
    """The accumulator budget of a column-shift tile of ``sets`` sets (see :func:`shifted_blocking`)."""
    return target.accumulators * 2 // 3 if sets == SHIFT_SETS[2] else target.accumulators


def dense_span(target: Target, n_vec: int, out_h: int) -> int:
    """Output rows per dense tile: one, unless a row has fewer vectors than a tile holds; then as
    many rows as fill its ``dense_u`` vectors (a broadcast weight fed to one vector of one row
    costs a load per FMA, as on a 7x7 or 14x14 map)."""
    return max(1, min(out_h, target.dense_u // max(1, n_vec)))


def dense_blocking(target: Target, cout: int, n_vec: int, out_h: int = 1) -> tuple[int, int, int]:
    """(output channels, vecs, rows) of a dense tile: each broadcast weight feeds ``vecs x rows``
    vectors and each loaded input vector ``channels`` accumulators."""
    u = min(target.dense_u, n_vec)
    span = dense_span(target, n_vec, out_h)
    return max(1, min(DENSE_MAX_CHANNELS, target.dense_acc // (u * span), cout)), u, span


# vector FMAs a pattern-sparse tile should do per (filter, input-channel block) at the least
BLOCK_MIN_FMAS = 512


def strided_channel_block(target: Target, cin: int, slab_bytes: int, kernel_density: float, fmas_per_kernel: float) -> int:
    """Input channels per block of a stride-2 (or more) pattern-sparse conv.

    A strided tile reuses each loaded input vector for at most two of its rows, so its loads come
    from the channel block's slab (``slab_bytes`` per channel and band), best from L1:
    ``l1_bytes // slab_bytes`` channels (``by_cache``). But every (filter, block) pair also pays a
    fixed price (accumulators loaded and stored, one loop per pattern whose trip count is data),
    which ``BLOCK_MIN_FMAS`` vector FMAs per filter amortise: ``by_work`` channels (at high
    compression a filter keeps few kernels per channel, so that grows). Where the cache bound is
    the larger, blocks take it. Where it is the smaller, each bound only costs in proportion
    (per-pair overhead as ``by_work / block``, slab misses as ``block / by_cache``), and their
    sum is least at the geometric mean, so blocks take that: at 6x, 64 channels of a 3.3 kB slab
    go in blocks of 16 (cache 9, work 29), not of 22. The layer's channels are then cut into as
    many blocks as that size needs, all of one size (a short last block costs nearly what a full
    one does).
    """
    by_cache = max(1, target.l1_bytes // max(1, slab_bytes))
    per_channel = kernel_density * fmas_per_kernel  # vector FMAs per filter and input channel
    if per_channel <= 0:
        return cin  # no kernel at all: one block
    by_work = math.ceil(BLOCK_MIN_FMAS / per_channel)
    size = by_cache if by_cache >= by_work else round(math.sqrt(by_cache * by_work))
    return even_parts(cin, size)


def row_tiles(n_vec: int, u: int, masked: bool) -> list[tuple[int, int, bool]]:
    """(first vector, vectors, masked) covering a row of ``n_vec`` vectors in tiles of ``u``."""
    out = []
    x = 0
    while x < n_vec:
        w = min(u, n_vec - x)
        out.append((x, w, masked and x + w == n_vec))
        x += w
    return out


def _tiles(target: Target, isa: str, max_u: int, dense_u: int) -> list[Kernel]:
    """Sparse tiles up to ``max_u`` and dense ones up to ``dense_u`` vectors wide, of ``isa``,
    within ``target``'s accumulator budgets."""
    out = [Kernel(SPARSE, r, v, m, isa) for v in range(1, max_u + 1) for r in range(1, max(1, target.accumulators // v) + 1) for m in (False, True)]
    if target.shift_sets:
        # a strided row's last output reads one element past it: only a row ending inside its
        # last vector (masked) loads that element, so 2-set tiles are all masked
        out += [
            Kernel(SHIFTED, r, v, m, isa, sets=sets)
            for sets in SHIFT_SETS.values()
            for v in range(1, min(max_u, shifted_accumulators(target, sets) // (2 * sets)) + 1)
            for r in range(1, shifted_accumulators(target, sets) // (sets * v) + 1)
            for m in ((False, True) if sets == SHIFT_SETS[1] else (True,))
        ]
    out += [
        Kernel(DENSE, n, v, m, isa, span)
        for v in range(1, dense_u + 1)
        for span in range(1, max(1, target.dense_u // v) + 1)
        for n in range(1, max(1, min(DENSE_MAX_CHANNELS, target.dense_acc // (v * span))) + 1)
        for m in (False, True)
    ]
    return out


@cache
def registry(target: Target) -> tuple[Kernel, ...]:
    """Every tile the blocking rules can give ``target``, sorted (op, rows, vecs, masked, isa).

    A tile never holds more accumulators than the budget: ``rows * vecs <= accumulators`` with
    ``vecs <= max_u`` (sparse; ``rows * vecs * sets <=`` :func:`shifted_accumulators` for a
    column-shift tile) and ``rows <= min(8, dense_acc // vecs)`` with ``vecs <= dense_u``
    (dense); remainder tiles (fewer rows, fewer vectors) stay inside the same bounds. A target
    whose vector flavour has a narrow one adds its one-vector tiles (the emitter uses it only for
    maps no wider than one narrow vector).
    """
    out = _tiles(target, target.isa.name, target.max_u, target.dense_u)
    if target.isa.narrow is not None:
        out += _tiles(target, target.isa.narrow.name, 1, 1)
    return tuple(sorted(out))


def lookup(target: Target, op: str, rows: int, vecs: int, masked: bool, isa: str | None = None, span: int = 1, sets: int = 1) -> Kernel:
    """The registered instance (of ``isa``, by default the target's own flavour); an
    unregistered one is a generator bug, refused here."""
    kernel = Kernel(op, rows, vecs, masked, isa or target.isa.name, span, sets)
    if kernel not in registry(target):
        raise CodegenError(f"tile {kernel.name} is not in the kernel registry of target {target.name}")
    return kernel
