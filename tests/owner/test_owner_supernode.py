"""The owner's SuperNode launcher: flwr's SuperNode, with its 3 s idle poll cut to half a second."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from owner import supernode


def test_supernode_idle_sleep_is_cut_to_the_brief_poll(monkeypatch):
    from flwr.supernode import start_client_internal as loop

    monkeypatch.setattr(loop, "time", time)
    patched = supernode.install(most=0.01)
    started = time.monotonic()
    patched.time.sleep(3)  # the stock idle wait
    assert time.monotonic() - started < 1.0
    assert patched.time.monotonic() > 0  # every other clock function is the real one


def test_supernode_loop_still_sleeps_three_seconds_through_its_time_module():
    """If a new flwr changed its idle wait, the launcher would silently do nothing: fail here instead."""
    import inspect

    from flwr.supernode import start_client_internal as loop

    source = inspect.getsource(loop)
    assert "time.sleep(3)" in source
    assert "from time import" not in source


def test_supernode_install_refuses_a_module_that_no_longer_uses_time(monkeypatch):
    from flwr.supernode import start_client_internal as loop

    monkeypatch.setattr(loop, "time", object())
    with pytest.raises(RuntimeError, match="flwr pin"):
        supernode.install()


def test_supernode_launcher_takes_flower_supernode_flags():
    done = subprocess.run([sys.executable, "-m", "owner.supernode", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert "--superlink" in done.stdout and "--isolation" in done.stdout
