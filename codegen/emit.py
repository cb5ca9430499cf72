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
tap is again one constant offset and a contiguous vector load; a phase row is only as long as the
outputs' reach (the lanes past a row's end read on into the next row). Vector lanes past a row's
end are computed and masked to zero on store, so the borders stay zero without any per-layer
clean-up.

Pattern-sparse 3x3 conv (the paper's three optimisations, each with an :class:`Options` switch):
- reorder: filters sorted by kernel count and pattern mix, kernels grouped by pattern, one
  branch-free loop per pattern with hard-coded offsets (off: one loop, a ``switch`` per kernel);
- compact: per kernel a uint16 input channel and only its kept weights (off: the dense 3x3 weights
  are read through the kernel's pattern);
- lre: register blocking over R output rows x U vectors, and every distinct input vector of a tile
  is loaded once and feeds all the accumulators that need it (off: 1x1 tiles, a load per tap).
Input channels are processed in blocks sized to keep the band's input slab in L1 (strided convs:
that bound balanced against the fixed cost a filter pays per block, see
:func:`codegen.kernels.strided_channel_block`). Depthwise convs
(3x3 or 5x5, dense or pattern-pruned) take the same path, each filter holding one kernel that reads
its own channel. Dense convs and Linear layers skip structured sparsity: output channels (rows)
whose weights are all pruned become act(bias) planes, input channels (columns) nothing reads are
neither stored nor loaded. Those planes are known when the code is generated, and so is a
depthwise conv's plane of such a channel (the inverted residual blocks of mobile networks put one
after every pruned expand conv): neither is computed, and a known plane is stored only where a
layer loads it. Channels that no layer reads (all their readers' weights on them pruned, see
:func:`needed_channels`) are not computed at all, nor is anything only they need.

Threads: every layer is one or more step functions ``f(m, tid, nth)`` that ``bp_forward`` runs on
the model's thread pool (``templates/bp_model.c.in``). A step deals its output channels (filters,
channel blocks, planes, Linear rows) round-robin by ``tid``, or, where its input is the larger
operand (a dense conv with the rows outside, a stride-1 depthwise conv), contiguous runs of row
bands, so each core reads only its own rows; either way each output is computed exactly as the
one-thread code does, so outputs do not depend on the thread count. A stride-2 conv's phase split
is a step of its own, ahead of the conv.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from . import kernels as kr
from . import patterns as pat
from .ir import (
    Act,
    Activation,
    AdaptiveAvgPool,
    Add,
    CodegenError,
    Conv,
    Flatten,
    Graph,
    Layer,
    Linear,
    Mul,
    Pool,
    layer_inputs,
    numpy_act,
    scalar_act,
)
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
    threads: int = 1  # threads bp_load starts (bp_set_threads / BP_THREADS change it at run time)


MAX_THREADS = 64  # threads the pool can run (BP_MAX_THREADS of templates/bp_model.c.in)
LINEAR_ROWS = 4  # Linear rows summed side by side: independent chains enough to hide the FMA latency


# band slots per thread from which a pattern-sparse conv is split by rows (shares then differ by
# at most a band in eight); with fewer its filters are dealt to the threads
ROW_SPLIT_PER_THREAD = 8


def _thread_run(c: _C, n: int) -> None:
    """This thread's contiguous run ``[lo, hi)`` of ``n`` work units (row bands, Linear rows)."""
    c(f"const int lo = tid * {n} / nth, hi = (tid + 1) * {n} / nth;")


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
class _Phases:
    """The column phases a strided conv reads (in ``scratch``): per input channel ``copies``
    planes of ``rows`` x ``pitch``, element j of phase f holding input column
    ``stride * j + f - padding`` (zero outside the map)."""

    stride: int
    rows: int
    pitch: int
    copies: int

    @property
    def per_channel(self) -> int:
        """Floats of one input channel's phases."""
        return self.copies * self.rows * self.pitch


