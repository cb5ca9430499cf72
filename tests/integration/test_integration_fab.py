"""The owner never installs or runs the app bundle (FAB) the server side sends.

A hostile server submits a FAB whose ClientApp writes a marker file when it is imported and when
it handles a message. A stock SuperNode would run it; the owner's own executor must not: the
marker never appears and the owner's audit log records the bundle as ignored.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from protocol.flower_processes import ManagedProcess, flower_command, flower_env, free_port, wait_for_port
from simulations.local import REPO, LocalDeployment, OwnerPlan, install_demo_data
from tests.helpers import write_flower_app

pytestmark = pytest.mark.integration


def _hostile_app(folder: Path, marker: Path) -> Path:
    write_flower_app(
        folder,
        "hostile",
        serverapp="hostile_server:app",
        clientapp="hostile_client:app",
        description="a bundle whose ClientApp must never run at the owner",
        publisher="attacker",
        config="rounds = 1",
    )
    (folder / "hostile_client.py").write_text(
        textwrap.dedent(f"""
        from pathlib import Path
        Path({str(marker)!r}).write_text("imported")
        from flwr.clientapp import ClientApp
        app = ClientApp()
        @app.query()
        def handle(msg, context):
            Path({str(marker)!r}).write_text("ran")
            raise SystemExit(0)
    """)
    )
    (folder / "hostile_server.py").write_text(
        textwrap.dedent("""
        import time
        from flwr.app import Message, RecordDict, ConfigRecord
        from flwr.serverapp import ServerApp
        app = ServerApp()
        @app.main()
        def main(grid, context):
            done = set()
            end = time.time() + 120
            while time.time() < end:
                for node in grid.get_node_ids():
                    if node in done:
                        continue
                    done.add(node)
                    for kind in ("query.offer", "query.finish"):
                        message = Message(RecordDict({"facts": ConfigRecord({"job_id": "x"})}), dst_node_id=node, message_type=kind)
                        ids = list(grid.push_messages([message]))
                        while not list(grid.pull_messages(ids)):
                            time.sleep(0.2)
                time.sleep(0.2)
    """)
    )
    return folder


def test_owner_ignores_the_servers_bundle(tmp_path):
    marker = tmp_path / "MARKER"
    app = _hostile_app(tmp_path / "hostile", marker)
    link_home = tmp_path / "link"
    link_home.mkdir()
    port = free_port()
    env = flower_env(link_home)
    link = ManagedProcess(
        "SuperLink",
        [
            flower_command("flower-superlink"),
            "--insecure",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--database",
            str(link_home / "state.db"),
            "--disable-runtime-dependency-installation",
        ],
        link_home / "superlink.log",
        env,
    )
    link.start()
    try:
        wait_for_port(link, "127.0.0.1", port, 60)
        (link_home / "config.toml").write_text(f'[superlink]\ndefault = "x"\n[superlink.x]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
        done = subprocess.run([flower_command("flwr"), "run", str(app), "x", "--format", "json"], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        # A genuine entity card to pin: the hostile server cannot produce a matching offer.
        dep = LocalDeployment(tmp_path / "owner-side")
        dep.port = port
        data = install_demo_data(tmp_path / "private")
        run = dep.run_owner(OwnerPlan("owner", data, weights=None, epochs=0), timeout=240)
    finally:
        link.stop()
    assert not marker.exists(), f"the server's ClientApp ran at the owner: {marker.read_text()}"
    assert run.returncode == 1 and "offer" in run.error, run.error
    records = [json.loads(line) for line in (run.out / "audit.jsonl").read_text().splitlines()]
    ignored = [r for r in records if r["event"] == "fab.ignored"]
    assert ignored and ignored[0]["details"]["reason"].startswith("the owner runs only its own")


def test_marker_would_appear_if_the_bundle_were_run(tmp_path):
    """Control: the hostile ClientApp really does write the marker when executed."""
    marker = tmp_path / "MARKER"
    app = _hostile_app(tmp_path / "hostile", marker)
    subprocess.run([sys.executable, "-c", "import hostile_client"], cwd=app, check=True, env={**flower_env(tmp_path), "PYTHONPATH": str(REPO)})
    assert marker.read_text() == "imported"
