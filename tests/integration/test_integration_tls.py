"""TLS as a deployment option: the entity's SuperLink serves TLS, the owner pins the CA.

With ``--auth`` on top, the owner's SuperNode signs in with the key ``owner.run --node-key``
names, registered at the entity by dropping its ``.pub`` into ``HOME/nodes``.
"""

from __future__ import annotations

import shutil

import pytest

from protocol.transport import make_supernode_auth_keys
from simulations.local import LocalDeployment, OwnerPlan, install_demo_data

pytestmark = pytest.mark.integration


def test_job_over_tls_with_supernode_auth(tmp_path):
    dep = LocalDeployment(tmp_path / "work", recipe="oneshot", tls=True, entity_options={"auth": True})
    node = make_supernode_auth_keys(tmp_path / "node-key")
    (dep.entity_home / "nodes").mkdir()
    shutil.copyfile(node.public_key, dep.entity_home / "nodes" / "owner.pub")
    data = install_demo_data(tmp_path / "private")
    try:
        dep.start_entity()
        run = dep.run_owner(OwnerPlan("owner", data, epochs=0, extra={"node_key": str(node.private_key)}), timeout=300)
    finally:
        left = dep.stop()
    assert run.returncode == 0, run.error
    assert float(run.summary["achieved_rate"]) == pytest.approx(8.0, rel=0.02)
    assert left == []
    node_log = (run.out / "supernode.log").read_text().lower()
    assert "insecure" not in node_log, "the owner's SuperNode must connect over TLS"
    assert "registered supernode key owner.pub" in " ".join((dep.work / "entity.log").read_text().split()).lower()


def test_owner_whose_node_key_is_not_registered_is_refused_in_one_line(tmp_path):
    dep = LocalDeployment(tmp_path / "work", recipe="oneshot", tls=True, entity_options={"auth": True})
    node = make_supernode_auth_keys(tmp_path / "node-key")
    data = install_demo_data(tmp_path / "private")
    try:
        dep.start_entity()
        run = dep.run_owner(OwnerPlan("owner", data, epochs=0, extra={"node_key": str(node.private_key)}), timeout=180)
    finally:
        left = dep.stop()
    assert run.returncode == 1
    assert "Failed to activate SuperNode" in run.error, run.error
    assert left == []
