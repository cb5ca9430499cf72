"""The owners' address serves the Fleet API only; the entity's Control API is reachable on loopback alone.

Found by the hostile-input campaign: with flwr 1.41 as entity.serve used to start it, anyone who
reached the owners' port could `flwr run` a ServerApp of their own (it ran as the entity's user
and read its signing key), `flwr ls` the runs and `flwr stop` the entity's. Also checked here:
SuperNode authentication (`--auth`), the FAB carrying no host path, and private file modes.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import stat
import subprocess
import textwrap
import time
import tomllib
import zipfile
from pathlib import Path

import pytest

from entity.serve import EntityService, ServeConfig, _app_pyproject
from entity.serve import main as serve_main
from protocol.flower_processes import ManagedProcess, flower_command, flower_env, free_port
from protocol.transport import make_supernode_auth_keys, make_tls_files
from simulations.local import LocalDeployment
from tests.helpers import owner_run_args, write_flower_app


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _small_app(folder: Path, marker: Path) -> Path:
    """A ServerApp that proves it ran by writing ``marker``, then idles (so that it can be stopped)."""
    write_flower_app(
        folder,
        "intruder",
        serverapp="intruder_server:app",
        clientapp="intruder_server:app",
        description="a ServerApp submitted from outside",
        publisher="outsider",
    )
    (folder / "intruder_server.py").write_text(
        textwrap.dedent(f"""
        import time
        from pathlib import Path
        from flwr.serverapp import ServerApp
        app = ServerApp()
        @app.main()
        def main(grid, context):
            Path({str(marker)!r}).write_text("ran")
            time.sleep(120)
    """)
    )
    return folder


def _flwr(home: Path, *args: str) -> tuple[int, dict]:
    done = subprocess.run([flower_command("flwr"), *args, "--format", "json"], env=flower_env(home), capture_output=True, text=True, timeout=60)
    try:
        answer = json.loads(done.stdout[done.stdout.index("{") :])
    except ValueError:
        answer = {}
    return done.returncode, answer


def _succeeded(result: tuple[int, dict]) -> bool:
    code, answer = result
    return code == 0 and answer.get("success") is True


def _run_ids(home: Path) -> set[str]:
    result = _flwr(home, "ls", "entity")
    assert _succeeded(result), result
    return {str(run["run-id"]) for run in result[1]["runs"]}


def _post_status(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", path, body=b"", headers={"content-type": "application/protobuf"})
        return conn.getresponse().status
    finally:
        conn.close()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    dep = LocalDeployment(tmp_path_factory.mktemp("control") / "work", recipe="oneshot")
    try:
        dep.start_entity()
        yield dep
    finally:
        dep.stop()


@pytest.mark.integration
def test_outsider_at_the_owners_address_cannot_run_list_or_stop(deployment, tmp_path):
    entity_flwr = deployment.entity_home / "flwr"
    before = _run_ids(entity_flwr)
    assert len(before) == 1, before
    (entity_run,) = before
    outsider = tmp_path / "outsider"
    outsider.mkdir()
    (outsider / "config.toml").write_text(
        f'[superlink]\ndefault = "entity"\n[superlink.entity]\naddress = "127.0.0.1:{deployment.port}"\ninsecure = true\n'
    )
    marker = tmp_path / "INTRUDER_RAN"
    app = _small_app(tmp_path / "app", marker)

    assert not _succeeded(_flwr(outsider, "run", str(app), "entity"))
    assert not _succeeded(_flwr(outsider, "ls", "entity"))
    assert not _succeeded(_flwr(outsider, "stop", entity_run, "entity"))
    assert not _succeeded(_flwr(outsider, "supernode", "list", "entity"))

    time.sleep(2)
    assert not marker.exists(), "a ServerApp submitted at the owners' address ran at the entity"
    assert _run_ids(entity_flwr) == before, "a run was submitted through the owners' address"
    status = _flwr(entity_flwr, "ls", "entity", "--run-id", entity_run)[1]["runs"][0]["status"]
    assert status == "running", status
    # The owners' port still answers Fleet API routes (reaching the app, not the 404 filter).
    assert _post_status(deployment.port, "/v1/control/list-runs") == 404
    assert _post_status(deployment.port, "/v1/runtime/get-nodes") == 404
    assert _post_status(deployment.port, "/v1/fleet/get-run") != 404


@pytest.mark.integration
def test_the_entitys_own_cli_reaches_the_control_api_on_loopback(deployment, tmp_path):
    entity_flwr = deployment.entity_home / "flwr"
    address = tomllib.loads((entity_flwr / "config.toml").read_text())["superlink"]["entity"]["address"]
    host, port = address.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) != deployment.port
    marker = tmp_path / "CONTROL_RAN"
    app = _small_app(tmp_path / "app", marker)
    before = _run_ids(entity_flwr)

    code, answer = _flwr(entity_flwr, "run", str(app), "entity")
    assert code == 0 and answer.get("success"), answer
    run_id = str(answer["run-id"])
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert marker.exists(), "the loopback Control API accepted the run but it never ran"
    assert _run_ids(entity_flwr) == before | {run_id}
    assert _succeeded(_flwr(entity_flwr, "stop", run_id, "entity"))


@pytest.mark.integration
def test_entity_files_are_private_to_its_user(deployment):
    home = deployment.entity_home
    # LocalDeployment made HOME (and keys/) before entity.serve started, with the default umask.
    assert _mode(home) == 0o700
    assert _mode(home / "flwr") == 0o700
    for name in ("events.jsonl", "superlink.log", "serverapp.json", "flwr/superlink.db", "flwr/config.toml"):
        assert _mode(home / name) == 0o600, name


@pytest.mark.integration
def test_the_submitted_fab_holds_no_path_of_the_entity_host(deployment):
    from flwr.cli.build import build_fab_from_disk

    home = str(deployment.entity_home)
    fab = build_fab_from_disk(deployment.entity_home / "app")
    with zipfile.ZipFile(io.BytesIO(fab)) as bundle:
        contents = [fab] + [bundle.read(name) for name in bundle.namelist()]
    for blob in contents:
        assert home.encode() not in blob
        assert str(deployment.work).encode() not in blob
    # ...and the ServerApp still found its settings: it started and wrote its first event.
    assert any(e.get("event") == "service-started" for e in deployment.entity_events())


def test_the_app_pyproject_carries_no_run_config():
    text = _app_pyproject()
    assert "[tool.flwr.app.config]" not in text
    assert "home" not in text and "/" not in text.split("[tool.flwr.app]")[1]


def test_a_fresh_entity_home_is_created_private(tmp_path):
    old = os.umask(0o022)
    try:
        home = tmp_path / "entity-home"
        EntityService(ServeConfig(home=home)).prepare()
    finally:
        os.umask(old)
    assert _mode(home) == 0o700
    assert _mode(home / "flwr") == 0o700


def test_an_existing_event_log_is_tightened_and_new_events_are_private(tmp_path):
    from entity.jobs import EventLog

    home = tmp_path / "entity-home"
    home.mkdir(mode=0o755)
    events = home / "events.jsonl"
    events.write_text("")
    events.chmod(0o644)
    EntityService(ServeConfig(home=home)).prepare()
    assert _mode(home) == 0o700 and _mode(events) == 0o600
    old = os.umask(0o022)
    try:
        EventLog(tmp_path / "fresh.jsonl").write("started")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "fresh.jsonl") == 0o600


def _serve_error(capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        serve_main(args)
    assert exit_info.value.code == 1
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("entity.serve: error:"), lines
    return lines[0]


def test_auth_without_tls_is_refused_naming_the_fix(tmp_path, capsys):
    line = _serve_error(capsys, ["--auth", "--home", str(tmp_path / "home"), "--quiet"])
    assert "--auth needs TLS" in line and "--tls-cert" in line


def test_a_certificate_without_loopback_is_refused(tmp_path, capsys):
    tls = make_tls_files(tmp_path / "tls", ["entity.example.org"])
    line = _serve_error(
        capsys,
        [
            "--home",
            str(tmp_path / "home"),
            "--tls-cert",
            str(tls.server_cert),
            "--tls-key",
            str(tls.server_key),
            "--tls-ca",
            str(tls.ca_cert),
            "--quiet",
        ],
    )
    assert "does not name 127.0.0.1" in line and "protocol.transport tls" in line


def test_control_port_equal_to_the_owners_port_is_refused(tmp_path, capsys):
    line = _serve_error(capsys, ["--home", str(tmp_path / "home"), "--port", "9100", "--control-port", "9100", "--quiet"])
    assert "--control-port must differ" in line


def test_owner_node_key_needs_tls(tmp_path, capsys):
    from owner.run import main as owner_main

    (tmp_path / "private").mkdir()
    keys = make_supernode_auth_keys(tmp_path / "node")
    with pytest.raises(SystemExit) as exit_info:
        owner_main([*owner_run_args(tmp_path, tmp_path / "private"), "--node-key", str(keys.private_key)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("owner.run: error:") and "--node-key needs --tls-ca" in err[-1], err


def _supernode(name: str, work: Path, port: int, ca: Path, key: Path | None) -> ManagedProcess:
    runtime = free_port()
    command = [
        flower_command("flower-supernode"),
        "--superlink",
        f"127.0.0.1:{port}",
        "--isolation",
        "process",
        "--host",
        "127.0.0.1",
        "--port",
        str(runtime),
        "--root-certificates",
        str(ca),
    ]
    if key is not None:
        command += ["--auth-supernode-private-key", str(key)]
    (work / name).mkdir(parents=True, exist_ok=True)
    return ManagedProcess(name, command, work / name / "supernode.log", flower_env(work / name)).start()


def _node_id(node: ManagedProcess, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in node.log_path.read_text(errors="replace").splitlines():
            if "SuperNode ID:" in line:
                return int(line.rsplit(":", 1)[1])
        if not node.running():
            return None
        time.sleep(0.2)
    return None


def _offered(dep: LocalDeployment, node_id: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(e.get("event") == "offered" and int(e.get("node_id", -1)) == node_id for e in dep.entity_events()):
            return True
        time.sleep(0.3)
    return False


@pytest.mark.integration
def test_auth_admits_only_supernodes_whose_keys_are_registered(tmp_path):
    dep = LocalDeployment(tmp_path / "work", recipe="oneshot", tls=True, entity_options={"auth": True})
    assert dep.tls is not None
    keys = {name: make_supernode_auth_keys(tmp_path / "keys", name) for name in ("known", "stranger", "late")}
    nodes = dep.entity_home / "nodes"
    nodes.mkdir()
    shutil.copyfile(keys["known"].public_key, nodes / "known.pub")
    started: list[ManagedProcess] = []
    try:
        dep.start_entity()
        known = _supernode("known", tmp_path, dep.port, dep.tls.ca_cert, keys["known"].private_key)
        stranger = _supernode("stranger", tmp_path, dep.port, dep.tls.ca_cert, keys["stranger"].private_key)
        keyless = _supernode("keyless", tmp_path, dep.port, dep.tls.ca_cert, None)
        started += [known, stranger, keyless]
        known_id = _node_id(known, 30)
        assert known_id is not None, known.exit_reason()
        assert _offered(dep, known_id, 30), "the registered SuperNode got no offer"
        for node in (stranger, keyless):
            deadline = time.monotonic() + 30
            while node.running() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not node.running(), f"{node.name}: an unregistered SuperNode stayed connected"
        assert "Failed to activate SuperNode" in stranger.exit_reason()
        assert "must be registered" in keyless.exit_reason()
        # A key added while the service runs is registered at the next scan.
        shutil.copyfile(keys["late"].public_key, nodes / "late.pub")
        deadline = time.monotonic() + 30
        while len(_flwr(dep.entity_home / "flwr", "supernode", "list", "entity")[1].get("nodes", [])) < 2:
            assert time.monotonic() < deadline, "a key added to HOME/nodes was not registered"
            time.sleep(0.5)
        late = _supernode("late", tmp_path, dep.port, dep.tls.ca_cert, keys["late"].private_key)
        started.append(late)
        late_id = _node_id(late, 30)
        assert late_id is not None, late.exit_reason()
        assert _offered(dep, late_id, 30)
        offered = {int(e["node_id"]) for e in dep.entity_events() if e.get("event") == "offered"}
        assert offered == {known_id, late_id}
    finally:
        for node in started:
            node.stop()
        left = dep.stop()
    assert left == []
