"""Pruning in a child process: the owner's graph runs where the entity's keys are not.

Pruning executes the received graph on synthetic data. Even with the op allow-list
(``protocol.graph_ops``) that graph is the most hostile input the entity handles and torch is a
large surface, so the engine runs in a fresh interpreter (``python -m entity.sandbox``; never a
fork, which would copy the parent's memory, signing key included) that gets only what pruning
needs over its stdin: the artifact files' bytes, the input spec and the engine configuration.
Its environment is reduced to what Python and torch need (``child_environment``), and before it
parses the graph it gives up the filesystem (``entity._landlock``, Linux Landlock): it can read
only module and system folders, so the entity's home and keys are out of its reach even though it
runs as the same user. The event log records whether that confinement took effect.

A child costs a few seconds before it can prune (the interpreter and torch import), so the
service keeps spare children started ahead of their jobs (``keep_spares``, one per worker):
each has imported torch and the engine and waits on its stdin, knowing nothing yet; the job that
takes it writes its request there, and another spare is started. A child still prunes one job
only and exits, so no job's graph ever runs in a process that saw another's.

Limits (``SandboxLimits``): memory through ``RLIMIT_DATA``, which counts the heap and anonymous
mappings but not the address space CUDA merely reserves (``RLIMIT_AS`` would break CUDA and
already counts ~3 GiB after ``import torch``); wall-clock time in the parent, which kills the
child when it expires (and the child asks Linux to kill it if the parent dies first). Importing
torch and the engine takes ~0.8 GiB of the memory limit and a few seconds of the time limit.

The child writes length-prefixed frames to a copy of its stdout (its own stdout and stderr go to
the parent's stderr): progress events as JSON, then either the result (report JSON plus
safetensors bytes for weights and masks) or an error. Nothing it sends is unpickled: the parent
parses the tensors with the bounded safetensors reader and checks them against the request's
weights, so a subverted child cannot run code in the parent either. Sealing and signing stay in
the parent.
"""

from __future__ import annotations

import atexit
import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    from entity.pruning import PruneResult

GiB = 1024**3
_FRAME_HEAD = 9  # one kind byte, eight bytes of big-endian length
_MAX_EVENT_BYTES = 1 << 20
_STDERR_TAIL = 16 * 1024
_ENV_KEPT = (
    "PATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TMPDIR",
    "LD_LIBRARY_PATH",
    "VIRTUAL_ENV",
    "CUDA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER",
    "PYTORCH_CUDA_ALLOC_CONF",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
)


@dataclass(frozen=True)
class SandboxLimits:
    """What one pruning child may use: memory (bytes, ``RLIMIT_DATA``) and wall-clock seconds.

    The defaults (8 GiB, 30 minutes) fit the default recipe on ImageNet-size ResNets on a CPU;
    below ~1.5 GiB the child cannot even import torch.
    """

    memory_bytes: int = 8 * GiB
    seconds: float = 30 * 60

    def __post_init__(self) -> None:
        if self.memory_bytes <= 0 or self.seconds <= 0:
            raise ValueError("sandbox memory and time limits must be positive")


class PruningRefused(Exception):
    """The child refused the request with a reason we wrote (safe to send to the owner)."""


