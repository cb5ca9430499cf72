"""Helpers several test modules share: a bounded wait on code that may block, a test Flower app,
the generated C harness run on a thread count."""

from __future__ import annotations

import os
import subprocess
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch


def unblock_fifo(path: Path) -> Callable[[], None]:
    """A callable that gives a reader blocked on the FIFO at ``path`` its EOF."""

    def unblock() -> None:
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass

    return unblock


def within(seconds: float, fn: Callable[[], Any], unblock: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run ``fn`` in a daemon thread: ``{"value": ...}`` or ``{"error": ...}``; fail the test (after
    ``unblock``, so the thread can end) if it has not returned within ``seconds``."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # handed back to the test
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        if unblock is not None:
            unblock()
        pytest.fail(f"{fn} blocked for more than {seconds} s")
    return out


def write_flower_app(folder: Path, name: str, *, serverapp: str, clientapp: str, description: str, publisher: str, config: str = "") -> Path:
    """A minimal Flower app folder (``pyproject.toml`` only; the caller writes the modules).
    ``config``: the ``[tool.flwr.app.config]`` table's lines, if any."""
    folder.mkdir(parents=True)
    (folder / "pyproject.toml").write_text(
        textwrap.dedent(f"""
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "{name}"
        version = "1.0.0"
        description = "{description}"
        license = "Apache-2.0"
        dependencies = []
        [tool.flwr.app]
        publisher = "{publisher}"
        [tool.flwr.app.components]
        serverapp = "{serverapp}"
        clientapp = "{clientapp}"
        """)
        + (f"[tool.flwr.app.config]\n{config}\n" if config else "")
    )
    return folder


def export_eval(model: torch.nn.Module, shape: tuple[int, ...] = (1, 28, 28)) -> torch.export.ExportedProgram:
    """Export in eval mode with a dynamic batch dimension, as the owner does."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    return torch.export.export(model.eval(), (torch.randn(2, *shape),), dynamic_shapes=({0: batch},))


def owner_run_args(tmp_path: Path, data: Path) -> list[str]:
    """``owner.run`` flags for the shipped small VGG against a fresh entity card in ``tmp_path``
    (the card is created; the data folder is the caller's)."""
    from protocol.keys import init_identity

    init_identity(tmp_path / "entity", "entity")
    spec = ["--input-shape", "1,28,28", "--mean", "0.286", "--std", "0.353"]
    paths = ["--entity-card", str(tmp_path / "entity" / "card.json"), "--keys", str(tmp_path / "keys"), "--out", str(tmp_path / "out")]
    return ["--data", str(data), "--model", "simulations.models:small_vgg", *spec, *paths, "--quiet"]


def sealed_request(session, jobs, offer, card: bytes | None = None) -> bytes:
    """The owner's sealed request for ``offer``, through the hello and the entity's admission, without Flower."""
    from protocol.contract import Admission

    hello = session.answer_offer(offer.blob, card)
    checked, owner = jobs.check_hello(offer, hello, session.identity.fingerprint)
    admission = Admission(offer.job_id, owner.fingerprint, checked.intent, 0, 1, jobs.settings.max_request_bytes)
    sealed = session.answer_admission(jobs.sign_admission(admission))
    assert sealed is not None
    return sealed


def harness_bytes(out_dir: Path, x: np.ndarray, threads: int) -> bytes:
    """The output bytes of the generated harness built in ``out_dir`` on ``x``, run on ``threads``."""
    (out_dir / "x.bin").write_bytes(x.tobytes())
    cmd = [str(out_dir / "bp_main"), str(out_dir / "weights.bin"), str(out_dir / "x.bin"), str(out_dir / "y.bin")]
    subprocess.run(cmd, check=True, env={**os.environ, "BP_THREADS": str(threads)}, capture_output=True)
    return (out_dir / "y.bin").read_bytes()


def same_bytes_on_any_thread_count(out_dir: Path, model: torch.nn.Module, shape: tuple[int, ...], seed: int, tol: float = 1e-4) -> None:
    """The harness built in ``out_dir`` gives the same bytes on 1, 2, 3, 5 and 40 threads (more
    than any layer has work units), and PyTorch's values."""
    x = np.random.default_rng(seed).standard_normal((2, *shape)).astype("<f4")
    outs = {threads: harness_bytes(out_dir, x, threads) for threads in (1, 2, 3, 5, 40)}
    assert len(set(outs.values())) == 1
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert np.abs(np.frombuffer(outs[1], "<f4").reshape(ref.shape) - ref).max() <= tol * np.abs(ref).max()
