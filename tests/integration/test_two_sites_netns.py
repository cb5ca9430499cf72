"""Two sites for real: the entity and an owner in two Linux network namespaces joined by a veth pair.

Each side sees only its own loopback and its end of the veth, so the owner reaches the entity
only over the veth link, as it would across a network: TLS with a certificate naming the
entity's namespace address, and SuperNode authentication with the owner's node key registered
in ``HOME/nodes``. The test makes the namespaces and the link with ``ip`` and removes them
afterwards; it skips, saying why, where the machine does not allow it (not root, no ``ip``,
``ip netns add`` refused).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from protocol.flower_processes import port_open
from protocol.transport import make_supernode_auth_keys
from simulations.local import LocalDeployment, OwnerPlan, install_demo_data

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class TwoSites:
    entity_ns: str
    owner_ns: str
    entity_address: str
    owner_address: str

    def prefix(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def _netns_inode(ns: str) -> int:
    return os.stat(f"/run/netns/{ns}").st_ino


def _in_netns(pid: int, ns: str, seconds: float = 10.0) -> bool:
    """Whether ``pid`` is (soon) in ``ns``: ``ip netns exec`` enters it just after it starts."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino == _netns_inode(ns):
                return True
        except OSError:
            return False
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def _netns_pids(ns: str) -> list[int]:
    done = _ip("netns", "pids", ns)
    return [int(p) for p in done.stdout.split()] if done.returncode == 0 else []


@pytest.fixture
def two_sites() -> Iterator[TwoSites]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (ip netns add)")
    if shutil.which("ip") is None:
        pytest.skip("the `ip` command (iproute2) is not installed")
    tag = secrets.token_hex(3)
    entity_ns, owner_ns = f"bp-entity-{tag}", f"bp-owner-{tag}"
    # Interface names are at most 15 characters; addresses live inside the namespaces only.
    veth_entity, veth_owner = f"bpe{tag}", f"bpo{tag}"
    subnet = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(250)}"
    entity_address, owner_address = f"{subnet}.1", f"{subnet}.2"
    made: list[str] = []
    try:
        for ns in (entity_ns, owner_ns):
            done = _ip("netns", "add", ns)
            if done.returncode != 0:
                pytest.skip(f"`ip netns add` is not allowed here: {done.stderr.strip() or done.returncode}")
            made.append(ns)
        steps = [
            ("link", "add", veth_entity, "type", "veth", "peer", "name", veth_owner),
            ("link", "set", veth_entity, "netns", entity_ns),
            ("link", "set", veth_owner, "netns", owner_ns),
            ("-n", entity_ns, "addr", "add", f"{entity_address}/30", "dev", veth_entity),
            ("-n", owner_ns, "addr", "add", f"{owner_address}/30", "dev", veth_owner),
            ("-n", entity_ns, "link", "set", veth_entity, "up"),
            ("-n", owner_ns, "link", "set", veth_owner, "up"),
            ("-n", entity_ns, "link", "set", "lo", "up"),
            ("-n", owner_ns, "link", "set", "lo", "up"),
        ]
        for step in steps:
            done = _ip(*step)
            if done.returncode != 0:
                pytest.skip(f"`ip {' '.join(step)}` failed here: {done.stderr.strip()}")
        yield TwoSites(entity_ns, owner_ns, entity_address, owner_address)
    finally:
        left = {ns: _netns_pids(ns) for ns in made}
        for pids in left.values():
            for pid in pids:
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
        for ns in made:
            _ip("netns", "del", ns)  # takes its end of the veth pair, and so the pair, with it
        assert not any(left.values()), f"processes were left in the namespaces: {left}"


def test_job_between_two_network_namespaces_over_tls_with_supernode_auth(two_sites: TwoSites, tmp_path: Path) -> None:
    from protocol.audit import verify_log
    from protocol.keys import load_card

    dep = LocalDeployment(
        tmp_path / "work",
        recipe="oneshot",
        tls=True,
        entity_options={"auth": True},
        host=two_sites.entity_address,
        entity_prefix=two_sites.prefix(two_sites.entity_ns),
        owner_prefix=two_sites.prefix(two_sites.owner_ns),
    )
    node = make_supernode_auth_keys(tmp_path / "node-key")
    (dep.entity_home / "nodes").mkdir()
    shutil.copyfile(node.public_key, dep.entity_home / "nodes" / "owner.pub")
    data = install_demo_data(tmp_path / "private")
    plan = OwnerPlan("owner", data, epochs=0, extra={"node_key": str(node.private_key)})
    proc: subprocess.Popen | None = None
    try:
        dep.start_entity()
        assert dep.entity is not None
        assert _in_netns(dep.entity.pid, two_sites.entity_ns), "entity.serve runs in the entity's namespace"
        # From this (the root) namespace the entity's address leads nowhere: the owner can only
        # have reached it over the veth link.
        assert not port_open(two_sites.entity_address, dep.port, timeout=1.0)
        started = time.monotonic()
        proc = dep.start_owner(plan)
        assert _in_netns(proc.pid, two_sites.owner_ns), "owner.run runs in the owner's namespace"
        run = dep.finish_owner(plan, proc, started, timeout=400)
    finally:
        dep.kill_owner(proc)
        left = dep.stop()
    assert run.returncode == 0, run.error
    assert left == []
    assert run.summary is not None
    assert float(run.summary["achieved_rate"]) == pytest.approx(8.0, rel=0.02)
    owner_toml = (dep.work / "owner" / "owner.toml").read_text()
    assert f'entity = "{two_sites.entity_address}:{dep.port}"' in owner_toml
    node_log = (run.out / "supernode.log").read_text().lower()
    assert "insecure" not in node_log, "the owner's SuperNode must connect over TLS"
    entity_log = " ".join((dep.work / "entity.log").read_text().split()).lower()
    assert "registered supernode key owner.pub" in entity_log
    assert f"serving owners on {two_sites.entity_address}:{dep.port}" in entity_log
    verdict = verify_log(run.out / "audit.jsonl", owner=load_card(dep.work / "owner" / "keys" / "card.json"), entity=load_card(dep.entity_card))
    assert verdict.ok, verdict
    assert verdict.receipts >= 1
    events = [e["event"] for e in dep.entity_events()]
    assert "delivered" in events and "finished" in events
