"""The README's quick start, run line by line as a new user would paste it: it cannot drift from the CLIs.

What the test supplies is what the README says the user brings: ``mymodels.py`` (the README's own
block), an ImageFolder tree in ``./private`` (small random images), and the two weights files. It
also fills in ``<OWNER_FINGERPRINT>`` with the fingerprint ``keys show`` printed, replaces the port
9092 by a free one, and makes the job quick with an ``entity.toml`` (the one-shot recipe) and an
``owner.toml`` (one short epoch): settings files the README documents, which its flags override.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from protocol.flower_processes import free_port, port_open
from simulations.local import REPO

pytestmark = pytest.mark.integration

README = REPO / "README.md"


def _block(text: str, marker: str, language: str) -> str:
    start = text.index(f"<!-- quickstart: {marker} -->")
    fence = text.index(f"```{language}\n", start) + len(f"```{language}\n")
    return text[fence : text.index("```", fence)]


def _commands(block: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def _user_files(work: Path, text: str) -> None:
    import torch
    import torchvision
    from PIL import Image

    (work / "mymodels.py").write_text(_block(text, "mymodels.py", "python"))
    rng = torch.Generator().manual_seed(0)
    for split, count in (("train", 16), ("test", 4)):
        for label in range(10):
            folder = work / "private" / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = (torch.rand(32, 32, 3, generator=rng) * 128 + label * 12).clamp(0, 255).to(torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), work / "resnet18.pt")
    sys.path.insert(0, str(work))
    try:
        import mymodels  # type: ignore[import-not-found]

        torch.save(mymodels.small_cnn().state_dict(), work / "small_cnn.pt")
    finally:
        sys.path.remove(str(work))
        sys.modules.pop("mymodels", None)
    (work / "entity.toml").write_text('[entity]\nrecipe = "oneshot"\n')
    (work / "owner.toml").write_text("[owner]\nepochs = 1\nbatch_size = 32\nconnect_timeout = 90.0\n")


def test_readme_quick_start_runs_as_written(tmp_path):
    text = README.read_text()
    _user_files(tmp_path, text)
    port = free_port()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(REPO),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }
    entity = None
    fingerprint = None
    try:
        for command in _commands(_block(text, "commands", "bash")):
            command = command.replace("9092", str(port))
            if "<OWNER_FINGERPRINT>" in command:
                assert fingerprint, "the README shows the owner's fingerprint before registering it"
                command = command.replace("<OWNER_FINGERPRINT>", fingerprint)
            if command.endswith("&"):
                assert entity is None
                log = open(tmp_path / "entity.log", "wb")
                entity = subprocess.Popen(["bash", "-c", f"exec {command[:-1]}"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
                deadline = time.monotonic() + 120
                while not port_open("127.0.0.1", port) and time.monotonic() < deadline:
                    assert entity.poll() is None, (tmp_path / "entity.log").read_text()
                    time.sleep(0.5)
                continue
            done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
            assert "Traceback" not in done.stderr, done.stderr
            if "keys show --dir owner-keys" in command:
                fingerprint = re.search(r"fingerprint (\S+)", done.stdout).group(1)  # type: ignore[union-attr]
    finally:
        if entity is not None:
            entity.send_signal(signal.SIGTERM)
            entity.wait(timeout=60)
    assert (tmp_path / "run-resnet" / "summary.json").is_file()
    assert (tmp_path / "run-own" / "final" / "weights.safetensors").is_file()
    assert "<html" in (tmp_path / "report.html").read_text().lower()
    assert (tmp_path / "build-neon" / "bp_model.c").is_file()
