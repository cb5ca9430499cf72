"""Per-target data: vector width, register budget, blocking, compiler and how to run a binary.

Targets differ only in data (like tinygrad's renderers and XNNPACK's per-ISA template parameters):
the emitter never branches on a target's name. The numbers come from the prototype measurements
in the issue: x86 blocking spilled registers on NEON, so aarch64 gets 128-bit vectors and about
12 accumulators; the host (AVX2/AVX-512VL, 32 vector registers with VL) gets 256-bit vectors and
16 accumulators.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    name: str
    cc: str                      # default C compiler
    cflags: tuple[str, ...]
    vec: int                     # floats per vector register
    accumulators: int            # output vectors kept in registers by a pattern-sparse tile
    max_u: int                   # vectors along the width in one tile
    dense_acc: int               # accumulators of a dense tile (output channels x width vectors)
    dense_u: int                 # width vectors per dense tile (at most)
    l1_bytes: int                # input slab budget for input-channel blocking
    run_prefix: tuple[str, ...]  # how to execute a built binary (emulator)
    static: bool                 # link the harness statically (so an emulator needs no sysroot)
    packages: tuple[tuple[str, str], ...]  # (executable, Debian package) needed to build and run
    ar: str = "ar"
    vreg: str = ""               # inline-asm constraint of a vector register: pins a shared load in
                                 # a register so the compiler cannot fold it into each FMA again

    def missing(self) -> list[str]:
        """Debian packages whose executables are absent on this machine."""
        return [pkg for exe, pkg in self.packages if shutil.which(exe) is None]


HOST = Target(
    name="host", cc="cc", cflags=("-O3", "-march=native", "-ffp-contract=fast"), vec=8, accumulators=16,
    max_u=4, dense_acc=24, dense_u=4, l1_bytes=32 * 1024, run_prefix=(), static=False,
    packages=(("cc", "gcc"),), vreg="x",
)

AARCH64_NEON = Target(
    name="aarch64-neon", cc="aarch64-linux-gnu-gcc",
    cflags=("-O3", "-march=armv8.2-a", "-ffp-contract=fast"), vec=4, accumulators=12, max_u=3,
    dense_acc=12, dense_u=2, l1_bytes=24 * 1024, run_prefix=("qemu-aarch64",), static=True,
    packages=(("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"), ("qemu-aarch64", "qemu-user")), vreg="w",
    ar="aarch64-linux-gnu-ar",
)

TARGETS: dict[str, Target] = {t.name: t for t in (HOST, AARCH64_NEON)}
