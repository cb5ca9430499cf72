"""Write, compile and run a generated library (host directly, aarch64 under qemu-aarch64).

The harness exchanges raw float32 little-endian files (n images back to back, NCHW, no header);
:func:`run_harness` writes the input, runs the binary (through the target's emulator when there is
one) and reads the result. :class:`HostLibrary` loads the shared library with ctypes so the
benchmark can interleave generated code with torch and ONNX Runtime in one process.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from .emit import MAX_THREADS, Generated
from .ir import CodegenError
from .targets import Target


class BuildError(CodegenError):
    """Compiler or harness failure (the message carries the tool's first error line)."""


def write_files(files: dict[str, bytes], out_dir: Path) -> None:
    """Write each file atomically (temp file in the same folder, then ``os.replace``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, out_dir / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _first_error(text: str) -> str:
    for line in text.splitlines():
        if "error" in line.lower():
            return line.strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "no output"


def compile_dir(out_dir: Path, target: Target, *, cc: str | None = None, shared: bool = False, profile: bool = False) -> Path:
    """Build the harness (and with ``shared`` the .so) in ``out_dir``; returns the harness path.

    ``profile`` defines BP_PROFILE: the library then accumulates per-layer times (``bp_profile``).
    """
    missing = target.missing() if cc is None else []
    if missing:
        raise BuildError(f"target {target.name} needs {', '.join(missing)}")
    compiler = cc or target.cc
    flags = list(target.cflags) + (["-DBP_PROFILE", "-D_POSIX_C_SOURCE=199309L"] if profile else [])
    static = ["-static"] if target.static else []
    cmds = [
        [compiler, *flags, "-pthread", "-fPIC", "-c", "-o", "bp_model.o", "bp_model.c"],
        [compiler, *flags, "-pthread", "-o", "bp_main", "bp_main.c", "bp_model.o", "-lm", *static],
    ]
    if shared:
        cmds.append([compiler, "-shared", "-pthread", "-o", "libbpmodel.so", "bp_model.o", "-lm"])
    for cmd in cmds:
        proc = subprocess.run(cmd, cwd=out_dir, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError(f"{compiler} failed: {_first_error(proc.stderr)}")
    return out_dir / "bp_main"


def run_harness(out_dir: Path, target: Target, x: np.ndarray, out_shape: tuple[int, ...], repeat: int = 0) -> tuple[np.ndarray, str]:
    """Run the built harness on a batch; returns (outputs shaped (n, *out_shape), stderr)."""
    x = np.ascontiguousarray(x, dtype="<f4")
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        src, dst = Path(tmp) / "in.bin", Path(tmp) / "out.bin"
        src.write_bytes(x.tobytes())
        cmd = [*target.run_prefix, str(out_dir / "bp_main"), str(out_dir / "weights.bin"), str(src), str(dst)]
        if repeat:
            cmd.append(str(repeat))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError(f"harness failed: {_first_error(proc.stderr)}")
        out = np.frombuffer(dst.read_bytes(), dtype="<f4").reshape((x.shape[0], *out_shape))
    return out.copy(), proc.stderr


class HostLibrary:
    """ctypes handle on a host build's ``libbpmodel.so`` with its weights loaded."""

    def __init__(self, out_dir: Path, generated: Generated) -> None:
        self._lib = ctypes.CDLL(str(Path(out_dir) / "libbpmodel.so"))
        self._lib.bp_load.restype = ctypes.c_void_p
        self._lib.bp_load.argtypes = [ctypes.c_char_p]
        self._lib.bp_run.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        self._lib.bp_free.argtypes = [ctypes.c_void_p]
        self._lib.bp_set_threads.argtypes = [ctypes.c_void_p, ctypes.c_int]
        self._model = self._lib.bp_load(str(Path(out_dir) / "weights.bin").encode())
        if not self._model:
            raise BuildError(f"could not load {out_dir}/weights.bin")
        self.in_shape = generated.in_shape
        self.out_shape = generated.out_shape

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        n = x.shape[0]
        out = np.empty((n, *self.out_shape), dtype=np.float32)
        self._lib.bp_run(self._model, x.ctypes.data, out.ctypes.data, n)
        return out

    def set_threads(self, n: int) -> None:
        """Run this model on ``n`` threads from now on (results do not depend on ``n``)."""
        if self._lib.bp_set_threads(self._model, n) != 0:
            raise BuildError(f"cannot run on {n} threads (1..{MAX_THREADS})")

    def profile(self) -> list[float]:
        """Milliseconds spent per layer since the last call (needs a ``profile=True`` build)."""
        fn = self._lib.bp_profile
        fn.argtypes = [ctypes.POINTER(ctypes.c_double), ctypes.c_int]
        buf = (ctypes.c_double * 4096)()
        n = fn(buf, 4096)
        return list(buf[:n])

    def close(self) -> None:
        if self._model:
            self._lib.bp_free(self._model)
            self._model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
