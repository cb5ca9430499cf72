"""The entity's event log: append-only, a torn line never swallows the next event, and no job it
shows offered stays open for ever after the service was killed mid-job."""

from __future__ import annotations

from entity.serve import _describe


def test_jobs_an_earlier_run_left_open_are_closed_once_at_start_even_after_a_torn_line(tmp_path) -> None:
    from entity.jobs import EventLog

    log = EventLog(tmp_path / "events.jsonl")
    log.write("offered", job_id="done", node_id=1)
    log.write("finished", job_id="done", node_id=1)
    log.write("offered", job_id="killed-mid-prune", node_id=2)
    log.write("admitted", job_id="killed-mid-prune", node_id=2)
    log.write("offered", job_id="never-answered", node_id=3)
    with open(log.path, "ab") as handle:
        handle.write(b'{"event": "offered", "job_id": "torn')  # the killed writer's last line
    assert log.close_abandoned() == ["killed-mid-prune", "never-answered"]
    assert log.open_jobs() == [] and log.close_abandoned() == []
    line = _describe({"event": "abandoned", "job_id": "job-7", "reason": "the entity stopped"})
    assert line == "[job-7] abandoned: the entity stopped"
