"""TLS as a deployment option: the entity's SuperLink serves TLS, the owner pins the CA."""
from __future__ import annotations

import pytest

from simulations.local import LocalDeployment, OwnerPlan, install_demo_data

pytestmark = pytest.mark.integration


def test_job_over_tls(tmp_path):
    dep = LocalDeployment(tmp_path / "work", recipe="oneshot", tls=True)
    data = install_demo_data(tmp_path / "private")
    try:
        dep.start_entity()
        run = dep.run_owner(OwnerPlan("owner", data, epochs=0), timeout=300)
    finally:
        left = dep.stop()
    assert run.returncode == 0, run.error
    assert float(run.summary["achieved_rate"]) == pytest.approx(8.0, rel=0.02)
    assert left == []
    node_log = (run.out / "supernode.log").read_text().lower()
    assert "insecure" not in node_log, "the owner's SuperNode must connect over TLS"
