"""Bad flags and bad inputs give one-line errors (no traceback) and exit 1; bad usage exits 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from protocol.flower_processes import free_port
from simulations.local import REPO
from tests.helpers import owner_run_args


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"},
    )


@pytest.fixture()
def owner_args(tmp_path) -> list[str]:
    data = tmp_path / "private"
    (data / "FashionMNIST" / "raw").mkdir(parents=True)
    return ["-m", "owner.run", *owner_run_args(tmp_path, data)]


def _one_line_error(done: subprocess.CompletedProcess, needle: str) -> None:
    assert done.returncode == 1, done.stderr
    lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
    assert "Traceback" not in done.stderr, done.stderr
    assert lines[-1].startswith("owner.run: error:") and needle in lines[-1], lines


def test_missing_data_dir(tmp_path, owner_args):
    args = list(owner_args)
    args[args.index("--data") + 1] = str(tmp_path / "nowhere")
    _one_line_error(_run(args, tmp_path), "does not exist")


def test_bad_model_path(tmp_path, owner_args):
    args = list(owner_args)
    args[args.index("--model") + 1] = "no_such_package.models:net"
    _one_line_error(_run(args, tmp_path), "cannot import")


def test_data_dir_without_a_dataset(tmp_path, owner_args):
    args = list(owner_args)
    empty = tmp_path / "empty"
    empty.mkdir()
    args[args.index("--data") + 1] = str(empty)
    _one_line_error(_run(args, tmp_path), "no dataset found")


def test_entity_unreachable_within_timeout(tmp_path, owner_args, fashion_root):
    args = list(owner_args)
    args[args.index("--data") + 1] = str(fashion_root)
    args += ["--entity", f"127.0.0.1:{free_port()}", "--connect-timeout", "2"]
    _one_line_error(_run(args, tmp_path), "unreachable within 2 s")
    assert not (tmp_path / "out" / "audit.jsonl").exists()  # nothing was sent: no half-started trail


def test_bad_usage_exits_2(tmp_path):
    done = _run(["-m", "owner.run", "--rate", "fast"], tmp_path)
    assert done.returncode == 2 and "invalid float value" in done.stderr


def test_entity_serve_refuses_a_busy_port(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        done = _run(["-m", "entity.serve", "--port", str(port), "--home", str(tmp_path / "home"), "--quiet"], tmp_path)
    assert done.returncode == 1 and "already in use" in done.stderr.strip().splitlines()[-1], done.stderr


# ------------------------------------------------------------------- the owner's first hour
# Each mistake a new user made following the README, end to end: one line naming the fix, no traceback.


def test_missing_flags_are_named_all_at_once_with_a_complete_command(tmp_path):
    done = _run(["-m", "owner.run"], tmp_path)
    _one_line_error(done, "missing --data, --model, --entity-card, --input-shape, --mean, --std")
    assert "--entity-card entity-card.json" in done.stderr and "Quick start" in done.stderr


def test_weights_for_another_class_count_name_the_layer_and_the_kwarg_on_the_command_line(tmp_path, owner_args):
    from safetensors.torch import save_file

    from owner.model import build_model

    save_file(build_model("simulations.models:small_vgg", {"num_classes": 7}).state_dict(), tmp_path / "w.safetensors")
    args = [*owner_args, "--weights", str(tmp_path / "w.safetensors")]
    _one_line_error(_run(args, tmp_path), "--model-kwargs '{\"num_classes\": 7}'")


def test_data_pointing_at_the_raw_folder_names_the_folder_to_pass(tmp_path, owner_args):
    from simulations.local import install_demo_data

    args = list(owner_args)
    raw = install_demo_data(tmp_path / "demo") / "FashionMNIST" / "raw"
    args[args.index("--data") + 1] = str(raw)
    _one_line_error(_run(args, tmp_path), "pass --data")


def test_model_with_nothing_to_prune_is_refused_before_anything_leaves(tmp_path, owner_args):
    (tmp_path / "flatmodels.py").write_text(
        "from torch import nn\n\ndef linear(num_classes=10):\n    return nn.Sequential(nn.Flatten(), nn.Linear(784, num_classes))\n"
    )
    args = list(owner_args)
    args[args.index("--model") + 1] = "flatmodels:linear"
    args += ["--entity", f"127.0.0.1:{free_port()}", "--connect-timeout", "2"]
    done = _run(args, tmp_path)
    _one_line_error(done, "nothing to prune")
    assert "only for a whole-model rate (--model-rate)" in done.stderr  # the fix is named
    assert not (tmp_path / "out" / "audit.jsonl").exists()  # nothing was sent, so nothing is on record


def test_an_output_folder_with_a_finished_job_is_refused_not_mixed(tmp_path, owner_args):
    import json

    out = tmp_path / "out"
    out.mkdir()
    state = {"job_id": "job-1", "nonce": "n", "request_digest": "sha256:00", "entity": "e", "stage": "finished", "epoch": 0, "config": {}}
    (out / "job.json").write_text(json.dumps(state))
    _one_line_error(_run(owner_args, tmp_path), "holds the finished job job-1; pass a new --out")


def test_resume_of_a_folder_without_a_job_says_so(tmp_path):
    (tmp_path / "empty").mkdir()
    _one_line_error(_run(["-m", "owner.run", "--resume", str(tmp_path / "empty")], tmp_path), "no unfinished job to resume")
