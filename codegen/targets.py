"""Per-target data: vector flavour, register budget, blocking, compiler and how to run a binary.

Targets differ only in data (like tinygrad's renderers and XNNPACK's per-ISA template parameters):
the emitter never branches on a target's name. Two tables:

- :class:`VectorIsa`: the vector width in floats and how the C spells vector types and operations
  (load, store, broadcast, FMA, add, ReLU, lane mask, horizontal sum) plus the prelude template
  that defines them. NEON and AVX2 share the GCC-vector-extension spellings and differ in width
  and register constraint only. A scalable-vector target (RISC-V V at a fixed VLEN, or through
  ``__riscv_*`` intrinsics) is one more entry: its width, a prelude template of its own in
  ``templates/`` and the spellings that override the defaults.
- :class:`Target`: toolchain and the blocking budget measured for one machine class.

The numbers come from the prototype measurements in the issue: x86 blocking spilled registers on
NEON, so aarch64 gets 128-bit vectors and about 12 accumulators; an AVX2 host gets 256-bit vectors
and 16 accumulators, an AVX-512 host 512-bit vectors and 24 (32 zmm registers). ``host`` is the
widest of the host entries this CPU runs, picked from its flags when the generator is imported
(``host-avx2`` / ``host-avx512`` name one explicitly, and ``BP_HOST_TARGET`` forces ``host``).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class VectorIsa:
    """One vector flavour: width, kernel-name suffix and the C spellings the emitter formats.

    Below ``prelude``: two type names, then ``str.format`` templates (``p`` a pointer, ``v`` a
    vector, ``acc`` an accumulator, ``x``/``a``/``b`` operands, ``m`` a lane-mask vector, ``s`` a
    float, ``n`` the width). The defaults spell the GCC vector extensions and the helpers that
    ``gnu_vector.c.in`` defines; the emitter writes no vector syntax of its own.
    """

    name: str  # suffix of kernel names (XNNPACK style): "neon", "avx2"
    vec: int  # floats per vector register
    registers: int = 16  # architectural vector registers (a tile's live values must fit)
    suffix: str = ""  # appended to every name the prelude defines (a second flavour in one file)
    vreg: str = ""  # inline-asm constraint of a vector register: pins a shared load in a
    # register so the compiler cannot fold it into each FMA again
    prelude: str = "gnu_vector.c.in"  # template defining the types and helpers spelled below
    vf: str = "vf"  # vector of floats
    vi: str = "vi"  # vector of int32 (lane masks)
    zero: str = "{{0}}"  # an all-zero vector initialiser
    load: str = "ld({p})"
    store: str = "st({p}, {v});"
    bcast: str = "bc({x})"
    fma: str = "{acc} += {a} * {b};"
    add: str = "{acc} += {a};"
    relu: str = "{v} = relu({v});"
    clamp: str = "{v} = vclamp({v}, {lo}, {hi});"  # hardtanh / ReLU6
    hardswish: str = "{v} = vhswish({v});"
    hardsigmoid: str = "{v} = vhsigmoid({v});"
    sigmoid: str = "{v} = vsigmoid({v});"
    silu: str = "{v} = vsilu({v});"
    mask: str = "{v} = (vf)((vi){v} & {m});"  # zero the lanes past a row's end
    load_mask: str = "*(const viu *)({p})"  # a lane mask from ``bp_lane_mask``
    keep: str = "BP_KEEP({v});"  # pin a shared load in a register
    hsum: str = "for (int l = 0; l < {n}; ++l) {s} += {v}[l];"
    window: str = "__builtin_shufflevector({a}, {b}, {idx})"  # lanes idx of a's lanes then b's
    lane_mask: str = "bp_lane_mask"  # the prelude's table of lane masks
    narrow: VectorIsa | None = None  # a narrower flavour of the same machine, for narrow layers

    def activation(self, kind: str) -> str:
        """The spelling of activation ``kind`` (an ``ir.ACT_KINDS`` name) on vector ``v``."""
        text = getattr(self, kind, None)
        if not isinstance(text, str) or kind in ("name", "prelude"):
            raise ValueError(f"vector flavour {self.name} has no activation {kind!r}")
        return text


# the names the gnu_vector prelude defines, renamed (``vf`` -> ``vfh``) for a second flavour
_PRELUDE_NAMES = re.compile(r"\b(vf|vi|viu|ld|st|bc|relu|vclamp|vhswish|vhsigmoid|vsigmoid|vsilu|BP_KEEP|bp_lane_mask)\b")
_SPELLINGS: tuple[str, ...] = ("vf", "vi", "zero", "load", "store", "bcast", "fma", "add", "relu", "clamp", "hardswish", "hardsigmoid")
_SPELLINGS += ("sigmoid", "silu", "mask", "load_mask", "keep", "hsum", "lane_mask")


def suffixed(isa: VectorIsa, name: str, vec: int, suffix: str) -> VectorIsa:
    """``isa``'s spellings on the prelude's names with ``suffix`` appended, ``vec`` floats wide:
    the narrow flavour rendered next to the wide one in the same file."""
    renamed: dict[str, Any] = {f: _PRELUDE_NAMES.sub(lambda m: m[1] + suffix, getattr(isa, f)) for f in _SPELLINGS}
    return replace(isa, name=name, vec=vec, suffix=suffix, narrow=None, **renamed)


AVX2 = VectorIsa(name="avx2", vec=8, vreg="x")
# AVX-512VL runs 256-bit operations on the same 32 registers: maps at most 8 wide (the 7x7 stage
# of a ResNet, squeeze-excitation 1x1 maps) use them and waste 1/8 of the lanes instead of 9/16
AVX512_Y = suffixed(VectorIsa(name="", vec=8, registers=32, vreg="v"), "avx512y", 8, "h")
AVX512 = VectorIsa(name="avx512", vec=16, registers=32, vreg="v", narrow=AVX512_Y)
NEON = VectorIsa(name="neon", vec=4, registers=32, vreg="w")

ISAS: dict[str, VectorIsa] = {i.name: i for i in (AVX2, AVX512, NEON)}


@dataclass(frozen=True)
class Target:
    name: str
    cc: str  # default C compiler
    cflags: tuple[str, ...]
    isa: VectorIsa  # vector width and C spellings
    accumulators: int  # output vectors kept in registers by a pattern-sparse tile
    max_u: int  # vectors along the width in one tile
    dense_acc: int  # accumulators of a dense tile (output channels x width vectors)
    dense_u: int  # width vectors per dense tile (at most)
    l1_bytes: int  # input slab budget for input-channel blocking
    run_prefix: tuple[str, ...]  # how to execute a built binary (emulator)
    static: bool  # link the harness statically (so an emulator needs no sysroot)
    packages: tuple[tuple[str, str], ...]  # (executable, Debian package) needed to build and run
    ar: str = "ar"
    cpu_flags: tuple[str, ...] = ()  # /proc/cpuinfo flags the machine running the code needs
    # a pattern-sparse tile as wide as its row keeps one accumulator set per column shift of its
    # taps (three at stride 1, two on a strided conv's phase planes) and shifts them into place
    # once per tile: every input load is aligned and feeds every column's taps (where a
    # misaligned vector load splits a cache line, as every one does on a 64-byte vector, that
    # load is the tile's bottleneck)
    shift_sets: bool = False

    @property
    def vec(self) -> int:
        """Floats per vector register (the layouts' row pitch is a multiple of it)."""
        return self.isa.vec

    def missing(self) -> list[str]:
        """What this machine lacks to build and run the target: Debian packages whose
        executables are absent, and CPU features (each item says which it is)."""
        absent = [f"Debian package {pkg}" for exe, pkg in self.packages if shutil.which(exe) is None]
        flags = host_cpu_flags()
        return absent + [f"a CPU with {f}" for f in self.cpu_flags if f not in flags]


@cache
def host_cpu_flags() -> frozenset[str]:
    """This machine's CPU feature flags (empty where /proc/cpuinfo is unreadable)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


HOST_AVX2 = Target(
    name="host-avx2",
    cc="cc",
    # GCC's Zen tuning leaves a lone accumulator chain as separate multiplies and adds (lower
    # latency there); every a += w * x must be one FMA on every host, or a tile's shape (and
    # the CPU that built it) would change the bits
    cflags=("-O3", "-march=native", "-ffp-contract=fast", "--param=avoid-fma-max-bits=0"),
    isa=AVX2,
    accumulators=16,
    max_u=4,
    dense_acc=12,  # 16 ymm registers: 3 channels x 4 vectors + 3 broadcast weights + 1 input
    dense_u=4,
    l1_bytes=32 * 1024,
    run_prefix=(),
    static=False,
    packages=(("cc", "gcc"),),
    cpu_flags=("avx2", "fma"),
)

# 32 zmm registers: up to 24 accumulators leave room for the shared loads and broadcast weights
HOST_AVX512 = replace(HOST_AVX2, name="host-avx512", isa=AVX512, accumulators=24, dense_acc=24, dense_u=3, cpu_flags=("avx512f",), shift_sets=True)

HOST_TARGETS: tuple[Target, ...] = (HOST_AVX512, HOST_AVX2)  # widest first


def best_host(flags: frozenset[str] | None = None) -> Target:
    """The widest host target this CPU runs (``BP_HOST_TARGET=host-avx2`` etc. forces one);
    AVX2 where the flags are unknown, as before this choice existed."""
    forced = os.environ.get("BP_HOST_TARGET")
    if forced:
        for t in HOST_TARGETS:
            if t.name == forced:
                return t
        raise ValueError(f"BP_HOST_TARGET={forced} is not one of {', '.join(t.name for t in HOST_TARGETS)}")
    flags = host_cpu_flags() if flags is None else flags
    for t in HOST_TARGETS:
        if all(f in flags for f in t.cpu_flags):
            return t
    return HOST_AVX2


HOST = replace(best_host(), name="host")

AARCH64_NEON = Target(
    name="aarch64-neon",
    cc="aarch64-linux-gnu-gcc",
    cflags=("-O3", "-march=armv8.2-a", "-ffp-contract=fast"),
    isa=NEON,
    accumulators=12,
    max_u=3,
    dense_acc=12,
    dense_u=2,
    l1_bytes=24 * 1024,
    run_prefix=("qemu-aarch64",),
    static=True,
    packages=(("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"), ("qemu-aarch64", "qemu-user")),
    ar="aarch64-linux-gnu-ar",
)

TARGETS: dict[str, Target] = {t.name: t for t in (HOST, *HOST_TARGETS, AARCH64_NEON)}
