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
NEON, so aarch64 gets 128-bit vectors and about 12 accumulators; the host (AVX2/AVX-512VL, 32
vector registers with VL) gets 256-bit vectors and 16 accumulators.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass


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
    mask: str = "{v} = (vf)((vi){v} & {m});"  # zero the lanes past a row's end
    load_mask: str = "*(const viu *)({p})"  # a lane mask from ``bp_lane_mask``
    keep: str = "BP_KEEP({v});"  # pin a shared load in a register
    hsum: str = "for (int l = 0; l < {n}; ++l) {s} += {v}[l];"


AVX2 = VectorIsa(name="avx2", vec=8, vreg="x")
NEON = VectorIsa(name="neon", vec=4, vreg="w")

ISAS: dict[str, VectorIsa] = {i.name: i for i in (AVX2, NEON)}


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

    @property
    def vec(self) -> int:
        """Floats per vector register (the layouts' row pitch is a multiple of it)."""
        return self.isa.vec

    def missing(self) -> list[str]:
        """Debian packages whose executables are absent on this machine."""
        return [pkg for exe, pkg in self.packages if shutil.which(exe) is None]


HOST = Target(
    name="host",
    cc="cc",
    cflags=("-O3", "-march=native", "-ffp-contract=fast"),
    isa=AVX2,
    accumulators=16,
    max_u=4,
    dense_acc=24,
    dense_u=4,
    l1_bytes=32 * 1024,
    run_prefix=(),
    static=False,
    packages=(("cc", "gcc"),),
)

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

TARGETS: dict[str, Target] = {t.name: t for t in (HOST, AARCH64_NEON)}
