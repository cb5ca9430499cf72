"""Stage ``exchange``: the owner's SuperNode and executor, until the entity closes the job.

The owner runs a stock Flower SuperNode (``owner.supernode``) and its own executor, which runs
only the owner's installed ClientApp. The wait is on liveness, not one long timeout: each signed
message of the entity resets the clock, a ``stopping`` status ends the wait at once, and the
signed statuses drive the live display.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from owner.config import OwnerConfig, OwnerError


def _wait_replies_pushed(log_path: Path, count: int, timeout: float) -> None:
    """Let the SuperNode push the last reply before it is stopped (a stopped node loses it).

    The SuperNode reports each pushed reply in its log; its runtime API offers no such query.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if log_path.read_text(errors="replace").count("Sent successfully") >= count:
                time.sleep(1.0)  # the entity polls every 0.25 s: let it pull the goodbye
                return
        except OSError:
            return
        time.sleep(0.2)


def _supernode_exit(supernode, node_key: Path | None) -> str:
    """Why the SuperNode exited, with the fix when the entity refused its key."""
    reason = supernode.exit_reason() or "no output"
    if "Failed to activate SuperNode" in reason or "must be registered" in reason:
        key = f"{node_key}.pub" if node_key is not None else "a SuperNode public key (--node-key)"
        reason += f"; the entity runs --auth and has not registered this node: have its operator put {key} in the entity's HOME/nodes/"
    return reason


def exchange_stage(config: OwnerConfig, session, console) -> None:
    """Stage ``exchange``: the owner's SuperNode and executor until the entity closes the job.

    Liveness, not one long wait: once the entity has made its offer, each of its signed messages
    (admission, status, result) resets the clock; ``--stall-timeout`` seconds of silence means the
    entity is gone, and the error says how to resume.
    """
    from owner.client_app import build_client_app
    from owner.executor import ExecutorError, OwnerExecutor
    from protocol.flower_processes import ManagedProcess, flower_env, free_port, wait_for_port

    out = config.out
    runtime_port = free_port()
    node_cmd = [sys.executable, "-m", "owner.supernode", "--superlink", config.entity, "--isolation", "process"]
    node_cmd += ["--host", "127.0.0.1", "--port", str(runtime_port)]
    node_cmd += ["--root-certificates", str(config.tls_ca)] if config.tls_ca else ["--insecure"]
    node_cmd += ["--auth-supernode-private-key", str(config.node_key)] if config.node_key else []
    (out / "flwr").mkdir(exist_ok=True)
    supernode = ManagedProcess("SuperNode", node_cmd, out / "supernode.log", flower_env(out / "flwr"))

    def watch() -> None:
        if _finish_overdue(session):
            session.finish("finish not received (the entity stopped after sending the result)")
            return
        if session.status is not None and session.status.state == "stopping" and session.outcome is None:
            job = session.job_id or session.offer_job
            hint = f"run `python -m owner.run --resume {out}`" if session.request_digest else "run again"
            raise OwnerError(f"the entity is shutting down (its operator stopped it); it keeps job {job}: when it is back, {hint}")
        silent = time.monotonic() - session.last_heard
        if session.offer_job is not None and session.outcome is None and silent > config.stall_timeout:
            job = session.job_id or session.offer_job
            hint = f"; when it is back, run `python -m owner.run --resume {out}`" if session.request_digest else "; try again when it is back"
            raise OwnerError(f"the entity has sent nothing for {silent:.0f} s (job {job}): it stopped or is unreachable{hint}")

    try:
        supernode.start()
        wait_for_port(supernode, "127.0.0.1", runtime_port, 30)
        executor = OwnerExecutor(f"127.0.0.1:{runtime_port}", build_client_app(session), on_fab=session.note_ignored_fab)
        try:
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn

            columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn())
            with Progress(*columns, console=console, transient=True, disable=console.quiet) as shown:
                task = shown.add_task("waiting for the entity's offer...", total=None)

                def on_status(status) -> None:
                    # A bar only while the engine reports how far it is; otherwise a spinner and the text.
                    total = 100 if status.state == "pruning" and status.percent is not None else None
                    shown.update(task, description=_describe_status(status), total=total, completed=status.percent or 0)

                session.on_status = on_status
                executor.run_until(
                    lambda: session.finished,
                    config.timeout,
                    first_task_timeout=config.connect_timeout + 60,
                    alive=supernode.running,
                    watch=watch,
                )
        except (TimeoutError, ExecutorError) as exc:
            why = "" if supernode.running() else f": {_supernode_exit(supernode, config.node_key)}"
            raise OwnerError(f"{exc}{why} (entity {config.entity}; SuperNode log: {supernode.log_path})") from None
        except OwnerError:
            raise
        except Exception:
            # A SuperNode the entity refuses (an unregistered --node-key, say) opens its runtime port
            # and exits a moment later: report Flower's reason, not the executor's connection error.
            deadline = time.monotonic() + 5
            while supernode.running() and time.monotonic() < deadline:
                time.sleep(0.1)
            if supernode.running():
                raise
            raise OwnerError(f"the SuperNode stopped: {_supernode_exit(supernode, config.node_key)} (SuperNode log: {supernode.log_path})") from None
        else:
            # The goodbye is the last reply: stopping the SuperNode before it is pushed loses it.
            _wait_replies_pushed(supernode.log_path, executor.tasks_run, timeout=15)
        finally:
            executor.close()
    finally:
        supernode.stop()


FINISH_GRACE_SECONDS = 30.0


def _finish_overdue(session) -> bool:
    """Whether the result is verified and kept but the entity's finish is overdue: stop waiting then.

    The job's outcome is the result; a lost finish (the entity stopped right after it) must not
    turn a delivered job into a failure.
    """
    return session.outcome_at is not None and not session.finished and time.monotonic() - session.outcome_at >= FINISH_GRACE_SECONDS


def _describe_status(status) -> str:
    """One line for the live display; the entity's texts are escaped (they are not ours)."""
    from rich.markup import escape

    from protocol.display import printable

    if status.state == "queued":
        eta = f", about {status.estimate_s // 60} min {status.estimate_s % 60} s to start" if status.estimate_s is not None else ""
        return f"queued at the entity: position {status.position}{eta}"
    if status.state == "pruning":
        done = f" {status.percent}%" if status.percent is not None else ""
        where = f" {escape(printable(status.phase, 40))}" if status.phase else ""
        layer = f" {escape(printable(status.layer, 60))}" if status.layer else ""
        return f"pruning at the entity ({status.elapsed_s} s):{where}{layer}{done}"
    if status.state == "stopping":
        return "the entity is shutting down..."
    return "pruned; the entity is sending the result..."