class PruningFailed(Exception):
    """The child failed in a way that says nothing to the owner: ``reason`` is generic and ours,
    ``detail`` (the child's exception text, traceback, stderr tail) is for the entity's event log only."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def child_environment(parent: Mapping[str, str] | None = None) -> dict[str, str]:
    """The child's environment: a few variables Python, torch and CUDA need, nothing else.

    The entity's own settings (key and registry paths, Flower variables) are not passed on.
    """
    source = os.environ if parent is None else parent
    env = {key: source[key] for key in _ENV_KEPT if key in source}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def run_pruning(
    files: Mapping[str, bytes],
    spec_json: Mapping[str, Any],
    config: Mapping[str, Any],
    progress: Callable[[dict], None] | None = None,
    limits: SandboxLimits = SandboxLimits(),
    on_confined: Callable[[str], None] | None = None,
    torch_threads: int | None = None,
) -> PruneResult:
    """Prune in a child process: ``PruneResult`` back, or ``PruningRefused`` / ``PruningFailed``.

    ``files`` are the model artifact's files (graph, weights, constants), ``spec_json`` the input
    specification as ``InputSpec.to_json`` writes it, ``config`` the ``PruneConfig`` keyword
    arguments (JSON values), ``torch_threads`` the child's torch threads (default: this process's).
    ``progress`` receives the engine's events in this process;
    ``on_confined`` the child's line on its filesystem confinement (for the operator's log).
    """
    import torch

    from protocol._wire.safetensors import parse_header
    from protocol.artifact import WEIGHTS_FILE

    names = sorted(files)
    job = {
        "spec": dict(spec_json),
        "config": dict(config),
        "threads": torch_threads or torch.get_num_threads(),
        "files": [[name, len(files[name])] for name in names],
    }
    weights = parse_header(files[WEIGHTS_FILE], what=WEIGHTS_FILE)
    max_result = 2 * len(files[WEIGHTS_FILE]) + 64 * 1024 * 1024
    process = SPARES.take(int(limits.memory_bytes))
    frames: queue.Queue = queue.Queue()
    tail: deque[bytes] = deque()
    threads = [
        threading.Thread(target=_write_job, args=(process.stdin, job, [files[n] for n in names]), daemon=True),
        threading.Thread(target=_read_frames, args=(process.stdout, frames, max_result), daemon=True),
        threading.Thread(target=_drain, args=(process.stderr, tail), daemon=True),
    ]
    for thread in threads:
        thread.start()
    try:
        outcome = _collect(process, frames, progress, limits, on_confined)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        for thread in threads:
            thread.join(timeout=5)
    kind, payload = outcome
    stderr = b"".join(tail).decode("utf-8", "replace")
    if kind == "result":
        return _parse_result(payload, weights)
    if kind == "timeout":
        raise PruningFailed(f"pruning ran past this entity's limit of {limits.seconds:g} seconds", f"killed after {limits.seconds:g} s\n{stderr}")
    if kind == "error":
        error = payload
        if error.get("kind") == "refused":
            raise PruningRefused(_one_line(str(error.get("message", "")))) from None
        if error.get("kind") == "memory":
            raise PruningFailed(
                f"pruning needed more memory than this entity allows ({limits.memory_bytes / GiB:g} GiB)", f"{error.get('detail', '')}\n{stderr}"
            )
        raise PruningFailed("pruning failed inside the engine", f"{error.get('detail', '')}\n{stderr}")
    code = process.returncode
    if code is not None and code < 0:
        try:
            died = f"killed by {signal.Signals(-code).name}"
        except ValueError:
            died = f"killed by signal {-code}"
    else:
        died = f"exit status {code}"
    raise PruningFailed(f"the pruning process ended without a result ({died})", f"{payload}\n{stderr}")


def _start_child(memory_bytes: int) -> subprocess.Popen:
    """A fresh pruning child: it imports torch and the engine, then waits for its one job on stdin."""
    return subprocess.Popen(
        [sys.executable, "-m", "entity.sandbox", str(memory_bytes), str(os.getpid())],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_environment(),
        cwd=str(Path(__file__).resolve().parents[1]),
        start_new_session=True,
    )


class SpareChildren:
    """Pruning children started before their jobs, so that a job does not wait for torch to import.

    ``size`` spares are kept (none until ``keep`` is called: a library caller pays nothing). A
    spare is used only for a job with its memory limit; one that has died is replaced. Spares get
    the same environment, limits and parent-death signal as any child, and are killed at
    ``close`` (or with this process).
    """

    def __init__(self) -> None:
        self.size = 0
        self.taken = 0  # jobs that found a spare ready (for the operator's log and the tests)
        self._lock = threading.Lock()
        self._ready: list[tuple[int, subprocess.Popen]] = []

    def keep(self, size: int) -> None:
        with self._lock:
            self.size = max(0, size)

    def take(self, memory_bytes: int) -> subprocess.Popen:
        """A started child for a job with this memory limit (a spare if one is ready), then refill."""
        found = None
        with self._lock:
            keep = []
            for memory, child in self._ready:
                if found is None and memory == memory_bytes and child.poll() is None:
                    found = child
                elif memory == memory_bytes and child.poll() is None:
                    keep.append((memory, child))
                else:
                    _end(child)
            self._ready = keep
            if found is not None:
                self.taken += 1
        child = found or _start_child(memory_bytes)
        self.refill(memory_bytes)
        return child

    def refill(self, memory_bytes: int) -> None:
        with self._lock:
            while len(self._ready) < self.size:
                self._ready.append((memory_bytes, _start_child(memory_bytes)))

    def close(self) -> None:
        with self._lock:
            ready, self._ready, self.size = self._ready, [], 0
        for _, child in ready:
            _end(child)


def _end(child: subprocess.Popen) -> None:
    if child.poll() is None:
        child.kill()
    child.wait()
    for stream in (child.stdin, child.stdout, child.stderr):
        if stream is not None:
            stream.close()


SPARES = SpareChildren()
atexit.register(SPARES.close)


def keep_spares(size: int, limits: SandboxLimits = SandboxLimits()) -> None:
    """Keep ``size`` pruning children started ahead of their jobs (the service: one per worker)."""
    SPARES.keep(size)
    SPARES.refill(int(limits.memory_bytes))


def _collect(
    process: subprocess.Popen,
    frames: queue.Queue,
    progress: Callable[[dict], None] | None,
    limits: SandboxLimits,
    on_confined: Callable[[str], None] | None = None,
) -> tuple[str, Any]:
    """Wait for the child's frames until a result, an error, its end or the deadline."""
    deadline = time.monotonic() + limits.seconds
    outcome: tuple[str, Any] | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "timeout", None
        try:
            frame = frames.get(timeout=min(remaining, 1.0))
        except queue.Empty:
            continue
        if frame is None:  # the child closed its frames: it has ended or is about to
            break
        kind, payload = frame
        if kind == b"P" and progress is not None:
            try:
                event = json.loads(payload)
            except ValueError:
                continue
            if isinstance(event, dict):
                progress(event)
        elif kind == b"S" and on_confined is not None:
            on_confined(payload.decode("utf-8", "replace")[:300])
        elif kind == b"R":
            outcome = ("result", payload)
        elif kind == b"E":
            try:
                error = json.loads(payload)
            except ValueError:
                error = {}
            outcome = ("error", error if isinstance(error, dict) else {})
        elif kind == b"!":
            outcome = ("broken", payload.decode("utf-8", "replace"))
    try:
        process.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        return "timeout", None
    if outcome is not None and outcome[0] == "result" and process.returncode != 0:
        return "broken", f"result sent, then exit status {process.returncode}"
    return outcome or ("broken", "no result or error frame")


