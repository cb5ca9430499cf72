"""The owner's output folder holds one job: its state file says which, and how far it got.

``OUT/job.json`` is written (atomically) just before the sealed request leaves, and again at
each stage after: ``requested`` (the entity has the model), ``received`` (the verified result is
in ``OUT/received/``), ``retraining`` (with the last finished epoch; its checkpoint beside it)
and ``finished``. A later run on the same folder continues an unfinished job where it stopped,
without asking the entity for what it already holds, and refuses to start a second job there:
outputs of two jobs are never mixed. The run's settings are kept too, so ``--resume OUT`` needs
no other flag.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from protocol._files import atomic_write

JOB_FILE = "job.json"
CHECKPOINT_FILE = "retrain-checkpoint.pt"
STAGES = ("requested", "received", "retraining", "finished")
_OUTPUTS = ("summary.json", "final", "received")


class JobStateError(RuntimeError):
    """The output folder cannot take this run (one line naming the fix)."""


@dataclass(frozen=True)
class JobState:
    job_id: str
    nonce: str
    request_digest: str
    entity: str
    stage: str
    epoch: int = 0
    config: Mapping[str, Any] = field(default_factory=dict)

    def advanced(self, stage: str, epoch: int | None = None) -> JobState:
        return replace(self, stage=stage, epoch=self.epoch if epoch is None else epoch)


def read_state(out: Path) -> JobState | None:
    path = out / JOB_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise JobStateError(f"{path} is unreadable ({type(exc).__name__}); move {out} aside and start the job again with a new --out") from None
    try:
        state = JobState(**data)
    except TypeError:
        raise JobStateError(f"{path} is not a blindprune job state; move {out} aside and pass a new --out") from None
    if state.stage not in STAGES or not all(isinstance(v, str) for v in (state.job_id, state.nonce, state.request_digest, state.entity)):
        raise JobStateError(f"{path} is not a blindprune job state; move {out} aside and pass a new --out")
    return state


def write_state(out: Path, state: JobState) -> None:
    atomic_write(out / JOB_FILE, json.dumps(asdict(state), indent=2, sort_keys=True).encode())


def claim(out: Path, *, resume: bool) -> JobState | None:
    """The unfinished job this run continues (None: a new job), or a refusal that keeps jobs apart."""
    state = read_state(out)
    if state is None:
        if resume:
            raise JobStateError(f"{out} holds no unfinished job to resume (no {JOB_FILE}); run without --resume to start one")
        left = [name for name in _OUTPUTS if (out / name).exists()]
        if left:
            raise JobStateError(f"{out} holds outputs of an earlier run ({', '.join(left)}) but no {JOB_FILE}; pass a new --out")
        return None
    if state.stage == "finished":
        raise JobStateError(f"{out} holds the finished job {state.job_id}; pass a new --out for a new job (two jobs' outputs are never mixed)")
    return state


def save_checkpoint(out: Path, checkpoint: Mapping[str, Any]) -> None:
    """The retraining state after an epoch, written whole or not at all."""
    import torch

    # Serialised in memory first: torch's zip writer turns a full disk into a RuntimeError that
    # hides the OSError; here the write is ours, so a full disk stays an OSError (one line).
    buffer = io.BytesIO()
    torch.save(dict(checkpoint), buffer)
    atomic_write(out / CHECKPOINT_FILE, buffer.getvalue())


def load_checkpoint(out: Path) -> dict[str, Any] | None:
    import torch

    path = out / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        return dict(torch.load(path, weights_only=True))
    except Exception as exc:  # a torn or foreign file: retrain from the received result instead
        raise JobStateError(f"{path} is unreadable ({type(exc).__name__}); delete it to retrain from the received result") from None
