"""The owner's own executor: takes tasks from its SuperNode and runs the owner's installed ClientApp.

A stock SuperNode installs the app bundle (FAB) the server side sends and runs the ClientApp in
it, next to the owner's private data. Started with ``--isolation process`` it launches nothing;
this executor acquires each task on the SuperNode's runtime API, pulls the message, and runs the
``ClientApp`` object it was given. The task's FAB is received (Flower sends it) but never
installed, imported or executed; it is only reported, so the owner can log that it was ignored.
This uses flwr's internal runtime client, so flwr is pinned and this path is tested.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
from flwr.clientapp import ClientApp
from flwr.common.constant import SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry.retry_invoker import RetryInvoker, exponential
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output


class ExecutorTimeout(TimeoutError):
    """No task (or not the expected ones) arrived in time."""


class ExecutorError(RuntimeError):
    """A task could not be pulled, run or answered."""


_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


def _retry_invoker() -> RetryInvoker:
    """Retry transient failures a few times, then raise. Flower's own invoker SIGINTs its process
    on an authentication failure (meant for a task process of its own); this executor lives in the
    owner's main process, so a failure must surface as an exception instead."""

    def give_up(exc: Exception) -> bool:
        if isinstance(exc, httpx.HTTPStatusError):
            return exc.response.status_code not in _RETRY_STATUS
        return False

    return RetryInvoker(
        wait_gen_factory=lambda: exponential(max_delay=2),
        recoverable_exceptions=(httpx.TransportError, httpx.HTTPStatusError),
        max_tries=5,
        max_time=30,
        on_success=None,
        on_backoff=None,
        on_giveup=None,
        should_giveup=give_up,
    )


def _client(address: str, *interceptors) -> RuntimeHttpClient:
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,
        root_certificates=None,
        interceptors=list(interceptors),
        retry_invoker=_retry_invoker(),
    )


class OwnerExecutor:
    """Runs tasks from one SuperNode (on loopback) with one in-process ClientApp."""

    def __init__(self, runtime_address: str, app: ClientApp, on_fab: Callable[[str, int], None] | None = None):
        self.address = runtime_address
        self.app = app
        self.on_fab = on_fab
        self.poller = _client(runtime_address, RuntimeVersionHttpInterceptor(component_name="SuperExec"))
        self.tasks_run = 0

    def run_one(self) -> bool:
        """Acquire and run one task if one is waiting; return whether one ran."""
        try:
            res = self.poller.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP], agentapp_fab_hashes=[]))
        except httpx.HTTPError as exc:  # retried already: the SuperNode's runtime API is gone
            raise ExecutorError(f"the owner's SuperNode stopped answering on {self.address} ({type(exc).__name__})") from exc
        if not (res.HasField("task") and res.token):
            return False
        client = _client(self.address, RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), RuntimeTokenHttpInterceptor(res.token))
        context = None
        try:
            message, context, _run, fab = pull_task_input(client)
            if self.on_fab is not None:
                self.on_fab(fab.hash_str, len(fab.content))
            reply = self.app(message=message, context=context)
            push_message(client, reply, context)
            push_task_output(client, context, SubStatus.COMPLETED, "")
            self.tasks_run += 1
        except Exception as exc:
            try:
                push_task_output(client, context, SubStatus.FAILED, f"{type(exc).__name__}: {exc}")
            except Exception:  # the SuperNode may already have dropped the task
                pass
            raise ExecutorError(f"task {res.task.task_id} failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
        finally:
            client.close()
        return True

    def run_until(
        self,
        done: Callable[[], bool],
        timeout: float,
        *,
        first_task_timeout: float | None = None,
        poll: float = 0.1,
        alive: Callable[[], bool] = lambda: True,
        watch: Callable[[], None] | None = None,
    ) -> None:
        """Run tasks until ``done()``; raise ExecutorTimeout past ``timeout`` (or no first task in time).

        ``watch`` is called between tasks and may raise to end the wait (the owner's liveness check).
        """
        start = time.monotonic()
        ran_any = False
        while not done():
            if not alive():
                raise ExecutorTimeout("the SuperNode stopped")
            if watch is not None:
                watch()
            if self.run_one():
                ran_any = True
                continue
            elapsed = time.monotonic() - start
            if not ran_any and first_task_timeout is not None and elapsed > first_task_timeout:
                raise ExecutorTimeout(f"no offer from the entity within {first_task_timeout:.0f} s")
            if elapsed > timeout:
                raise ExecutorTimeout(f"the job did not finish within {timeout:.0f} s")
            time.sleep(poll)

    def close(self) -> None:
        self.poller.close()
