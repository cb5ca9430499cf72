"""Layer IR -> a self-contained C library: header, source, compact weight blob, harness, Makefile.

One linear pass over the layers renders each one (a dict from layer type to method, like
tinygrad's renderer); the fixed text (runtime, harness, header, Makefile, the vector prelude) lives
in ``templates/*.in``. Everything a target changes is data: vector width and the C spelling of
every vector operation in :class:`~codegen.targets.VectorIsa`, register budget and blocking in
:class:`~codegen.targets.Target`; the register tiles a conv may use, and their names, come from
the one table in :mod:`codegen.kernels`.

Memory layout, kept between layers: each feature map is stored as zero-bordered channel planes
whose row pitch is a multiple of the vector width. The border (as wide as the largest padding of
a stride-1 conv reading the map) makes every tap of a padded conv a compile-time offset, and the
zeros shared by the end of one row and the start of the next serve as both its right and the next
row's left border. Stride-s convs first split their input into s column phases, after which a
tap is again one constant offset. Vector lanes past a row's end are computed and masked to zero
on store, so the borders stay zero without any per-layer clean-up.

Pattern-sparse 3x3 conv (the paper's three optimisations, each with an :class:`Options` switch):
- reorder: filters sorted by kernel count and pattern mix, kernels grouped by pattern, one
  branch-free loop per pattern with hard-coded offsets (off: one loop, a ``switch`` per kernel);
- compact: per kernel a uint16 input channel and only its kept weights (off: the dense 3x3 weights
  are read through the kernel's pattern);
- lre: register blocking over R output rows x U vectors, and every distinct input vector of a tile
  is loaded once and feeds all the accumulators that need it (off: 1x1 tiles, a load per tap).
Input channels are processed in blocks sized to keep the band's input slab in L1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from . import kernels as kr
from . import patterns as pat
from .ir import AdaptiveAvgPool, Add, CodegenError, Conv, Flatten, Graph, Layer, Linear, Pool, Relu, layer_inputs
from .targets import Target, VectorIsa
from .templates import render as render_template

WEIGHT_MAGIC = b"BPWEIGHT"
HEADER_BYTES = 64
ALIGN = 64


@dataclass(frozen=True)
class Options:
    """Code generation switches; the defaults are the fast configuration."""

    reorder: bool = True  # filter kernel reorder (branch-free per-pattern loops)
    compact: bool = True  # compressed weight storage
    lre: bool = True  # load redundancy elimination (register blocking + shared loads)
    max_patterns: int = 32  # distinct patterns per layer before rare ones widen to 3x3
    sparse_density: float = 0.75  # 3x3 convs keeping at most this fraction of weights go sparse


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


@dataclass(frozen=True)
class FMap:
    """Zero-bordered planes: element (c, y, x) lives at ``origin + c*plane + y*pitch + x``."""

    c: int
    h: int
    w: int
    by: int
    bx: int
    pitch: int
    vec: int

    @property
    def plane(self) -> int:
        return (self.h + 2 * self.by) * self.pitch

    @property
    def origin(self) -> int:
        return self.vec + self.by * self.pitch

    @property
    def size(self) -> int:
        return self.vec + self.c * self.plane + self.pitch + 2 * self.vec


@dataclass(frozen=True)
class Vec:
    n: int
    vec: int

    @property
    def size(self) -> int:
        return _round_up(self.n, self.vec) + self.vec


@dataclass
class _Blob:
    """Weight arrays packed with 64-byte alignment; the C side gets byte offsets."""

    parts: list[bytes] = field(default_factory=list)
    size: int = 0

    def add(self, array: np.ndarray) -> int:
        data = np.ascontiguousarray(array).tobytes()
        offset = self.size
        pad = (-len(data)) % ALIGN
        self.parts.append(data + b"\0" * pad)
        self.size += len(data) + pad
        return offset

    def payload(self) -> bytes:
        return b"".join(self.parts)


def checksum64(data: bytes) -> int:
    """Position-weighted sum of the blob's 64-bit words (mod 2**64); the C loader recomputes it to
    refuse a weight file from another model or a corrupted one. The blob is 64-byte aligned."""
    words = np.frombuffer(data, dtype="<u8")
    index = np.arange(len(words), dtype=np.uint64)
    with np.errstate(over="ignore"):
        mixed = (words + index * np.uint64(0x9E3779B97F4A7C15)) * np.uint64(0x100000001B3)
        return int(mixed.sum(dtype=np.uint64))


@dataclass(frozen=True)
class LayerReport:
    """What the generator decided for one conv (used by the CLI summary and the benchmark)."""

    name: str
    kind: str  # "sparse3x3" | "dense"
    shape: tuple[int, int, int, int]
    stride: int
    out_hw: tuple[int, int]
    patterns: int
    kernels: int
    macs: int
    storage: pat.StorageReport | None
    blocking: str
    tiles: tuple[str, ...] = ()  # registry names (codegen.kernels) of the register tiles it uses


@dataclass(frozen=True)
class Generated:
    """The generated library's files (name -> bytes) and per-conv decisions."""

    files: dict[str, bytes]
    layers: tuple[LayerReport, ...]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]


class _C:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.depth = 0

    def __call__(self, line: str = "") -> None:
        self.lines.append(("    " * self.depth + line) if line else "")

    def open(self, line: str) -> None:
        self(line + " {")
        self.depth += 1

    def close(self, tail: str = "") -> None:
        self.depth -= 1
        self("}" + tail)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _flt(x: float) -> str:
    return repr(float(np.float32(x))) + "f"


# --------------------------------------------------------------------------------------------
# layouts


