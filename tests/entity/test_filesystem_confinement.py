"""The pruning child gives up the filesystem before it parses the graph: the entity's keys are out
of its reach even though it runs as the entity's user (Linux Landlock; skipped where the kernel has none)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from entity._landlock import abi_version
from entity.sandbox import child_environment, run_pruning
from protocol.keys import init_identity

pytestmark = pytest.mark.skipif(abi_version() < 1, reason="this kernel has no Landlock")
REPO = Path(__file__).resolve().parents[2]


def _in_child(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=child_environment(), capture_output=True, text=True, timeout=120
    )


def test_confined_child_cannot_read_the_entity_keys_but_can_still_import_modules(tmp_path: Path) -> None:
    home = tmp_path / "entity-home"
    init_identity(home / "keys", "entity")
    key = home / "keys" / "signing.key"
    done = _in_child(
        f"""
        from pathlib import Path
        from entity.sandbox import _confine_filesystem
        print(_confine_filesystem())
        import torch.export, sympy  # lazily imported modules still load
        for path in ({str(key)!r}, {str(home / "keys" / "card.json")!r}):
            try:
                Path(path).read_bytes()
                print("READ", path)
            except PermissionError:
                print("REFUSED", path)
        """,
        cwd=home,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("confined (Landlock ABI"), lines
    assert [ln.split()[0] for ln in lines[1:]] == ["REFUSED", "REFUSED"], lines
    assert key.read_bytes()  # this process (the parent) still reads it


def test_confined_child_cannot_write_outside_its_private_folder(tmp_path: Path) -> None:
    target = tmp_path / "planted.txt"
    done = _in_child(
        f"""
        import tempfile
        from pathlib import Path
        from entity.sandbox import _confine_filesystem
        _confine_filesystem()
        Path(tempfile.mkdtemp()).joinpath("scratch").write_text("ok")  # its private folder works
        try:
            Path({str(target)!r}).write_text("planted")
            print("WROTE")
        except PermissionError:
            print("REFUSED")
        """,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["REFUSED"] and not target.exists()


def test_every_pruning_child_reports_its_confinement(small_vgg_program: tuple) -> None:
    from protocol.artifact import program_to_files
    from protocol.spec import InputSpec

    _, program = small_vgg_program
    lines: list[str] = []
    spec = InputSpec((1, 28, 28), (0.286,), (0.353,))
    config = {"rate": 2.25, "recipe": "oneshot", "synthetic_images": 8, "eval_images": 8}
    run_pruning(program_to_files(program), spec.to_json(), config, on_confined=lines.append)
    assert len(lines) == 1 and lines[0].startswith("confined (Landlock ABI"), lines
