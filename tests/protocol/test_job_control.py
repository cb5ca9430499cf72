"""The job-control messages (hello, admission, status) read strictly: any field off is our one-line refusal."""

from __future__ import annotations

import pytest

from protocol.contract import Admission, Hello, JobStatus
from protocol.errors import RequestError

HELLO = Hello("job-1", "n" * 32, "sha256:" + "ab" * 32, "request", 1000).to_json()
ADMISSION = Admission("job-1", "sha256:" + "ab" * 32, "request", 0, 2, 1 << 30).to_json()
STATUS = JobStatus("job-1", 1, "queued", position=2, estimate_s=30).to_json()


@pytest.mark.parametrize(
    ("kind", "body", "problem"),
    [
        (Hello, [HELLO], "must be a JSON object"),
        (Hello, {**HELLO, "extra": 1}, "exactly the fields"),
        (Hello, {k: v for k, v in HELLO.items() if k != "nonce"}, "exactly the fields"),
        (Hello, {**HELLO, "intent": "steal"}, "intent must be one of"),
        (Hello, {**HELLO, "request_bytes": True}, "request_bytes must be an integer"),
        (Hello, {**HELLO, "request_bytes": -1}, "request_bytes must be an integer"),
        (Hello, {**HELLO, "job_id": "x" * 300}, "at most 256 characters"),
        (Hello, {**HELLO, "owner": "a\x1b[31mb"}, "printable text"),
        (Hello, {**HELLO, "intent": "resume"}, "resume_job must be a JSON string"),
        (Hello, {**HELLO, "resume_job": "job-0"}, "its intent is not resume"),
        (Admission, {**ADMISSION, "workers": 0}, "workers must be an integer in 1..4096"),
        (Admission, {**ADMISSION, "queued": "many"}, "queued must be an integer"),
        (JobStatus, {**STATUS, "state": "hacked"}, "state must be one of"),
        (JobStatus, {**STATUS, "percent": 101}, "percent must be an integer in 0..100"),
        (JobStatus, {**STATUS, "layer": "x" * 201}, "at most 200 characters"),
        (JobStatus, {**STATUS, "seq": [1]}, "seq must be an integer"),
    ],
)
def test_a_malformed_job_control_body_is_refused_with_our_text(kind, body, problem) -> None:
    with pytest.raises(RequestError, match=problem):
        kind.from_json(body)


def test_job_control_bodies_round_trip() -> None:
    assert Hello.from_json(HELLO).to_json() == HELLO
    assert Admission.from_json(ADMISSION).to_json() == ADMISSION
    assert JobStatus.from_json(STATUS).to_json() == STATUS