def _parse_result(payload: bytes, weights: Any) -> PruneResult:
    """Weights, masks and report from the child's result frame, checked against the request."""
    import torch

    from entity.pruning import PruneResult
    from protocol.artifact import dtype_name, load_tensors
    from protocol.errors import ProtocolError

    try:
        head = int.from_bytes(payload[:8], "big")
        meta = json.loads(payload[8 : 8 + head])
        start = 8 + head
        weights_bytes = payload[start : start + int(meta["weights"])]
        masks_bytes = payload[start + int(meta["weights"]) : start + int(meta["weights"]) + int(meta["masks"])]
        state = load_tensors(weights_bytes)
        masks = load_tensors(masks_bytes)
        report = meta["report"]
    except (ValueError, KeyError, TypeError, ProtocolError) as exc:
        raise PruningFailed("the pruning process sent a malformed result", f"{type(exc).__name__}: {exc}") from None
    expected = {name: (info.dtype, info.shape) for name, info in weights.tensors.items()}
    got = {name: (dtype_name(t.dtype), tuple(t.shape)) for name, t in state.items()}
    if got != expected or not isinstance(report, dict):
        raise PruningFailed(
            "the pruning process sent a result that does not match the model", f"weights {sorted(set(got) ^ set(expected))[:5]} differ"
        )
    for name, mask in masks.items():
        if name not in state or mask.dtype != torch.bool or tuple(mask.shape) != tuple(state[name].shape):
            raise PruningFailed("the pruning process sent a result that does not match the model", f"mask {name[:80]!r} does not fit a weight")
    return PruneResult(state_dict=state, masks=masks, report=report)


