"""Helpers several test modules share: a bounded wait on code that may block, a test Flower app."""

from __future__ import annotations

import os
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