def plan_layouts(graph: Graph, target: Target) -> dict[str, FMap | Vec]:
    border: dict[str, tuple[int, int]] = {}
    for layer in graph.layers:
        if isinstance(layer, Conv) and layer.stride == (1, 1):
            by, bx = border.get(layer.inp, (0, 0))
            border[layer.inp] = (max(by, layer.padding[0]), max(bx, layer.padding[1]))
    layouts: dict[str, FMap | Vec] = {}
    for name, shape in graph.shapes.items():
        if len(shape) == 3:
            by, bx = border.get(name, (0, 0))
            c, h, w = shape
            layouts[name] = FMap(c, h, w, by, bx, _round_up(w + 2 * bx, target.vec), target.vec)
        elif len(shape) == 1:
            layouts[name] = Vec(shape[0], target.vec)
        else:
            raise CodegenError(f"tensor {name} has unsupported rank {len(shape) + 1}")
    return layouts


def _assign_buffers(graph: Graph, layouts: dict[str, FMap | Vec]) -> tuple[dict[str, int], list[int]]:
    """Liveness-based reuse among tensors with identical layouts (their borders stay zero)."""
    last_use: dict[str, int] = {graph.output: len(graph.layers)}
    for i, layer in enumerate(graph.layers):
        for name in layer_inputs(layer):
            last_use[name] = max(last_use.get(name, -1), i)
    buffer_of: dict[str, int] = {graph.input: 0}
    sizes: list[int] = [layouts[graph.input].size]
    keys: list[object] = [layouts[graph.input]]
    free_at: list[int] = [last_use.get(graph.input, 0)]
    for i, layer in enumerate(graph.layers):
        lay = layouts[layer.out]
        choice = None
        for b, key in enumerate(keys):
            if key == lay and free_at[b] < i:
                choice = b
                break
        if choice is None:
            choice = len(sizes)
            sizes.append(lay.size)
            keys.append(lay)
            free_at.append(0)
        buffer_of[layer.out] = choice
        free_at[choice] = last_use.get(layer.out, i)
    return buffer_of, sizes


# --------------------------------------------------------------------------------------------
# conv addressing


@dataclass(frozen=True)
class _Src:
    """How a conv reads its input: ci stride, row stride per output row, tap offsets."""

    base: str
    cs: int
    rs: int
    taps: tuple[int, ...]
    phase: tuple[int, int, int, int] | None = None  # (stride, rows, pitch, total floats)