def _one_line(text: str, limit: int = 500) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- plumbing (parent side) ---------------------------------------------------------------------


def _write_job(stream: BinaryIO, job: dict, blobs: list[bytes]) -> None:
    try:
        header = json.dumps(job).encode()
        stream.write(len(header).to_bytes(8, "big") + header)
        for blob in blobs:
            stream.write(blob)
        stream.close()
    except (BrokenPipeError, OSError, ValueError):
        pass  # the child ended early; its exit status tells why


def _read_exact(stream: BinaryIO, n: int) -> bytes | None:
    parts, left = [], n
    while left:
        chunk = stream.read(min(left, 1 << 20))
        if not chunk:
            return None
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _read_frames(stream: BinaryIO, frames: queue.Queue, max_result: int) -> None:
    try:
        while True:
            head = _read_exact(stream, _FRAME_HEAD)
            if head is None:
                break
            kind, size = head[:1], int.from_bytes(head[1:], "big")
            if size > (max_result if kind == b"R" else _MAX_EVENT_BYTES):
                frames.put((b"!", f"frame {kind!r} of {size} bytes is over its bound".encode()))
                break
            payload = _read_exact(stream, size)
            if payload is None:
                frames.put((b"!", b"frame cut short"))
                break
            frames.put((kind, payload))
    except (OSError, ValueError):
        pass
    finally:
        frames.put(None)


def _drain(stream: io.BufferedReader, tail: deque[bytes]) -> None:
    """Keep the last ``_STDERR_TAIL`` bytes of the child's stderr (for the event log)."""
    size = 0
    try:
        for chunk in iter(lambda: stream.read1(8192), b""):
            tail.append(chunk)
            size += len(chunk)
            while size > _STDERR_TAIL and len(tail) > 1:
                size -= len(tail.popleft())
    except (OSError, ValueError):
        pass


# --- the child ----------------------------------------------------------------------------------


def _send(out: BinaryIO, kind: bytes, payload: bytes) -> None:
    out.write(kind + len(payload).to_bytes(8, "big") + payload)
    out.flush()


def _read_job(stream: BinaryIO) -> tuple[dict, dict[str, bytes]]:
    head = _read_exact(stream, 8)
    if head is None:
        raise EOFError("no job on stdin")
    job = json.loads(_read_exact(stream, int.from_bytes(head, "big")) or b"")
    files = {}
    for name, size in job["files"]:
        data = _read_exact(stream, int(size)) if size else b""
        if data is None:
            raise EOFError(f"stdin ended inside {name}")
        files[str(name)] = data
    return job, files


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples ``PruneConfig`` declares."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