@dataclass(frozen=True)
class _Src:
    """How a conv reads its input: ci stride, row stride per output row, tap offsets."""

    base: str
    cs: int
    rs: int
    taps: tuple[int, ...]
    phase: _Phases | None = None
    scratch: int = 0  # floats of scratch the phase planes need


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
    # the row's last valid output reads element out_w - 1 + (kw - 1) // s of its phase; lanes past
    # out_w may read on into the next phase row (they are masked on store), so no slack beyond
    # that: the planes stay as small as the map (an 8-float row for a 7-wide map, not 16)
    pitch = _round_up(out_w + (kw - 1) // s, vec)
    taps = tuple((kx % s) * rows * pitch + ky * pitch + kx // s for ky in range(kh) for kx in range(kw))
    phases = _Phases(s, rows, pitch, min(s, kw))
    return _Src("scratch", phases.per_channel, s * pitch, taps, phases, inp.c * phases.per_channel + vec)


def _shift(offset: int, vec: int) -> int:
    """Columns a tap's offset lies off the nearest vector boundary (rows are vector-aligned)."""
    return (offset + vec // 2) % vec - vec // 2


def _column_shifts(src: _Src, out_w: int, n_vec: int, vec: int) -> tuple[int, ...]:
    """The column shifts of a conv's taps (with 0, the output's own set) where a column-shift
    tile computes it exactly, else (). Lanes shifted in past a row's ends must be zero: the
    bordered map's border at stride 1; phase planes have none, so there the shifts must be
    forward and the last output's element must sit inside the row's last loaded vector."""
    shifts = tuple(sorted({0, *(_shift(t, vec) for t in src.taps)}))
    if len(shifts) == 1:
        return ()
    if src.phase is not None and (shifts[0] < 0 or out_w - 1 + shifts[-1] >= n_vec * vec):
        return ()
    return shifts


def needed_channels(graph: Graph) -> dict[str, np.ndarray]:
    """Per feature map, a boolean per channel: whether any layer reads it (every channel of the
    network's output). A conv reads the input channels its kept weights of the output channels
    that are needed touch, a depthwise conv and a residual the channels it needs itself; other
    layers read every channel. Walked from the output back, so a channel that only feeds pruned
    weights is dropped together with everything that computes it."""
    need: dict[str, np.ndarray] = {}

    def add(name: str, channels: np.ndarray) -> None:
        need[name] = need[name] | channels if name in need else channels.copy()

    def channels(name: str) -> int:
        return int(graph.shapes[name][0])

    need[graph.output] = np.ones(channels(graph.output), dtype=bool)
    for layer in reversed(graph.layers):
        out = need.get(layer.out, np.zeros(channels(layer.out), dtype=bool))
        if isinstance(layer, Conv) and len(graph.shapes[layer.inp]) == 3:
            if layer.depthwise:
                add(layer.inp, out)
            else:
                add(layer.inp, layer.mask[out].any(axis=(0, 2, 3)))
            if layer.residual is not None:
                add(layer.residual, out)
        else:
            for name in layer_inputs(layer):
                add(name, np.ones(channels(name), dtype=bool))
    return need


def _reads_known(layer: Layer, name: str) -> bool:
    """Whether ``layer`` takes the known channel planes of its input ``name`` from the emitter
    rather than from memory: a depthwise conv without a residual (see ``Emitter.sparse_conv``)."""
    return isinstance(layer, Conv) and layer.depthwise and layer.residual is None and layer.inp == name


def _depthwise_plane(plane: np.ndarray, conv: Conv, ch: int, out_h: int, out_w: int) -> np.ndarray:
    """Channel ``ch`` of depthwise ``conv`` (activation included) on a known input plane."""
    kh, kw = conv.kernel
    sy, sx = conv.stride
    ph, pw = conv.padding
    h, w = plane.shape
    padded = np.zeros((max(h + 2 * ph, sy * (out_h - 1) + kh), max(w + 2 * pw, sx * (out_w - 1) + kw)))
    padded[ph : ph + h, pw : pw + w] = plane
    weight = (conv.weight[ch, 0] * conv.mask[ch, 0]).astype(np.float64)
    acc = np.full((out_h, out_w), float(conv.bias[ch]))
    for ky in range(kh):
        for kx in range(kw):
            acc += weight[ky, kx] * padded[ky : ky + sy * (out_h - 1) + 1 : sy, kx : kx + sx * (out_w - 1) + 1 : sx]
    return numpy_act(conv.act, acc.astype(np.float32))


def _emit_phase_split(c: _C, conv: Conv, inp: FMap, src: _Src, buf: str, channel: str | None = None, *, raw: bool = False) -> None:
    """Copy the input into s column phases (zero outside the map); the column range that reads
    the map is fixed per phase, so the copy loop is a plain strided gather. Every channel, dealt
    to the threads, into ``scratch``; or (``channel``: a C expression) that one channel into
    this thread's planes, ``scratch + tid * per_channel``. ``raw``: the input is the caller's
    image (``m->in``, planes of h x w), read in place of its bordered copy: the gather reads
    only columns and rows inside the map."""
    assert src.phase is not None  # called only for strided convs
    s, rows, pitch = src.phase.stride, src.phase.rows, src.phase.pitch
    ph, pw = conv.padding
    kh, kw = conv.kernel
    out_h = (inp.h + 2 * ph - kh) // s + 1
    used_rows = sorted({s * yo + ky for yo in range(out_h) for ky in range(kh)})
    all_rows = used_rows == list(range(rows))
    if not all_rows:
        c(f"static const unsigned char used[{rows}] = {{{', '.join('1' if r in used_rows else '0' for r in range(rows))}}};")
    if channel is None:
        c.open(f"for (int ci = tid; ci < {inp.c}; ci += nth)")
        c(f"float *qb = scratch + ci * {src.cs};")
    else:
        c.open("")
        c(f"const int ci = {channel};")
        c(f"float *qb = scratch + tid * {src.cs};")
    if raw:
        c(f"const float *ip = m->in + ci * {inp.h * inp.w};")
    else:
        c(f"const float *ip = {buf} + {inp.origin} + ci * {inp.plane};")
    pitch_in = inp.w if raw else inp.pitch
    for f in range(src.phase.copies):
        lo = max(0, -(-(pw - f) // s))
        hi = max(lo, min(pitch, (inp.w - 1 + pw - f) // s + 1))
        c.open(f"for (int r = 0; r < {rows}; ++r)")
        if not all_rows:
            c("if (!used[r]) continue;")
        c(f"float *restrict q = qb + {f * rows * pitch} + r * {pitch};")
        c(f"const int y = r - {ph};")
        c.open(f"if (y < 0 || y >= {inp.h})")
        c(f"memset(q, 0, sizeof(float) * {pitch});")
        c("continue;")
        c.close()
        c(f"const float *restrict row = ip + y * {pitch_in} + {f - pw};")
        if lo:
            c(f"for (int j = 0; j < {lo}; ++j) q[j] = 0.0f;")
        c(f"for (int j = {lo}; j < {hi}; ++j) q[j] = row[{s} * j];")
        if hi < pitch:
            c(f"for (int j = {hi}; j < {pitch}; ++j) q[j] = 0.0f;")
        c.close()
    c.close()


def _epilogue(c: _C, isa: VectorIsa, accs: list[tuple[str, str, str | None]], act: Act | None, mask: Callable[[str], bool]) -> None:
    """accs: (acc name, output address, residual address or None)."""
    for name, _, raddr in accs:
        if raddr is not None:
            c(isa.add.format(acc=name, a=isa.load.format(p=raddr)))
        if act is not None:
            c(isa.activation(act.kind).format(v=name, lo=_flt(act.lo), hi=_flt(act.hi)))
        if mask(name):
            c(isa.mask.format(v=name, m="mk"))


# --------------------------------------------------------------------------------------------
# the emitter


class Emitter:
    """Renders one graph for one target. ``render()`` returns the generated files."""

    def __init__(self, graph: Graph, target: Target, options: Options) -> None:
        if not 1 <= options.threads <= 64:
            raise CodegenError(f"threads must be between 1 and 64, not {options.threads}")
        self.g = graph
        self.base = target  # the target asked for (self.t is narrowed while a narrow conv renders)
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
        self.steps: list[tuple[int, str]] = []  # (layer index, step function), in run order
        self.readers: dict[str, list[Layer]] = {}
        for layer in graph.layers:
            for name in layer_inputs(layer):
                self.readers.setdefault(name, []).append(layer)
        # channel planes (h, w) known when the code is generated: the act(bias) planes of pruned
        # output rows, and what a depthwise conv makes of them
        self.known: dict[str, dict[int, np.ndarray]] = {}
        self.needed = needed_channels(graph)
        self.raw_input = False  # the first layer reads the caller's image, not its bordered copy

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
        """A conv no wider than the target's narrow vector flavour is rendered in it (layouts stay
        the wide ones: their pitch is a multiple of both widths)."""
        narrow = self.isa.narrow
        if narrow is None or self.fmap(conv.out, conv).w > narrow.vec:
            return self._conv(i, conv)
        wide = self.t
        self.t, self.isa, self.V = replace(wide, isa=narrow), narrow, narrow.vec
        try:
            self._conv(i, conv)
        finally:
            self.t, self.isa, self.V = wide, wide.isa, wide.vec

    def _conv(self, i: int, conv: Conv) -> None:
        inp = self.fmap(conv.inp, conv)
        out = self.fmap(conv.out, conv)
        res = self.fmap(conv.residual, conv) if conv.residual is not None else None
        if res is not None and (res.c, res.h, res.w) != (out.c, out.h, out.w):
            raise CodegenError(f"layer {conv.name}: residual shape differs from the output")
        kh, kw = conv.kernel
        density = float(conv.mask.mean()) if conv.mask.size else 1.0
        sparse = conv.depthwise or ((kh, kw) == (3, 3) and density <= self.o.sparse_density)
        src = _conv_src(conv, inp, self.buf(conv.inp), self.V, out.w)
        fname = f"layer{i}"
        if src.phase is not None and conv.depthwise:
            # each filter reads one channel: its phases are made where it runs (one thread's
            # planes, still in cache for its bands), not all channels' up front (several MB
            # written and read back); planes for every thread the pool can run, since the work
            # bounds may give any of them filters (a 32-channel conv on 40 threads gives thread 39 one)
            self.scratch = max(self.scratch, MAX_THREADS * src.cs + self.V)
        elif src.phase is not None:
            self.scratch = max(self.scratch, src.scratch)
            c = self.funcs
            # the network's input read by this conv alone: its phases come straight from the image
            raw = conv.inp == self.g.input and self.readers[conv.inp] == [conv] and conv.residual is None
            self.raw_input = self.raw_input or raw
            c.open(f"static void {fname}_split(bp_model *m, int tid, int nth)")
            c("float *scratch = m->scratch;")
            _emit_phase_split(c, conv, inp, src, self.buf(conv.inp), raw=raw)
            c.close()
            c()
            self.steps.append((i, f"{fname}_split"))
        if sparse:
            self.sparse_conv(fname, conv, inp, out, res, src)
        else:
            self.dense_conv(fname, conv, inp, out, res, src)
        self.steps.append((i, fname))

    def _mask_decl(self, c: _C, out: FMap) -> None:
        rem = out.w % self.V
        if rem:
            c(f"const {self.isa.vi} mk = {self.isa.load_mask.format(p=f'{self.isa.lane_mask} + {self.V - rem}')};")

    def _unread_known(self, name: str) -> bool:
        """Whether the known planes of map ``name`` need not be stored: every layer reading it is
        a depthwise conv that takes them from :attr:`known` (its own outputs of those channels
        are known too), and it is not the network's output."""
        readers = self.readers.get(name, [])
        return name != self.g.output and bool(readers) and all(_reads_known(layer, name) for layer in readers)

    def _known_planes(self, c: _C, name: str, out: FMap, planes: dict[int, np.ndarray]) -> None:
        """Store the planes of channels known at generation time (from a table of their distinct
        rows: a constant plane through a padded conv differs only near the border), unless no
        reader loads them."""
        self.known.setdefault(name, {}).update(planes)
        if not planes or self._unread_known(name):
            return
        rows: dict[bytes, int] = {}
        chans = sorted(planes)
        index = np.zeros((len(chans), out.h), dtype=np.int32)
        for j, ch in enumerate(chans):
            for y in range(out.h):
                index[j, y] = rows.setdefault(planes[ch][y].astype(np.float32).tobytes(), len(rows))
        table = np.frombuffer(b"".join(rows), dtype=np.float32)
        KC = self.warr(np.array(chans, dtype=np.int32), "const int32_t")
        KR = self.warr(table, "const float")
        KI = self.warr(index.reshape(-1), "const int32_t")
        c.open(f"for (int j = tid; j < {len(chans)}; j += nth)")
        c(f"float *d = dst + {KC}[j] * {out.plane};")
        c(f"const int32_t *ri = {KI} + j * {out.h};")
        c(f"for (int y = 0; y < {out.h}; ++y) memcpy(d + y * {out.pitch}, {KR} + ri[y] * {out.w}, sizeof(float) * {out.w});")
        c.close()

    def _dead_channels(self, c: _C, conv: Conv, out: FMap, res: FMap | None, dead: np.ndarray) -> None:
        """Output channels whose weights are all pruned: act(bias (+ residual)), nothing computed.
        Without a residual these planes are known now; a depthwise conv reading them then takes
        them from :attr:`known`."""
        if not len(dead):
            return
        if res is None:
            value = numpy_act(conv.act, conv.bias[dead].astype(np.float32))
            self.known.setdefault(conv.out, {}).update({int(o): np.full((out.h, out.w), v, np.float32) for o, v in zip(dead, value, strict=True)})
            if self._unread_known(conv.out):
                return
        DC = self.warr(dead.astype(np.int32), "const int32_t")
        DB = self.warr(conv.bias[dead].astype(np.float32), "const float")
        c.open(f"for (int j = tid; j < {len(dead)}; j += nth)")
        c(f"const int o = {DC}[j];")
        c.open(f"for (int y = 0; y < {out.h}; ++y)")
        c(f"float *d = dst + o * {out.plane} + y * {out.pitch};")
        if res is not None:
            c(f"const float *r = res + o * {res.plane} + y * {res.pitch};")
        c.open(f"for (int x = 0; x < {out.w}; ++x)")
        c(f"const float v = {DB}[j]{' + r[x]' if res is not None else ''};")
        c(f"d[x] = {scalar_act(conv.act)};")
        c.close()
        c.close()
        c.close()

    def dense_conv(self, fname: str, conv: Conv, inp: FMap, out: FMap, res: FMap | None, src: _Src) -> None:
        """Dense conv over the live channels only: output channels whose weights are all pruned
        are a constant plane, input channels no output reads are skipped (structured sparsity),
        and so are output channels no layer reads (:func:`needed_channels`)."""
        V, isa = self.V, self.isa
        cout, cin, kh, kw = conv.weight.shape
        taps = kh * kw
        needed = self.needed.get(conv.out, np.ones(cout, dtype=bool))
        live = np.asarray(conv.mask.reshape(cout, cin, taps).any(axis=-1)) & needed[:, None]
        outs = np.nonzero(live.any(axis=1))[0]
        ins = np.nonzero(live.any(axis=0))[0]
        nout, nin, all_in = len(outs), len(ins), len(ins) == cin
        n_vec = -(-out.w // V)
        ob, u, span = kr.dense_blocking(self.t, max(1, nout), n_vec, out.h)
        masked = out.w % V != 0
        # weights: per output-channel block [ci][tap][ob'] so each tap broadcasts consecutive floats
        w = conv.weight.reshape(cout, cin, taps)[np.ix_(outs, ins)].astype(np.float32)
        blocks = [(s, min(ob, nout - s)) for s in range(0, nout, ob)]
        packed = np.concatenate([w[s : s + n].transpose(1, 2, 0).reshape(-1) for s, n in blocks]) if blocks else np.zeros(0, np.float32)
        W = self.warr(packed, "const float")
        B = self.warr(conv.bias[outs].astype(np.float32), "const float")
        OCH = self.warr(outs.astype(np.int32), "const int32_t")
        KIN = None if all_in else self.warr(ins.astype(np.int32), "const int32_t")
        c = self.funcs
        # output rows in bands of ``span`` rows (more than one where a row is narrower than the
        # tile's vectors), the remainder in one band of fewer; out.h >= span by the blocking rule
        full = out.h - out.h % span
        bands = [(f"for (int yo = 0; yo < {full}; yo += {span})", span)]
        if out.h % span:
            bands.append((f"for (int yo = {full}; yo < {out.h}; yo += {out.h % span})", out.h % span))
        row_tiles = kr.row_tiles(n_vec, u, masked)
        variants = sorted({(n, tw, tm, sp) for _, n in blocks for _, tw, tm in row_tiles for _, sp in bands})
        tiles = {v: kr.lookup(self.base, kr.DENSE, *v[:3], isa=isa.name, span=v[3]) for v in variants}
        symbol = {v: k.symbol(fname, f"{kh}x{kw}") for v, k in tiles.items()}
        for n, tw, tm, sp in variants:
            c.open(
                f"static inline BP_INLINE void {symbol[n, tw, tm, sp]}(float *restrict op, "
                f"const float *restrict sb, const float *restrict rp, const float *restrict w, "
                f"const float *restrict bias, const int32_t *restrict och"
                f"{'' if all_in else ', const int32_t *restrict kin'}{f', {isa.vi} mk' if tm else ''})"
            )
            for o in range(n):
                c(f"float *restrict o{o} = op + och[{o}] * {out.plane};")
                if res is not None:
                    c(f"const float *restrict r{o} = rp + och[{o}] * {res.plane};")
            # accumulator v of a channel: output row v // tw of the tile, vector v % tw of that row
            pos = [(v // tw, v % tw) for v in range(sp * tw)]
            accs = [
                (f"a{o}_{v}", f"o{o} + {y * out.pitch + x * V}", f"r{o} + {y * res.pitch + x * V}" if res is not None else None)
                for o in range(n)
                for v, (y, x) in enumerate(pos)
            ]
            for o in range(n):
                c(f"{isa.vf} {', '.join(f'a{o}_{v} = ' + isa.bcast.format(x=f'bias[{o}]') for v in range(len(pos)))};")
            c.open(f"for (int i = 0; i < {nin}; ++i, w += {taps * n})")
            c(f"const float *s = sb + {'i' if all_in else 'kin[i]'} * {src.cs};")
            for t, off in enumerate(src.taps):
                c.open("")
                loads = [isa.load.format(p=f"s + {off + y * src.rs + x * V}") for y, x in pos]
                self._dense_tap(c, loads, [f"w[{t * n + o}]" for o in range(n)])
                c.close()
            c.close()
            # a masked tile masks the last vector of every row it spans
            masked_accs = frozenset(f"a{o}_{v}" for o in range(n) for v, (_, x) in enumerate(pos) if tm and x == tw - 1)
            _epilogue(c, isa, accs, conv.act, masked_accs.__contains__)
            for name, addr, _ in accs:
                c(isa.store.format(p=addr, v=name))
            c.close()
        c.open(f"static void {fname}(bp_model *m, int tid, int nth)")
        c("const float *src = " + (src.base if src.phase is None else "m->scratch") + ";")
        c(f"float *restrict dst = {self.buf(conv.out)} + {out.origin};")
        c(f"const float *restrict res = {self._residual(conv, res)};")
        c(f"const float *restrict W = {W};")
        c(f"const float *restrict B = {B};")
        c(f"const int32_t *restrict OCH = {OCH};")
        if KIN:
            c(f"const int32_t *restrict KIN = {KIN};")
        self._mask_decl(c, out)
        # blocks dealt round-robin to the threads; the remainder block to the next thread in turn
        n_full = nout // ob
        rest = nout % ob
        groups = []
        if n_full:
            groups.append((f"for (int j = tid; j < {n_full}; j += nth)", ob))
        if rest:
            groups.append((f"if (tid == {n_full} % nth)", rest))
        # Loop order by what would be fetched again: with the rows inside, every block re-reads
        # the whole input (for a large map, from beyond L2); with the rows outside, every row
        # re-reads the weights. Whichever is smaller is the one re-read.
        rows_outside = nout * nin * taps <= nin * src.cs

        def block(head: str, n: int) -> None:
            c.open(head)
            c(f"const int s = {'j * ' + str(ob) if n == ob and n_full else str(n_full * ob)};")
            c(f"const float *wb = W + s * {nin * taps};")

        def band(sp: int, n: int) -> None:
            c(f"float *op = dst + yo * {out.pitch};")
            c(f"const float *sb = src + yo * {src.rs};")
            c(f"const float *rp = res ? res + yo * {res.pitch if res else 0} : NULL;")
            for x0, tw, tm in row_tiles:
                args = [f"op + {x0 * V}", f"sb + {x0 * V}", f"rp ? rp + {x0 * V} : NULL", "wb", "B + s", "OCH + s"]
                args += [] if all_in else ["KIN"]
                args += ["mk"] if tm else []
                c(f"{symbol[n, tw, tm, sp]}({', '.join(args)});")

        def by_channels() -> None:
            for head, n in groups:
                block(head, n)
                for head_y, sp in bands:
                    c.open(head_y)
                    band(sp, n)
                    c.close()
                c.close()

        if rows_outside:
            # Split by rows: each thread reads its own rows of the input (the larger operand)
            # and all the weights; split by channels, every thread would read the whole input.
            # The bands (the remainder band last) go in contiguous runs, one per thread; with
            # more threads than bands, by channels.
            n_bands = full // span
            slots = n_bands + (1 if out.h % span else 0)
            every = [(f"for (int j = 0; j < {n_full}; ++j)", ob)] if n_full else []
            every += [("", rest)] if rest else []
            c.open(f"if (nth <= {slots})")
            _thread_run(c, slots)
            runs = [(span, f"for (int yb = lo; yb < hi && yb < {n_bands}; ++yb)", f"yb * {span}")]
            runs.append((out.h % span, f"if (hi > {n_bands})", str(full)))
            for sp, head_y, yo in runs:
                if not sp:
                    continue
                c.open(head_y)
                c(f"const int yo = {yo};")
                for head, n in every:
                    block(head, n)
                    band(sp, n)
                    c.close()
                c.close()
            c.close()
            c.open("else")
            by_channels()
            c.close()
        else:
            by_channels()
        self._dead_channels(c, conv, out, res, np.setdiff1d(np.nonzero(needed)[0], outs))
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
                int(live.sum()),
                int(conv.mask[needed].sum()) * out.h * out.w,
                None,
                f"ob{ob} u{u}" + (f" y{span}" if span > 1 else "") + ("" if nout == cout and all_in else f" out{nout}/{cout} in{nin}/{cin}"),
                tuple(k.name for k in tiles.values()),
            )
        )

    def _dense_tap(self, c: _C, loads: list[str], weights: list[str]) -> None:
        """One tap of a dense tile: FMAs of ``len(weights)`` channels x ``len(loads)`` vectors,
        holding the fewer of the two operands (input vectors or broadcast weights) in registers
        for the whole tap and streaming the other, so ``min(n, tw) + 1 + n * tw`` registers are
        live. A streamed input vector is pinned (``keep``): left alone the compiler folds a load
        of it into every FMA, which on a machine with fewer load ports than FMA ports makes the
        tile load-bound."""
        isa = self.isa
        n, tw = len(weights), len(loads)
        if tw <= n:
            c(f"const {isa.vf} {', '.join(f'x{v} = {x}' for v, x in enumerate(loads))};")
            for o, w in enumerate(weights):
                c(f"const {isa.vf} w{o} = {isa.bcast.format(x=w)};")
                c(" ".join(isa.fma.format(acc=f"a{o}_{v}", a=f"x{v}", b=f"w{o}") for v in range(tw)))
            return
        c(f"const {isa.vf} {', '.join(f'w{o} = ' + isa.bcast.format(x=w) for o, w in enumerate(weights))};")
        keep = " " + isa.keep.format(v="x") if n > 1 else ""
        for v, x in enumerate(loads):
            fmas = " ".join(isa.fma.format(acc=f"a{o}_{v}", a="x", b=f"w{o}") for o in range(n))
            c(f"{{ {isa.vf} x = {x};{keep} {fmas} }}")

    def sparse_conv(self, fname: str, conv: Conv, inp: FMap, out: FMap, res: FMap | None, src: _Src) -> None:
        """Pattern-sparse kernels (3x3, or depthwise of any size: one kernel per filter, reading
        its own channel). Filters are dealt round-robin to the threads (they are sorted by kernel
        count, so each thread gets a similar share); per (block, filter) tables say where its
        counts, channel indices and weights start, so any thread can start anywhere.

        A depthwise filter whose input plane is known (a pruned row of the 1x1 conv before) has
        a known output plane: it is not computed, and stored only if a reader loads it."""
        V, o = self.V, self.o
        whole = conv
        co, ci0, kh0, kw0 = (int(d) for d in conv.weight.shape)
        shape = (co, ci0, kh0, kw0)
        needed = self.needed.get(conv.out, np.ones(co, dtype=bool))
        known = {}
        if _reads_known(conv, conv.inp):
            planes = self.known.get(conv.inp, {})
            known = {ch: _depthwise_plane(planes[ch], conv, ch, out.h, out.w) for ch in sorted(planes) if needed[ch]}
        keep = np.setdiff1d(np.nonzero(needed)[0], np.array(sorted(known), dtype=np.int64))
        reduced = len(keep) < co
        if reduced:
            if not len(keep):
                c = self.funcs
                c.open(f"static void {fname}(bp_model *m, int tid, int nth)")
                c(f"float *restrict dst = {self.buf(conv.out)} + {out.origin};")
                self._known_planes(c, conv.out, out, known)
                c.close()
                c()
                kind = "depthwise" if conv.depthwise else "sparse3x3"
                self.reports.append(LayerReport(conv.name, kind, shape, conv.stride[0], (out.h, out.w), 0, 0, 0, None, f"live0/{co}"))
                return
            conv = replace(conv, weight=conv.weight[keep], bias=conv.bias[keep], mask=conv.mask[keep])
        cout, cin, kh, kw = conv.weight.shape
        taps = kh * kw
        ps = pat.kernel_patterns(conv.mask, o.max_patterns)
        n_vec = -(-out.w // V)
        shifts = _column_shifts(src, out.w, n_vec, V) if o.lre and not conv.depthwise else ()
        shifted_rows = kr.shifted_blocking(self.t, out.h, n_vec, len(shifts)) if shifts else None
        if shifted_rows is None:
            shifts = ()
            r, u = kr.sparse_blocking(self.t, out.h, n_vec, o.lre)
        else:
            r, u = shifted_rows, n_vec
        op = kr.SHIFTED if shifts else kr.SPARSE
        masked = out.w % V != 0
        s = conv.stride[0]
        if src.phase is not None:  # input rows of one band, in every copy
            slab = (s * (r - 1) + kh) * src.phase.copies * src.phase.pitch * 4
        else:
            slab = (r - 1 + kh) * src.rs * 4
        if s > 1:
            kernels = int((ps.ids >= 0).sum())
            lanes = sum(len(ps.patterns[p]) * int(n) for p, n in enumerate(ps.count()))  # kept taps
            cb = kr.strided_channel_block(self.t, cin, slab, kernels / max(1, cout * cin), lanes / max(1, kernels) * r * u)
        else:
            # Measured on the host: stride-1 tiles reuse rows and tolerate a slab in L2, and there
            # blocks of >= 32 channels (fewer accumulator round trips) won.
            cb = kr.even_parts(cin, max(32, self.t.l1_bytes // max(1, slab)))
        sw = pat.pack(conv.weight, ps, cb, reorder=o.reorder, compact=o.compact, depthwise=conv.depthwise)
        if reduced:  # filter slots (and a depthwise filter's channel) name the whole conv's channels
            sw = replace(sw, perm=keep[sw.perm].astype(np.int32), kci=(keep[sw.kci] if conv.depthwise else sw.kci).astype(np.uint16))
        n_pat = len(ps.patterns)
        n_blocks = len(sw.blocks)
        per = n_pat if o.reorder else 1
        counts = sw.counts.reshape(n_blocks, cout, per).astype(np.int64)
        nk = counts.sum(axis=2).reshape(-1)
        plen = np.array([len(p) for p in ps.patterns] or [0], dtype=np.int64)
        if o.reorder:
            nw = (counts * plen[None, None, :]).sum(axis=2).reshape(-1)
        else:
            nw = np.zeros_like(nk)
            kp_all = sw.kpat.astype(np.int64)
            starts = np.concatenate([[0], np.cumsum(nk)])
            for q in range(len(nk)):
                nw[q] = int(plen[kp_all[starts[q] : starts[q + 1]]].sum()) if nk[q] else 0
        koff = np.concatenate([[0], np.cumsum(nk)[:-1]]).astype(np.uint32)
        woff = np.concatenate([[0], np.cumsum(nw)[:-1]]).astype(np.uint32)
        CNT = self.warr(sw.counts.reshape(-1), "const uint16_t")
        KCI = self.warr(sw.kci, "const uint16_t")
        KPAT = self.warr(sw.kpat, "const uint8_t") if not o.reorder else None
        KW = self.warr(sw.weights, "const float")
        BIAS = self.warr(whole.bias.astype(np.float32), "const float")
        PERM = self.warr(sw.perm.astype(np.int32), "const int32_t")
        KOFF = self.warr(koff, "const uint32_t")
        WOFF = self.warr(woff, "const uint32_t") if o.compact else None
        c = self.funcs
        rows_variants = [r] + ([out.h % r] if out.h % r else [])
        variants = sorted({(rr, tw, tm) for rr in rows_variants for _, tw, tm in kr.row_tiles(n_vec, u, masked)})
        tiles = {v: kr.lookup(self.base, op, *v, isa=self.isa.name, sets=max(1, len(shifts))) for v in variants}
        symbol = {v: k.symbol(fname, f"_p{n_pat}") for v, k in tiles.items()}
        for rr, tw, tm in variants:
            self._sparse_tile(symbol[rr, tw, tm], rr, tw, tm, ps, src, out, res, conv.act, taps, shifts)
        split_here = src.phase is not None and conv.depthwise
        if split_here and int(nk.max(initial=0)) > 1:
            raise CodegenError(f"layer {conv.name}: a depthwise filter with more than one kernel")
        c.open(f"static void {fname}(bp_model *m, int tid, int nth)")
        if split_here:
            c("float *scratch = m->scratch;")
            c(f"const float *src = scratch + tid * {src.cs};")
            c("static const uint16_t CI0[1] = {0};  /* the filter's channel sits at its planes' start */")
        else:
            c(f"const float *src = {src.base if src.phase is None else 'm->scratch'};")
        c(f"float *restrict dst = {self.buf(conv.out)} + {out.origin};")
        c(f"const float *restrict res = {self._residual(conv, res)};")
        c(f"const uint16_t *restrict CNT = {CNT};")
        if not split_here:
            c(f"const uint16_t *restrict KCI = {KCI};")
        if KPAT:
            c(f"const uint8_t *restrict KPAT = {KPAT};")
        c(f"const float *restrict KW = {KW};")
        c(f"const float *restrict BIAS = {BIAS};")
        c(f"const int32_t *restrict PERM = {PERM};")
        if KPAT or not split_here:
            c(f"const uint32_t *restrict KOFF = {KOFF};")
        if WOFF:
            c(f"const uint32_t *restrict WOFF = {WOFF};")
        if n_blocks > 1:
            totals = counts.sum(axis=2)
            first = np.array([int(np.argmax(totals[:, f] > 0)) if totals[:, f].any() else n_blocks - 1 for f in range(cout)], dtype=np.uint16)
            c(f"const uint16_t *restrict FIRST = {self.warr(first, 'const uint16_t')};")
        # Threads dealt filters take contiguous runs of them of even work: filters are sorted
        # within chunks of output channels (``patterns.FILTER_CHUNKS``), so a run writes its own
        # range of output planes. Dealt round-robin, the two cores would write interleaved planes
        # (the lines where planes meet, and the line pairs the L2 prefetches, shared).
        work = nw.reshape(n_blocks, cout).sum(axis=0).astype(np.int64) + 4 * n_blocks  # taps, plus a tile call per block
        cum = np.concatenate([[0], np.cumsum(work)]).astype(np.uint32)
        c(f"const uint32_t *restrict CUM = {self.warr(cum, 'const uint32_t')};")
        c(f"const int flo = bp_work_bound(CUM, {cout}, tid, nth), fhi = bp_work_bound(CUM, {cout}, tid + 1, nth);")
        self._mask_decl(c, out)
        full = out.h - out.h % r
        bands = [("loop", full, r)] + ([("one", full, out.h % r)] if out.h % r else [])
        n_full = full // r
        slots = len(bands) - 1 + n_full

        def band(rr: int, filters: str | None) -> None:
            """One band of ``rr`` rows at ``yb``: every channel block, and with ``filters`` the
            filters it names ("dealt": this thread's, "all"; else the enclosing loop's ``f``)."""
            c.open(f"for (int b = 0; b < {n_blocks}; ++b)")
            if filters:
                c.open("for (int f = flo; f < fhi; ++f)" if filters == "dealt" else f"for (int f = 0; f < {cout}; ++f)")
            c(f"const int o = PERM[f], q = b * {cout} + f;")
            c(f"const uint16_t *cnt = CNT + q * {per}, *ci = {'CI0' if split_here else 'KCI + KOFF[q]'};")
            if KPAT:
                c("const uint8_t *kp = KPAT + KOFF[q];")
            c(f"float *op = dst + o * {out.plane} + yb * {out.pitch};")
            c(f"const float *sb = src + yb * {src.rs};")
            c(f"const float *rp = res ? res + o * {res.plane if res else 0} + yb * {res.pitch if res else 0} : NULL;")
            if o.compact:
                wf = "KW + WOFF[q]"
            else:
                wf = "KW" if conv.depthwise else f"KW + o * {cin * taps}"
            c(f"const int nk = {' + '.join(f'cnt[{p}]' for p in range(per))};")
            if n_blocks > 1:
                # blocks before the filter's first kernel, and empty middle blocks, do nothing
                c(f"const int first = b == FIRST[f], last = b == {n_blocks - 1};")
                c("if (b < FIRST[f] || (!nk && !first && !last)) continue;")
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
            if filters:
                c.close()
            c.close()

        def band_run(filters: str | None) -> None:
            """This thread's run ``[lo, hi)`` of band slots (full bands, then the remainder)."""
            c.open(f"for (int yi = lo; yi < hi && yi < {n_full}; ++yi)")
            c(f"const int yb = yi * {r};")
            band(r, filters)
            c.close()
            if out.h % r:
                c.open(f"if (hi > {n_full})")
                c(f"const int yb = {full};")
                band(out.h % r, filters)
                c.close()

        def all_bands(filters: str | None) -> None:
            for kind, a, rr in bands:
                if kind == "loop":
                    c.open(f"for (int yb = 0; yb < {a}; yb += {rr})")
                else:
                    c.open("")
                    c(f"const int yb = {a};")
                band(rr, filters)
                c.close()

        # A depthwise filter reads only its own channel: all its bands in a row keep that channel
        # in cache (bands outside, each filter would fetch its channel's rows once per band, and
        # a strided layer's phase planes are several MB); other convs share each band's slab
        # between all filters, so there the bands are outside.
        if conv.depthwise:
            # Stride 1: each thread takes a run of bands of every channel, the rows the layers
            # before and after (split by rows where their input is the larger operand) have in
            # its cache; dealt by filters, half of each thread's input would come from the other
            # core. With more threads than bands, and for a strided filter that makes its own
            # phase planes, by filters.
            by_rows = not split_here and slots > 1
            if by_rows:
                c.open(f"if (nth <= {slots})")
                _thread_run(c, slots)
                c.open(f"for (int f = 0; f < {cout}; ++f)")
                band_run(None)
                c.close()
                c.close()
                c.open("else")
            c.open("for (int f = flo; f < fhi; ++f)")
            if split_here:
                _emit_phase_split(c, conv, inp, src, self.buf(conv.inp), channel="PERM[f]")
            all_bands(None)
            c.close()
            if by_rows:
                c.close()
        elif slots >= 2 * ROW_SPLIT_PER_THREAD:
            # Enough bands for an even share each: a thread takes a run of bands of all filters,
            # rows the layer before wrote from this core (dealt by filters, half of every input
            # channel would come from the other core's cache).
            c.open(f"if (nth * {ROW_SPLIT_PER_THREAD} <= {slots})")
            _thread_run(c, slots)
            band_run("all")
            c.close()
            c.open("else")
            all_bands("dealt")
            c.close()
        else:
            all_bands("dealt")
        if known:
            self._known_planes(c, conv.out, out, known)
        c.close()
        c()
        kernels = int((ps.ids >= 0).sum())
        self.reports.append(
            LayerReport(
                conv.name,
                "depthwise" if conv.depthwise else "sparse3x3",
                shape,
                s,
                (out.h, out.w),
                n_pat,
                kernels,
                int(sum(len(ps.patterns[p]) * int(n) for p, n in enumerate(ps.count()))) * out.h * out.w,
                pat.storage_sizes(conv.mask, ps),
                f"r{r} u{u} cb{cb}" + (f" live{cout}/{co}" if reduced else ""),
                tuple(k.name for k in tiles.values()),
            )
        )

    def _sparse_tile(
        self,
        symbol: str,
        rr: int,
        tw: int,
        tm: bool,
        ps: pat.PatternSet,
        src: _Src,
        out: FMap,
        res: FMap | None,
        act: Act | None,
        n_taps: int,
        shifts: tuple[int, ...] = (),
    ) -> None:
        """One register tile. With ``shifts`` (a whole row's vectors) a tap whose
        offset is ``shift`` columns off a vector boundary feeds that shift's accumulator set from
        the aligned load instead of a misaligned one; the sets are shifted into the output lanes
        once, before the epilogue (the input's zero border is the lanes shifted in at the row's
        ends)."""
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
        side = [sh for sh in shifts if sh != 0]

        def acc(sh: int, y: int, v: int) -> str:
            return f"a{y}_{v}" if sh == 0 else f"a{y}_{v}{'m' if sh < 0 else 'p'}{abs(sh)}"

        if side:
            c(f"{isa.vf} {', '.join(f'{acc(sh, y, v)} = {isa.zero.format()}' for sh in side for y in range(rr) for v in range(tw))};")
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
                sh = _shift(src.taps[t], V) if shifts else 0
                for y in range(rr):
                    for v in range(tw):
                        off = y * src.rs + v * V + src.taps[t] - sh
                        key = off if o.lre else n
                        n += 1
                        if key not in loads:
                            loads[key] = []
                            order.append(key)
                        loads[key].append((acc(sh, y, v), j, off))
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
                    c(f"const float *wk = w + (int)ci[0] * {n_taps};")
                    body(p, lambda j, t: f"wk[{t}]")
                c.close()
        else:
            c.open("for (int k = cnt[0]; k > 0; --k, ++ci, ++kp)")
            if not o.compact:
                c(f"const float *wk = w + (int)ci[0] * {n_taps};")
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
        if side:
            c(f"const {isa.vf} z = {isa.zero.format()};")
        for sh in side:
            # output lane l of vector v takes lane l + sh of the set's row (vectors v - 1, v, v + 1)
            for y in range(rr):
                for v in range(tw):
                    if sh > 0:
                        a, b, lo = acc(sh, y, v), acc(sh, y, v + 1) if v + 1 < tw else "z", sh
                    else:
                        a, b, lo = acc(sh, y, v - 1) if v > 0 else "z", acc(sh, y, v), V + sh
                    lanes = ", ".join(str(lo + lane) for lane in range(V))
                    c(isa.add.format(acc=acc(0, y, v), a=isa.window.format(a=a, b=b, idx=lanes)))
        c.open("if (last)")
        _epilogue(c, isa, accs, act, lambda name: tm and name.endswith(f"_{tw - 1}"))
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
        c.open(f"static void layer{i}(bp_model *m, int tid, int nth)")
        c(f"const float *restrict src = {self.buf(layer.inp)} + {inp.origin};")
        c(f"float *restrict dst = {self.buf(layer.out)} + {out.origin};")
        # per tap column: the output range whose input column is inside the map
        lo = [max(0, -(-(pw - kx) // sw)) for kx in range(kw)]
        hi = [min(out.w, (inp.w - 1 + pw - kx) // sw + 1) for kx in range(kw)]
        c(f"static const int xlo[{kw}] = {{{', '.join(map(str, lo))}}}, xhi[{kw}] = {{{', '.join(map(str, hi))}}};")
        # each thread a run of output rows of every channel: the rows of the conv before (split
        # by rows) and after (pattern-sparse convs take runs of bands) in this core's cache
        _thread_run(c, out.h)
        c.open(f"for (int ch = 0; ch < {out.c}; ++ch)")
        c(f"const float *ip = src + ch * {inp.plane};")
        c.open("for (int yo = lo; yo < hi; ++yo)")
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
        c.open(f"static void layer{i}(bp_model *m, int tid, int nth)")
        c(f"const float *restrict src = {self.buf(layer.inp)} + {inp.origin};")
        c(f"float *restrict dst = {self.buf(layer.out)} + {out.origin};")
        c.open(f"for (int ch = tid; ch < {out.c}; ch += nth)")
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
        c.open(f"static void layer{i}(bp_model *m, int tid, int nth)")
        c(f"float *restrict dst = {self.buf(layer.out)};")
        if isinstance(inp, Vec):
            c(f"if (tid == 0) memcpy(dst, {self.buf(layer.inp)}, sizeof(float) * {inp.n});")
        else:
            c(f"const float *restrict src = {self.buf(layer.inp)} + {inp.origin};")
            c(f"for (int ch = tid; ch < {inp.c}; ch += nth)")
            c(f"    for (int y = 0; y < {inp.h}; ++y)")
            c(f"        memcpy(dst + (ch * {inp.h} + y) * {inp.w}, src + ch * {inp.plane} + y * {inp.pitch}, sizeof(float) * {inp.w});")
        c.close()
        c()

    def linear(self, i: int, layer: Linear) -> None:
        """Dot products over the live columns only (input features some output reads, gathered
        into scratch first); outputs whose rows are all pruned are act(bias)."""
        n_out, n_in = layer.weight.shape
        V = self.V
        rows = np.nonzero(layer.mask.any(1))[0]
        cols = np.nonzero(layer.mask.any(0))[0]
        gather = len(cols) != n_in
        stride = _round_up(len(cols), V)
        w = np.zeros((len(rows), stride), np.float32)
        w[:, : len(cols)] = layer.weight[np.ix_(rows, cols)]
        W = self.warr(w, "const float")
        B = self.warr(layer.bias.astype(np.float32), "const float")
        ROW = self.warr(rows.astype(np.int32), "const int32_t")
        c = self.funcs
        if gather:
            self.scratch = max(self.scratch, stride)
            COL = self.warr(cols.astype(np.int32), "const int32_t")
            c.open(f"static void layer{i}_gather(bp_model *m, int tid, int nth)")
            c("if (tid) return;")
            c(f"const float *restrict x = {self.buf(layer.inp)};")
            c(f"const int32_t *restrict COL = {COL};")
            c(f"for (int k = 0; k < {len(cols)}; ++k) m->scratch[k] = x[COL[k]];")
            c(f"for (int k = {len(cols)}; k < {stride}; ++k) m->scratch[k] = 0.0f;")
            c.close()
            c()
            self.steps.append((i, f"layer{i}_gather"))
        c.open(f"static void layer{i}(bp_model *m, int tid, int nth)")
        c(f"const float *restrict x = {'m->scratch' if gather else self.buf(layer.inp)};")
        c(f"float *restrict y = {self.buf(layer.out)};")
        c(f"const float *restrict W = {W};")
        c(f"const float *restrict B = {B};")
        c(f"const int32_t *restrict ROW = {ROW};")
        isa = self.isa
        # Rows in groups of LINEAR_ROWS: one accumulator chain per row, as many chains as the
        # group in flight and each input vector loaded once for all of them (a row's own sum is
        # the one-row order, so the bits do not change). Threads take contiguous runs of groups
        # (then of the leftover rows), each streaming its own part of the weights.
        n_rows = len(rows)
        G = n_rows // LINEAR_ROWS
        units = G + n_rows % LINEAR_ROWS
        if units:
            _thread_run(c, units)

        def dot(n: int) -> None:
            for r in range(n):
                c(f"{isa.vf} a{r} = {isa.zero.format()};")
            c.open(f"for (int i = 0; i < {stride}; i += {V})")
            c(f"const {isa.vf} xv = {isa.load.format(p='x + i')};")
            for r in range(n):
                c(isa.fma.format(acc=f"a{r}", a=isa.load.format(p=f"W + (j + {r}) * {stride} + i"), b="xv"))
            c.close()
            for r in range(n):
                c.open("")
                c(f"float v = B[ROW[j + {r}]];")
                c(isa.hsum.format(n=V, s="v", v=f"a{r}"))
                c(f"y[ROW[j + {r}]] = {scalar_act(layer.act)};")
                c.close()

        if G:
            c.open(f"for (int g = lo; g < hi && g < {G}; ++g)")
            c(f"const int j = g * {LINEAR_ROWS};")
            dot(LINEAR_ROWS)
            c.close()
        if n_rows % LINEAR_ROWS:
            c.open(f"for (int g = lo > {G} ? lo : {G}; g < hi; ++g)")
            c(f"const int j = {G * LINEAR_ROWS} + (g - {G});")
            dot(1)
            c.close()
        dead = np.setdiff1d(np.arange(n_out), rows)
        if len(dead):
            DR = self.warr(dead.astype(np.int32), "const int32_t")
            c.open(f"for (int j = tid; j < {len(dead)}; j += nth)")
            c(f"const float v = B[{DR}[j]];")
            c(f"y[{DR}[j]] = {scalar_act(layer.act)};")
            c.close()
        c.close()
        c()
        self.steps.append((i, f"layer{i}"))

    def elementwise(self, i: int, layer: Add | Mul | Activation) -> None:
        """Add (with its activation), product (same shape or one factor per channel) or a lone
        activation, channel planes dealt round-robin to the threads."""
        lay = self.layouts[layer.out]
        c = self.funcs
        names = [layer.inp] if isinstance(layer, Activation) else [layer.a, layer.b]
        act = None if isinstance(layer, Mul) else layer.act
        op = " * " if isinstance(layer, Mul) else " + "
        c.open(f"static void layer{i}(bp_model *m, int tid, int nth)")
        if isinstance(lay, Vec):
            ptrs = [f"{self.buf(n)}" for n in names]
            c.open(f"for (int k = tid; k < {lay.n}; k += nth)")
            c(f"float v = {op.join(p + '[k]' for p in ptrs)};")
            c(f"{self.buf(layer.out)}[k] = {scalar_act(act)};")
            c.close()
        else:
            ins = [self.fmap(n, layer) for n in names]
            c.open(f"for (int ch = tid; ch < {lay.c}; ch += nth)")
            c.open(f"for (int y = 0; y < {lay.h}; ++y)")
            c(f"float *d = {self.buf(layer.out)} + {lay.origin} + ch * {lay.plane} + y * {lay.pitch};")
            terms = []
            for j, (n, f) in enumerate(zip(names, ins, strict=True)):
                if (f.h, f.w) == (lay.h, lay.w):
                    c(f"const float *s{j} = {self.buf(n)} + {f.origin} + ch * {f.plane} + y * {f.pitch};")
                    terms.append(f"s{j}[x]")
                else:  # one value per channel
                    c(f"const float g{j} = {self.buf(n)}[{f.origin} + ch * {f.plane}];")
                    terms.append(f"g{j}")
            c.open(f"for (int x = 0; x < {lay.w}; ++x)")
            c(f"float v = {op.join(terms)};")
            c(f"d[x] = {scalar_act(act)};")
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
            Mul: self.elementwise,
            Activation: self.elementwise,
        }
        for i, layer in enumerate(self.g.layers):
            dispatch[type(layer)](i, layer)
            if not self.steps or self.steps[-1][0] != i:  # layers with a single step
                self.steps.append((i, f"layer{i}"))
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
        """``bp_forward``: copy one image into the bordered input (unless the first layer reads
        it in place), run the layers, copy out."""
        c = _C()
        inp = self.layouts[self.g.input]
        outl = self.layouts[self.g.output]
        c.open("static void bp_forward(bp_model *m, const float *in, float *out)")
        c("m->in = in;")
        if isinstance(inp, FMap) and not self.raw_input:
            c(f"for (int ch = 0; ch < {inp.c}; ++ch)")
            c(f"    for (int y = 0; y < {inp.h}; ++y)")
            c(
                f"        memcpy(m->buf[0] + {inp.origin} + ch * {inp.plane} + y * {inp.pitch}, "
                f"in + (ch * {inp.h} + y) * {inp.w}, sizeof(float) * {inp.w});"
            )
        elif isinstance(inp, Vec):
            c(f"memcpy(m->buf[0], in, sizeof(float) * {inp.n});")
        for i, step in self.steps:
            c(f"BP_TIC(); bp_parallel(m, {step}); BP_TOC({i});")
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
            THREADS=self.o.threads,
            MAX_THREADS=MAX_THREADS,
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
    """The vector types and helpers of ``isa`` (its prelude template), with its lane-mask table,
    then those of its narrow flavour (same template, names suffixed) where it has one."""
    keep = f'__asm__("" : "+{isa.vreg}"(v))' if isa.vreg else "((void)0)"
    text = render_template(
        isa.prelude,
        S=isa.suffix,
        VBYTES=4 * isa.vec,
        LANES=isa.vec,
        KEEP=keep,
        MASK_LEN=2 * isa.vec,
        LANE_MASK=", ".join(["-1"] * isa.vec + ["0"] * isa.vec),
    )
    return text + (render_vector_prelude(isa.narrow) if isa.narrow is not None else "")


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