def _conv_src(conv: Conv, inp: FMap, buf: str, vec: int, out_w: int) -> _Src:
    kh, kw = conv.kernel
    ph, pw = conv.padding
    sy, sx = conv.stride
    if (sy, sx) == (1, 1):
        taps = tuple((ky - ph) * inp.pitch + (kx - pw) for ky in range(kh) for kx in range(kw))
        return _Src(f"({buf} + {inp.origin})", inp.plane, inp.pitch, taps)
    if sy != sx:
        raise CodegenError(f"conv {conv.name}: unequal strides {conv.stride} are not supported")
    s = sx
    rows = inp.h + 2 * ph
    pitch = _round_up(_round_up(out_w, vec) + (kw - 1) // s + 1, vec)
    taps = tuple((kx % s) * rows * pitch + ky * pitch + kx // s for ky in range(kh) for kx in range(kw))
    total = inp.c * s * rows * pitch + vec
    return _Src("scratch", s * rows * pitch, s * pitch, taps, (s, rows, pitch, total))


def _emit_phase_split(c: _C, conv: Conv, inp: FMap, src: _Src, buf: str) -> None:
    """Copy the input into s column phases (zero outside the map); the column range that reads
    the map is fixed per phase, so the copy loop is a plain strided gather."""
    s, rows, pitch, _ = src.phase  # type: ignore[misc]  # called only when src.phase is set
    ph, pw = conv.padding
    kh, kw = conv.kernel
    out_h = (inp.h + 2 * ph - kh) // s + 1
    used_rows = sorted({s * yo + ky for yo in range(out_h) for ky in range(kh)})
    all_rows = used_rows == list(range(rows))
    if not all_rows:
        c(f"static const unsigned char used[{rows}] = {{{', '.join('1' if r in used_rows else '0' for r in range(rows))}}};")
    c.open(f"for (int ci = 0; ci < {inp.c}; ++ci)")
    c(f"const float *ip = {buf} + {inp.origin} + ci * {inp.plane};")
    for f in sorted({kx % s for kx in range(kw)}):
        lo = max(0, -(-(pw - f) // s))
        hi = max(lo, min(pitch, (inp.w - 1 + pw - f) // s + 1))
        c.open(f"for (int r = 0; r < {rows}; ++r)")
        if not all_rows:
            c("if (!used[r]) continue;")
        c(f"float *restrict q = scratch + (ci * {s} + {f}) * {rows * pitch} + r * {pitch};")
        c(f"const int y = r - {ph};")
        c.open(f"if (y < 0 || y >= {inp.h})")
        c(f"memset(q, 0, sizeof(float) * {pitch});")
        c("continue;")
        c.close()
        c(f"const float *restrict row = ip + y * {inp.pitch} + {f - pw};")
        if lo:
            c(f"for (int j = 0; j < {lo}; ++j) q[j] = 0.0f;")
        c(f"for (int j = {lo}; j < {hi}; ++j) q[j] = row[{s} * j];")
        if hi < pitch:
            c(f"for (int j = {hi}; j < {pitch}; ++j) q[j] = 0.0f;")
        c.close()
    c.close()


def _masked_last(masked: bool, width: int) -> Callable[[str], bool]:
    """Whether an accumulator is the tile's last vector and the tile masks it (a partial row)."""
    suffix = f"_{width - 1}"
    return lambda name: masked and name.endswith(suffix)


def _epilogue(c: _C, isa: VectorIsa, accs: list[tuple[str, str, str | None]], relu: bool, mask: Callable[[str], bool]) -> None:
    """accs: (acc name, output address, residual address or None)."""
    for name, _, raddr in accs:
        if raddr is not None:
            c(isa.add.format(acc=name, a=isa.load.format(p=raddr)))
        if relu:
            c(isa.relu.format(v=name))
        if mask(name):
            c(isa.mask.format(v=name, m="mk"))


# --------------------------------------------------------------------------------------------
# the emitter


class Emitter:
    """Renders one graph for one target. ``render()`` returns the generated files."""

    def __init__(self, graph: Graph, target: Target, options: Options) -> None:
        self.g = graph
        self.t = target
        self.o = options
        self.layouts = plan_layouts(graph, target)
        self.buffer_of, self.buffer_sizes = _assign_buffers(graph, self.layouts)
        self.blob = _Blob()
        self.funcs = _C()
        self.reports: list[LayerReport] = []
        self.scratch = 0
        self.V = target.vec
        self.isa = target.isa
        self.prelude: list[str] = []

    # -- helpers
    def buf(self, name: str) -> str:
        return f"m->buf[{self.buffer_of[name]}]"

    def _residual(self, conv: Conv, res: FMap | None) -> str:
        """The C pointer to a conv's fused residual input, or NULL."""
        if res is None or conv.residual is None:
            return "NULL"
        return f"{self.buf(conv.residual)} + {res.origin}"

    def fmap(self, name: str, layer: Layer) -> FMap:
        lay = self.layouts[name]
        if not isinstance(lay, FMap):
            raise CodegenError(f"layer {layer.name}: expected a feature map for {name}")
        return lay

    def warr(self, array: np.ndarray, ctype: str) -> str:
        return f"(({ctype} *)(m->w + {self.blob.add(array)}))"

    # -- convs
    def conv(self, i: int, conv: Conv) -> None:
        inp = self.fmap(conv.inp, conv)
        out = self.fmap(conv.out, conv)
        res = self.fmap(conv.residual, conv) if conv.residual is not None else None
        if res is not None and (res.c, res.h, res.w) != (out.c, out.h, out.w):
            raise CodegenError(f"layer {conv.name}: residual shape differs from the output")
        kh, kw = conv.kernel
        density = float(conv.mask.mean()) if conv.mask.size else 1.0
        sparse = (kh, kw) == (3, 3) and density <= self.o.sparse_density
        src = _conv_src(conv, inp, self.buf(conv.inp), self.V, out.w)
        if src.phase is not None:
            self.scratch = max(self.scratch, src.phase[3])
        fname = f"layer{i}"
        if sparse:
            self.sparse_conv(fname, conv, inp, out, res, src)
        else:
            self.dense_conv(fname, conv, inp, out, res, src)

    def _mask_decl(self, c: _C, out: FMap) -> None:
        rem = out.w % self.V
        if rem:
            c(f"const {self.isa.vi} mk = {self.isa.load_mask.format(p=f'bp_lane_mask + {self.V - rem}')};")

    def dense_conv(self, fname: str, conv: Conv, inp: FMap, out: FMap, res: FMap | None, src: _Src) -> None:
        V, isa = self.V, self.isa
        cout, cin, kh, kw = conv.weight.shape
        n_vec = -(-out.w // V)
        ob, u = kr.dense_blocking(self.t, cout, n_vec)
        masked = out.w % V != 0
        # weights: per output-channel block [ci][tap][ob'] so each tap broadcasts consecutive floats
        w = conv.weight.reshape(cout, cin, kh * kw).astype(np.float32)
        blocks = [(s, min(ob, cout - s)) for s in range(0, cout, ob)]
        packed = np.concatenate([w[s : s + n].transpose(1, 2, 0).reshape(-1) for s, n in blocks])
        W = self.warr(packed, "const float")
        B = self.warr(conv.bias.astype(np.float32), "const float")
        c = self.funcs
        variants = sorted({(n, tw, tm) for _, n in blocks for _, tw, tm in kr.row_tiles(n_vec, u, masked)})
        tiles = {v: kr.lookup(self.t, kr.DENSE, *v) for v in variants}
        symbol = {v: k.symbol(fname, f"{kh}x{kw}") for v, k in tiles.items()}
        for n, tw, tm in variants:
            c.open(
                f"static inline BP_INLINE void {symbol[n, tw, tm]}(float *restrict op, "
                f"const float *restrict sb, const float *restrict rp, const float *restrict w, "
                f"const float *restrict bias{f', {isa.vi} mk' if tm else ''})"
            )
            accs = [
                (f"a{o}_{v}", f"op + {o * out.plane + v * V}", f"rp + {o * res.plane + v * V}" if res is not None else None)
                for o in range(n)
                for v in range(tw)
            ]
            for o in range(n):
                c(f"{isa.vf} {', '.join(f'a{o}_{v} = ' + isa.bcast.format(x=f'bias[{o}]') for v in range(tw))};")
            c.open(f"for (int ci = 0; ci < {cin}; ++ci, sb += {src.cs}, w += {kh * kw * n})")
            for t, off in enumerate(src.taps):
                c.open("")
                c(f"const {isa.vf} {', '.join(f'x{v} = ' + isa.load.format(p=f'sb + {off + v * V}') for v in range(tw))};")
                for o in range(n):
                    c(f"const {isa.vf} w{o} = {isa.bcast.format(x=f'w[{t * n + o}]')};")
                    c(" ".join(isa.fma.format(acc=f"a{o}_{v}", a=f"x{v}", b=f"w{o}") for v in range(tw)))
                c.close()
            c.close()
            _epilogue(c, isa, accs, conv.relu, _masked_last(tm, tw))
            for name, addr, _ in accs:
                c(isa.store.format(p=addr, v=name))
            c.close()
        c.open(f"static void {fname}(bp_model *m)")
        c("const float *src = " + (src.base if src.phase is None else "m->scratch") + ";")
        if src.phase is not None:
            c("float *scratch = m->scratch;")
            _emit_phase_split(c, conv, inp, src, self.buf(conv.inp))
        c(f"float *restrict dst = {self.buf(conv.out)} + {out.origin};")
        c(f"const float *restrict res = {self._residual(conv, res)};")
        c(f"const float *restrict W = {W};")
        c(f"const float *restrict B = {B};")
        self._mask_decl(c, out)
        # full blocks in a loop, a remainder block after
        full = [b for b in blocks if b[1] == ob]
        rest = [b for b in blocks if b[1] != ob]
        groups = []
        if full:
            groups.append(("loop", len(full), ob))
        for s, n in rest:
            groups.append(("one", s, n))
        for kind, a, n in groups:
            if kind == "loop":
                c.open(f"for (int s = 0; s < {a * ob}; s += {ob})")
                c(f"const float *wb = W + s * {cin * kh * kw};")
                start = "s"
            else:
                c.open("")
                c(f"const float *wb = W + {a * cin * kh * kw};")
                start = str(a)
            c.open(f"for (int yo = 0; yo < {out.h}; ++yo)")
            c(f"float *op = dst + {start} * {out.plane} + yo * {out.pitch};")
            c(f"const float *sb = src + yo * {src.rs};")
            c(f"const float *rp = res ? res + {start} * {res.plane if res else 0} + yo * {res.pitch if res else 0} : NULL;")
            for x0, tw, tm in kr.row_tiles(n_vec, u, masked):
                c(f"{symbol[n, tw, tm]}(op + {x0 * V}, sb + {x0 * V}, rp ? rp + {x0 * V} : NULL, wb, B + {start}{', mk' if tm else ''});")
            c.close()
            c.close()
        c.close()
        c()
        self.reports.append(
            LayerReport(
                conv.name,
                "dense",
                (cout, cin, kh, kw),
                conv.stride[0],
                (out.h, out.w),
                0,
                int(conv.mask.reshape(cout, cin, -1).any(-1).sum()),
                int(conv.mask.sum()) * out.h * out.w,
                None,
                f"ob{ob} u{u}",
                tuple(k.name for k in tiles.values()),
            )
        )

    def sparse_conv(self, fname: str, conv: Conv, inp: FMap, out: FMap, res: FMap | None, src: _Src) -> None:
        V, o = self.V, self.o
        cout, cin = conv.weight.shape[:2]
        ps = pat.kernel_patterns(conv.mask, o.max_patterns)
        n_vec = -(-out.w // V)
        r, u = kr.sparse_blocking(self.t, out.h, n_vec, o.lre)
        masked = out.w % V != 0
        s = conv.stride[0]
        slab_rows = (s * (r - 1) + 3) * (s if s > 1 else 1)
        slab = slab_rows * (src.rs // s if s > 1 else src.rs) * 4
        # Measured on the host: stride-1 tiles reuse rows and tolerate a slab in L2, and there
        # blocks of >= 32 channels (fewer accumulator round trips) won; wide strided tiles touch
        # about twice the cache lines per FMA and need the slab in L1; one-vector tiles do so little
        # work per block that large blocks win again.
        floor = 4 if s > 1 and u > 1 else 32
        cb = max(floor, self.t.l1_bytes // max(1, slab))
        cb = cin if cb >= cin else cb
        sw = pat.pack(conv.weight, ps, cb, reorder=o.reorder, compact=o.compact)
        n_pat = len(ps.patterns)
        n_blocks = len(sw.blocks)
        CNT = self.warr(sw.counts.reshape(-1), "const uint16_t")
        KCI = self.warr(sw.kci, "const uint16_t")
        KPAT = self.warr(sw.kpat, "const uint8_t") if not o.reorder else None
        KW = self.warr(sw.weights, "const float")
        BIAS = self.warr(conv.bias.astype(np.float32), "const float")
        PERM = self.warr(sw.perm.astype(np.int32), "const int32_t")
        c = self.funcs
        rows_variants = [r] + ([out.h % r] if out.h % r else [])
        variants = sorted({(rr, tw, tm) for rr in rows_variants for _, tw, tm in kr.row_tiles(n_vec, u, masked)})
        tiles = {v: kr.lookup(self.t, kr.SPARSE, *v) for v in variants}
        symbol = {v: k.symbol(fname, f"_p{n_pat}") for v, k in tiles.items()}
        for rr, tw, tm in variants:
            self._sparse_tile(symbol[rr, tw, tm], rr, tw, tm, ps, src, out, res, conv.relu)
        c.open(f"static void {fname}(bp_model *m)")
        c(f"const float *src = {src.base if src.phase is None else 'm->scratch'};")
        if src.phase is not None:
            c("float *scratch = m->scratch;")
            _emit_phase_split(c, conv, inp, src, self.buf(conv.inp))
        c(f"float *restrict dst = {self.buf(conv.out)} + {out.origin};")
        c(f"const float *restrict res = {self._residual(conv, res)};")
        c(f"const uint16_t *restrict CNT = {CNT};")
        c(f"const uint16_t *restrict KCI = {KCI};")
        if KPAT:
            c(f"const uint8_t *restrict KPAT = {KPAT};")
        c(f"const float *restrict KW = {KW};")
        c(f"const float *restrict BIAS = {BIAS};")
        c(f"const int32_t *restrict PERM = {PERM};")
        if n_blocks > 1:
            totals = sw.counts.reshape(n_blocks, cout, -1).sum(axis=2)
            first = np.array([int(np.argmax(totals[:, f] > 0)) if totals[:, f].any() else n_blocks - 1 for f in range(cout)], dtype=np.uint16)
            c(f"const uint16_t *restrict FIRST = {self.warr(first, 'const uint16_t')};")
        self._mask_decl(c, out)
        bands = [("loop", out.h - out.h % r, r)] + ([("one", out.h - out.h % r, out.h % r)] if out.h % r else [])
        for kind, a, rr in bands:
            if kind == "loop":
                c.open(f"for (int yb = 0; yb < {a}; yb += {rr})")
            else:
                c.open("")
                c(f"const int yb = {a};")
            c("const uint16_t *cnt = CNT, *ci = KCI;")
            c("const float *w = KW;")
            if KPAT:
                c("const uint8_t *kp = KPAT;")
            c.open(f"for (int b = 0; b < {n_blocks}; ++b)")
            c.open(f"for (int f = 0; f < {cout}; ++f)")
            c("const int o = PERM[f];")
            c(f"float *op = dst + o * {out.plane} + yb * {out.pitch};")
            c(f"const float *sb = src + yb * {src.rs};")
            c(f"const float *rp = res ? res + o * {res.plane if res else 0} + yb * {res.pitch if res else 0} : NULL;")
            wf = "w" if o.compact else f"KW + o * {cin * 9}"
            if o.reorder:
                c(f"const int nk = {' + '.join(f'cnt[{p}]' for p in range(n_pat)) or '0'};")
            else:
                c("const int nk = cnt[0];")
            if n_blocks > 1:
                # blocks before the filter's first kernel, and empty middle blocks, do nothing
                c(f"const int first = b == FIRST[f], last = b == {n_blocks - 1};")
                c("if (b >= FIRST[f] && (nk || first || last)) {")
                c.depth += 1
            else:
                c("const int first = 1, last = 1;")
            for x0, tw, tm in kr.row_tiles(n_vec, u, masked):
                args = [f"op + {x0 * V}", f"sb + {x0 * V}", f"rp ? rp + {x0 * V} : NULL", "cnt", "ci"]
                if KPAT:
                    args.append("kp")
                args += [wf, "BIAS[o]", "first", "last"]
                if tm:
                    args.append("mk")
                c(f"{symbol[rr, tw, tm]}({', '.join(args)});")
            if n_blocks > 1:
                c.close()
            if o.reorder:
                if o.compact:
                    c(f"w += {' + '.join(f'{len(ps.patterns[p])} * cnt[{p}]' for p in range(n_pat)) or '0'};")
                c(f"ci += nk; cnt += {n_pat};")
            else:
                if o.compact:
                    c.open("for (int k = 0; k < nk; ++k)")
                    c(f"w += BP_PLEN_{fname}[kp[k]];")
                    c.close()
                c("ci += nk; kp += nk; cnt += 1;")
            c.close()
            c.close()
            c.close()
        c.close()
        c()
        if not o.reorder and o.compact:
            lens = ", ".join(str(len(p)) for p in ps.patterns) or "0"
            self.prelude.append(f"static const uint8_t BP_PLEN_{fname}[] = {{{lens}}};")
        kernels = int((ps.ids >= 0).sum())
        self.reports.append(
            LayerReport(
                conv.name,
                "sparse3x3",
                (cout, cin, 3, 3),
                s,
                (out.h, out.w),
                n_pat,
                kernels,
                int(sum(len(ps.patterns[p]) * int(n) for p, n in enumerate(ps.count()))) * out.h * out.w,
                pat.storage_sizes(conv.mask, ps),
                f"r{r} u{u} cb{cb}",
                tuple(k.name for k in tiles.values()),
            )
        )

    def _sparse_tile(self, symbol: str, rr: int, tw: int, tm: bool, ps: pat.PatternSet, src: _Src, out: FMap, res: FMap | None, relu: bool) -> None:
        V, o, c, isa = self.V, self.o, self.funcs, self.isa
        params = [
            "float *restrict op",
            "const float *restrict sb",
            "const float *restrict rp",
            "const uint16_t *restrict cnt",
            "const uint16_t *restrict ci",
        ]
        if not o.reorder:
            params.append("const uint8_t *restrict kp")
        params += ["const float *restrict w", "float bias", "int first", "int last"]
        if tm:
            params.append(f"{isa.vi} mk")
        c.open(f"static inline BP_INLINE void {symbol}({', '.join(params)})")
        accs = [
            (f"a{y}_{v}", f"op + {y * out.pitch + v * V}", f"rp + {y * res.pitch + v * V}" if res is not None else None)
            for y in range(rr)
            for v in range(tw)
        ]
        c(f"{isa.vf} {', '.join(a for a, _, _ in accs)};")
        c.open("if (first)")
        for a, _, _ in accs:
            c(f"{a} = {isa.bcast.format(x='bias')};")
        c.close()
        c.open("else")
        for a, addr, _ in accs:
            c(f"{a} = {isa.load.format(p=addr)};")
        c.close()

        def body(p: int, wexpr: Callable[[int, int], str]) -> None:
            taps = ps.patterns[p]
            c("const float *s = sb + (int)ci[0] * " + str(src.cs) + ";")
            for j, t in enumerate(taps):
                c(f"const {isa.vf} w{j} = {isa.bcast.format(x=wexpr(j, t))};")
            loads: dict[int, list[tuple[str, int, int]]] = {}  # key -> (accumulator, weight, offset)
            order: list[int] = []
            n = 0
            for j, t in enumerate(taps):
                for y in range(rr):
                    for v in range(tw):
                        off = y * src.rs + v * V + src.taps[t]
                        key = off if o.lre else n
                        n += 1
                        if key not in loads:
                            loads[key] = []
                            order.append(key)
                        loads[key].append((f"a{y}_{v}", j, off))
            for key in sorted(order):
                uses = loads[key]
                off = uses[0][2]
                keep = " " + isa.keep.format(v="x") if len(uses) > 1 else ""
                fmas = " ".join(isa.fma.format(acc=a, a="x", b=f"w{j}") for a, j, _ in uses)
                c(f"{{ {isa.vf} x = {isa.load.format(p=f's + {off}')};{keep} {fmas} }}")

        if o.reorder:
            for p, taps in enumerate(ps.patterns):
                wstep = len(taps) if o.compact else 0
                c.open(f"for (int k = cnt[{p}]; k > 0; --k, ++ci{', w += ' + str(wstep) if wstep else ''})")
                if o.compact:
                    body(p, lambda j, t: f"w[{j}]")
                else:
                    c("const float *wk = w + (int)ci[0] * 9;")
                    body(p, lambda j, t: f"wk[{t}]")
                c.close()
        else:
            c.open("for (int k = cnt[0]; k > 0; --k, ++ci, ++kp)")
            if not o.compact:
                c("const float *wk = w + (int)ci[0] * 9;")
            c.open("switch (kp[0])")
            for p, taps in enumerate(ps.patterns):
                c.open(f"case {p}:")
                if o.compact:
                    body(p, lambda j, t: f"w[{j}]")
                    c(f"w += {len(taps)};")
                else:
                    body(p, lambda j, t: f"wk[{t}]")
                c("break;")
                c.close()
            c.close()
            c.close()
        c.open("if (last)")
        _epilogue(c, isa, accs, relu, lambda name: tm and name.endswith(f"_{tw - 1}"))
        c.close()
        for a, addr, _ in accs:
            c(isa.store.format(p=addr, v=a))
        c.close()

    # -- other layers
    def pool(self, i: int, layer: Pool) -> None:
        """Row-wise pooling: each valid (input row, tap column) pair updates a run of outputs whose
        bounds are computed once per row, so the inner loop has no bounds checks."""
        inp, out = self.fmap(layer.inp, layer), self.fmap(layer.out, layer)
        (kh, kw), (sh, sw), (ph, pw) = layer.kernel, layer.stride, layer.padding
        is_max = layer.kind == "max"
        c = self.funcs
        c.open(f"static void layer{i}(bp_model *m)")
        c(f"const float *restrict src = {self.buf(layer.inp)} + {inp.origin};")
        c(f"float *restrict dst = {self.buf(layer.out)} + {out.origin};")
        # per tap column: the output range whose input column is inside the map
        lo = [max(0, -(-(pw - kx) // sw)) for kx in range(kw)]
        hi = [min(out.w, (inp.w - 1 + pw - kx) // sw + 1) for kx in range(kw)]
        c(f"static const int xlo[{kw}] = {{{', '.join(map(str, lo))}}}, xhi[{kw}] = {{{', '.join(map(str, hi))}}};")
        c.open(f"for (int ch = 0; ch < {out.c}; ++ch)")
        c(f"const float *ip = src + ch * {inp.plane};")
        c.open(f"for (int yo = 0; yo < {out.h}; ++yo)")
        c(f"float *restrict d = dst + ch * {out.plane} + yo * {out.pitch};")
        c(f"const int y0 = yo * {sh} - {ph};")
        c(f"const int ya = y0 < 0 ? 0 : y0, yz = y0 + {kh} > {inp.h} ? {inp.h} : y0 + {kh};")
        # vertical pass over the window's valid rows into one contiguous row, then the
        # horizontal (strided) pass: kh + kw sweeps instead of kh * kw
        c(f"float t[{inp.w}];")
        c(f"const float *r0 = ip + ya * {inp.pitch};")
        c(f"for (int x = 0; x < {inp.w}; ++x) t[x] = r0[x];")
        c.open("for (int y = ya + 1; y < yz; ++y)")
        c(f"const float *r = ip + y * {inp.pitch};")
        if is_max:
            c(f"for (int x = 0; x < {inp.w}; ++x) t[x] = r[x] > t[x] ? r[x] : t[x];")
        else:
            c(f"for (int x = 0; x < {inp.w}; ++x) t[x] += r[x];")
        c.close()
        c(f"for (int xo = 0; xo < {out.w}; ++xo) d[xo] = {'-INFINITY' if is_max else '0.0f'};")
        c(f"const float *tr = t - {pw};")
        c.open(f"for (int kx = 0; kx < {kw}; ++kx)")
        if is_max:
            c(f"for (int xo = xlo[kx]; xo < xhi[kx]; ++xo) {{ const float v = tr[xo * {sw} + kx]; d[xo] = v > d[xo] ? v : d[xo]; }}")
        else:
            c(f"for (int xo = xlo[kx]; xo < xhi[kx]; ++xo) d[xo] += tr[xo * {sw} + kx];")
        c.close()
        if not is_max:
            c.open(f"for (int xo = 0; xo < {out.w}; ++xo)")
            if layer.divisor:
                c(f"d[xo] /= {_flt(layer.divisor)};")
            else:
                c(f"const int x0 = xo * {sw} - {pw};")
                c(f"int yz2 = y0 + {kh}, xz = x0 + {kw};")
                c(f"if (yz2 > {inp.h + ph}) yz2 = {inp.h + ph};")
                c(f"if (xz > {inp.w + pw}) xz = {inp.w + pw};")
                if layer.count_include_pad:
                    c("d[xo] /= (float)((yz2 - y0) * (xz - x0));")
                else:
                    c("const int xa = x0 < 0 ? 0 : x0;")
                    c(f"if (xz > {inp.w}) xz = {inp.w};")
                    c("d[xo] /= (float)((yz - ya) * (xz - xa));")
            c.close()
        c.close()
        c.close()
        c.close()
        c()

    def adaptive(self, i: int, layer: AdaptiveAvgPool) -> None:
        inp, out = self.fmap(layer.inp, layer), self.fmap(layer.out, layer)
        c = self.funcs
        c.open(f"static void layer{i}(bp_model *m)")
        c(f"const float *restrict src = {self.buf(layer.inp)} + {inp.origin};")
        c(f"float *restrict dst = {self.buf(layer.out)} + {out.origin};")
        c.open(f"for (int ch = 0; ch < {out.c}; ++ch)")
        c(f"const float *ip = src + ch * {inp.plane};")
        c.open(f"for (int yo = 0; yo < {out.h}; ++yo)")
        c(f"const int ya = (yo * {inp.h}) / {out.h}, yz = ((yo + 1) * {inp.h} + {out.h - 1}) / {out.h};")
        c.open(f"for (int xo = 0; xo < {out.w}; ++xo)")
        c(f"const int xa = (xo * {inp.w}) / {out.w}, xz = ((xo + 1) * {inp.w} + {out.w - 1}) / {out.w};")
        c("float v = 0.0f;")
        c("for (int y = ya; y < yz; ++y)")
        c(f"    for (int x = xa; x < xz; ++x) v += ip[y * {inp.pitch} + x];")
        c(f"dst[ch * {out.plane} + yo * {out.pitch} + xo] = v / (float)((yz - ya) * (xz - xa));")
        c.close()
        c.close()
        c.close()
        c.close()
        c()

    def flatten(self, i: int, layer: Flatten) -> None:
        inp = self.layouts[layer.inp]
        c = self.funcs
        c.open(f"static void layer{i}(bp_model *m)")
        c(f"float *restrict dst = {self.buf(layer.out)};")
        if isinstance(inp, Vec):
            c(f"memcpy(dst, {self.buf(layer.inp)}, sizeof(float) * {inp.n});")
        else:
            c(f"const float *restrict src = {self.buf(layer.inp)} + {inp.origin};")
            c(f"for (int ch = 0; ch < {inp.c}; ++ch)")
            c(f"    for (int y = 0; y < {inp.h}; ++y)")
            c(f"        memcpy(dst + (ch * {inp.h} + y) * {inp.w}, src + ch * {inp.plane} + y * {inp.pitch}, sizeof(float) * {inp.w});")
        c.close()
        c()

    def linear(self, i: int, layer: Linear) -> None:
        n_out, n_in = layer.weight.shape
        V = self.V
        stride = _round_up(n_in, V)
        w = np.zeros((n_out, stride), np.float32)
        w[:, :n_in] = layer.weight
        W = self.warr(w, "const float")
        B = self.warr(layer.bias.astype(np.float32), "const float")
        c = self.funcs
        c.open(f"static void layer{i}(bp_model *m)")
        c(f"const float *restrict x = {self.buf(layer.inp)};")
        c(f"float *restrict y = {self.buf(layer.out)};")
        c(f"const float *restrict W = {W};")
        c(f"const float *restrict B = {B};")
        isa = self.isa
        c.open(f"for (int j = 0; j < {n_out}; ++j)")
        c(f"{isa.vf} acc = {isa.zero.format()};")
        fma = isa.fma.format(acc="acc", a=isa.load.format(p=f"W + j * {stride} + i"), b=isa.load.format(p="x + i"))
        c(f"for (int i = 0; i < {stride}; i += {V}) {fma}")
        c("float v = B[j];")
        c(isa.hsum.format(n=V, s="v", v="acc"))
        c(f"y[j] = {'v > 0.0f ? v : 0.0f' if layer.relu else 'v'};")
        c.close()
        c.close()
        c()

    def elementwise(self, i: int, layer: Add | Relu) -> None:
        lay = self.layouts[layer.out]
        c = self.funcs
        names = [layer.a, layer.b] if isinstance(layer, Add) else [layer.inp]
        relu = isinstance(layer, Relu) or layer.relu
        c.open(f"static void layer{i}(bp_model *m)")
        if isinstance(lay, Vec):
            ptrs = [f"{self.buf(n)}" for n in names]
            c.open(f"for (int k = 0; k < {lay.n}; ++k)")
            c(f"float v = {' + '.join(p + '[k]' for p in ptrs)};")
            c(f"{self.buf(layer.out)}[k] = {'v > 0.0f ? v : 0.0f' if relu else 'v'};")
            c.close()
        else:
            ins = [self.fmap(n, layer) for n in names]
            c.open(f"for (int ch = 0; ch < {lay.c}; ++ch)")
            c.open(f"for (int y = 0; y < {lay.h}; ++y)")
            c(f"float *d = {self.buf(layer.out)} + {lay.origin} + ch * {lay.plane} + y * {lay.pitch};")
            for j, (n, f) in enumerate(zip(names, ins, strict=False)):
                c(f"const float *s{j} = {self.buf(n)} + {f.origin} + ch * {f.plane} + y * {f.pitch};")
            c.open(f"for (int x = 0; x < {lay.w}; ++x)")
            c(f"float v = {' + '.join(f's{j}[x]' for j in range(len(names)))};")
            c(f"d[x] = {'v > 0.0f ? v : 0.0f' if relu else 'v'};")
            c.close()
            c.close()
            c.close()
        c.close()
        c()

    # -- whole program
    def render(self, prefix: str = "bp") -> Generated:
        dispatch: dict[type, Callable] = {
            Conv: self.conv,
            Pool: self.pool,
            AdaptiveAvgPool: self.adaptive,
            Flatten: self.flatten,
            Linear: self.linear,
            Add: self.elementwise,
            Relu: self.elementwise,
        }
        for i, layer in enumerate(self.g.layers):
            dispatch[type(layer)](i, layer)
        payload = self.blob.payload()
        digest = checksum64(payload)
        in_shape = self.g.shapes[self.g.input]
        out_shape = self.g.shapes[self.g.output]
        files = {
            "bp_model.h": render_header(in_shape, out_shape).encode(),
            "bp_model.c": self._source(payload, digest).encode(),
            "bp_main.c": render_template("bp_main.c.in").encode(),
            "Makefile": render_makefile(self.t).encode(),
            "weights.bin": WEIGHT_MAGIC + len(payload).to_bytes(8, "little") + digest.to_bytes(8, "little") + b"\0" * (HEADER_BYTES - 24) + payload,
        }
        return Generated(files, tuple(self.reports), in_shape, out_shape)

    def _forward(self) -> str:
        """``bp_forward``: copy one image into the bordered input, run the layers, copy out."""
        c = _C()
        inp = self.layouts[self.g.input]
        outl = self.layouts[self.g.output]
        c.open("static void bp_forward(bp_model *m, const float *in, float *out)")
        if isinstance(inp, FMap):
            c(f"for (int ch = 0; ch < {inp.c}; ++ch)")
            c(f"    for (int y = 0; y < {inp.h}; ++y)")
            c(
                f"        memcpy(m->buf[0] + {inp.origin} + ch * {inp.plane} + y * {inp.pitch}, "
                f"in + (ch * {inp.h} + y) * {inp.w}, sizeof(float) * {inp.w});"
            )
        else:
            c(f"memcpy(m->buf[0], in, sizeof(float) * {inp.n});")
        for i in range(len(self.g.layers)):
            c(f"BP_TIC(); layer{i}(m); BP_TOC({i});")
        ob = self.buf(self.g.output)
        if isinstance(outl, FMap):
            c(f"for (int ch = 0; ch < {outl.c}; ++ch)")
            c(f"    for (int y = 0; y < {outl.h}; ++y)")
            c(
                f"        memcpy(out + (ch * {outl.h} + y) * {outl.w}, {ob} + {outl.origin} + ch * {outl.plane} + "
                f"y * {outl.pitch}, sizeof(float) * {outl.w});"
            )
        else:
            c(f"memcpy(out, {ob}, sizeof(float) * {outl.n});")
        c.close()
        return c.text()

    def _source(self, payload: bytes, digest: int) -> str:
        """bp_model.c: prologue (vector prelude, tables), the layer functions, then the entry."""
        offsets = []
        total = 0
        for size in self.buffer_sizes:
            offsets.append(total)
            total += _round_up(size, 16)
        scratch = _round_up(self.scratch, 16)
        return render_template(
            "bp_model.c.in",
            TARGET=self.t.name,
            OPTIONS=self.o,
            VECTOR=render_vector_prelude(self.isa),
            NBUF=len(self.buffer_sizes),
            TABLES="\n".join(self.prelude),
            LAYERS=self.funcs.text(),
            N_LAYERS=len(self.g.layers),
            FORWARD=self._forward(),
            BUF_OFFSETS=", ".join(map(str, offsets)),
            PAYLOAD=len(payload),
            DIGEST=f"0x{digest:016x}ULL",
            TOTAL=total + scratch,
            SCRATCH=total,
        )


def render_vector_prelude(isa: VectorIsa) -> str:
    """The vector types and helpers of ``isa`` (its prelude template), with its lane-mask table."""
    keep = f'__asm__("" : "+{isa.vreg}"(v))' if isa.vreg else "((void)0)"
    return render_template(isa.prelude, VBYTES=4 * isa.vec, KEEP=keep, MASK_LEN=2 * isa.vec, LANE_MASK=", ".join(["-1"] * isa.vec + ["0"] * isa.vec))


def render_header(in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> str:
    """bp_model.h: the C API and the per-image sizes."""
    return render_template(
        "bp_model.h.in",
        IN_DIMS=", ".join(map(str, in_shape)),
        OUT_DIMS=", ".join(map(str, out_shape)),
        IN_SIZE=int(np.prod(in_shape)),
        OUT_SIZE=int(np.prod(out_shape)),
    )


def render_makefile(target: Target) -> str:
    """Makefile building the harness and both libraries with the target's toolchain."""
    return render_template(
        "Makefile.in", TARGET=target.name, CC=target.cc, AR=target.ar, CFLAGS=" ".join(target.cflags), LDSTATIC=" -static" if target.static else ""
    )


def generate(graph: Graph, target: Target, options: Options = Options()) -> Generated:
    """Render a lowered graph for a target."""
    return Emitter(graph, target, options).render()