def _die_with_parent(parent: int) -> None:
    """Ask Linux to kill this process when its parent goes (the parent's own limits end with it)."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent went before the request above took effect
        os._exit(1)


def _child(argv: list[str]) -> int:
    import resource

    memory, parent = int(argv[0]), int(argv[1])
    _die_with_parent(parent)
    resource.setrlimit(resource.RLIMIT_DATA, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed goes to stderr, never into the frames
    sys.stdout = sys.stderr
    try:
        # Imported before the job is read: a spare child is ready to prune the moment it arrives.
        import torch

        from entity.pruning import PruneConfig, prune
        from protocol.artifact import dump_tensors, program_from_files
        from protocol.spec import InputSpec

        job, files = _read_job(sys.stdin.buffer)
        torch.set_num_threads(max(1, int(job.get("threads", 1))))
        spec = InputSpec.from_json(job["spec"])
        config = PruneConfig(**{key: _tuples(value) for key, value in job["config"].items()})
        # From here on the received graph is parsed and run: the filesystem is closed first.
        _send(out, b"S", _confine_filesystem().encode())
        program = program_from_files(files)
        del files

        def progress(event: dict) -> None:
            _send(out, b"P", json.dumps(event, default=str).encode())

        result = prune(program, spec, config, progress)
        weights = dump_tensors(result.state_dict)
        masks = dump_tensors({k: v.to(torch.bool) for k, v in result.masks.items()})
        meta = json.dumps({"report": result.report, "weights": len(weights), "masks": len(masks)}).encode()
        _send(out, b"R", len(meta).to_bytes(8, "big") + meta + weights + masks)
        return 0
    except BaseException as exc:  # every failure becomes one error frame
        try:
            error = _classify(exc)
        except BaseException:  # e.g. out of memory again while classifying
            error = {"kind": "internal", "detail": f"{type(exc).__name__} (not classified)"}
        _send(out, b"E", json.dumps(error).encode())
        return 1


def _confine_filesystem() -> str:
    """Landlock this child (``entity._landlock``): reads only where Python and torch modules live,
    writes only to ``/dev``, ``/proc``, ``/sys`` and a private temporary folder. The entity's home
    (keys, registry, logs) is outside all of them. Returns the line the event log shows."""
    import tempfile

    from entity import _landlock

    private = Path(tempfile.mkdtemp(prefix="blindprune-prune-"))
    os.environ["TMPDIR"] = tempfile.tempdir = str(private)
    root = Path(__file__).resolve().parents[1]
    here = Path.cwd().resolve()
    entries = {Path(entry).resolve() for entry in sys.path if entry and Path(entry).is_dir()}
    # The project root and the working folder may hold the entity's home: only its packages are read.
    entries -= {root, here}
    readable = {
        Path(sys.prefix),
        Path(sys.base_prefix),
        Path(sys.exec_prefix),
        *entries,
        *(root / name for name in ("entity", "protocol", "codegen")),
        Path("/usr"),
        Path("/lib"),
        Path("/lib64"),
        Path("/etc"),
    }
    try:
        abi = _landlock.confine(sorted(readable), [Path("/dev"), Path("/proc"), Path("/sys"), private])
    except _landlock.ConfinementError as exc:
        return f"not confined: {exc.strerror}"
    return f"confined (Landlock ABI {abi}): reads below {len(readable)} module and system folders only"


def _classify(exc: BaseException) -> dict[str, str]:
    """Refusals whose text we wrote go back as they are; anything else only as a kind."""
    from entity.pruning import PruneError
    from entity.pruning.graph import GraphError
    from protocol.errors import ProtocolError
    from protocol.spec import SpecError

    detail = "".join(traceback.format_exception(exc, limit=8))
    if isinstance(exc, (ProtocolError, SpecError, PruneError, GraphError)):
        return {"kind": "refused", "message": str(exc), "detail": detail}
    if _is_out_of_memory(exc):
        return {"kind": "memory", "detail": detail}
    return {"kind": "internal", "detail": detail}


if __name__ == "__main__":
    status = _child(sys.argv[1:])
    sys.stderr.flush()
    os._exit(status)  # skip interpreter teardown (seconds with torch loaded): the frames are flushed
