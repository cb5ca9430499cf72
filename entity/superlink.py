"""``python -m entity.superlink``: flwr 1.41's SuperLink with the owners' address serving the Fleet API only.

Why this exists: ``flower-superlink`` 1.41 serves the Control API (``flwr run``/``ls``/``stop``),
the Runtime API the ServerApp uses and the Fleet API SuperNodes use from one FastAPI app on one
``--host``/``--port`` (its ``--control-api-address`` and ``--fleet-api-address`` are deprecated
and only feed legacy gRPC servers that are off by default). The Control API has no
authentication of its own, so anyone who reached the owners' port could submit a ServerApp that
runs as the entity's user. This launcher builds the very same app (flwr's own argument parsing,
``create_app`` and lifespan, so the SuperExec and every ServerApp are flwr's) and serves it from
one uvicorn server on two sockets:

* ``--host``/``--port`` (must be loopback): every API; the SuperExec, the ServerApp and the
  entity's ``flwr`` CLI connect here;
* ``--fleet-host``/``--fleet-port``: the owners' address; a request for any path other than a
  Fleet API route (``/v1/fleet/<name>``) is answered 404 before it reaches the app.

Which socket a request came in on is uvicorn's ``scope["server"]`` (the local address of the
connection); only the loopback control port is trusted, anything else is treated as public.
The whole process tree runs with umask 077, so the SuperLink database is created 0600.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

FLEET_PATH = re.compile(r"/v1/fleet/[a-z][a-z-]*")
# flwr starts legacy gRPC Control/Fleet servers (on 0.0.0.0 by default) when these are "1".
LEGACY_GRPC_SWITCHES = ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API")


class FleetOnlyOnPublic:
    """ASGI wrapper: requests that did not arrive on the loopback control port reach Fleet routes only."""

    def __init__(self, app: ASGIApp, control_port: int):
        self.app = app
        self.control_port = control_port

    def trusted(self, scope: Scope) -> bool:
        server = scope.get("server")
        if not server or len(server) < 2:
            return False
        try:
            loopback = ipaddress.ip_address(str(server[0])).is_loopback
        except ValueError:
            return False
        return loopback and int(server[1]) == self.control_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self.trusted(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "http" and FLEET_PATH.fullmatch(str(scope.get("path", ""))):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = b"not found on this address\n"
        await send(
            {
                "type": "http.response.start",
                "status": 404,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _bind(host: str, port: int) -> socket.socket:
    """A bound (not yet listening) TCP socket; uvicorn starts listening after the app's start-up."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"entity.superlink: error: cannot bind {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


def _own_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m entity.superlink", add_help=False)
    parser.add_argument("--fleet-host", required=True, help="address owners' SuperNodes connect to")
    parser.add_argument("--fleet-port", type=int, required=True, help="port owners' SuperNodes connect to")
    return parser.parse_known_args(argv)


def _tie_to_parent() -> int:
    """Make this process the root of every Flower process it starts, and end with its parent.

    ``entity.serve`` may die by SIGKILL, which it cannot catch: Linux then sends this process
    SIGTERM (a parent-death signal), and as a child subreaper it also adopts any SuperExec or
    ServerApp whose own parent went first, so ``_stop_descendants`` finds them all. A restart then
    finds the ports free. Returns the parent's pid.
    """
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent went before the request above took effect
        raise SystemExit("entity.superlink: error: entity.serve ended during start-up")
    return parent


def _stop_descendants(grace: float = 5.0) -> None:
    """SIGTERM every process below this one, then SIGKILL what is left after ``grace`` seconds."""
    from protocol.flower_processes import descendants, pid_alive

    tree = descendants(os.getpid())
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(pid_alive(pid) for pid in tree):
        time.sleep(0.1)
    for pid in [*tree, *descendants(os.getpid())]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> None:
    """Parse flower-superlink's own flags (all but ``--fleet-*``) with flwr, then serve both sockets."""
    _tie_to_parent()
    # uvicorn re-raises a SIGTERM it caught once it has shut down, with the handler it found: under
    # the default one the process would die there and never stop its children. Ours exits Python
    # cleanly, so the ``finally`` below runs (the parent-death signal is a SIGTERM too).
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        _serve(argv)
    finally:
        _stop_descendants()


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _serve(argv: list[str] | None) -> None:
    own, rest = _own_args(sys.argv[1:] if argv is None else argv)
    os.umask(0o077)
    for name in LEGACY_GRPC_SWITCHES:
        os.environ.pop(name, None)

    import uvicorn
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler
    from flwr.superlink.cli.flower_superlink import SuperLinkLifespan, _parse_superlink_lifespan_config
    from flwr.superlink.main import create_app

    sys.argv = ["flower-superlink", *rest]
    config = _parse_superlink_lifespan_config()
    try:
        control_is_loopback = ipaddress.ip_address(config.host.strip("[]")).is_loopback
    except ValueError:
        control_is_loopback = False
    if not control_is_loopback:
        raise SystemExit(f"entity.superlink: error: --host {config.host} is not a loopback address; the Control API must stay on 127.0.0.1")
    if own.fleet_port == config.port:
        raise SystemExit("entity.superlink: error: --fleet-port must differ from --port (the loopback control port)")
    control = _bind(config.host, config.port)
    fleet = _bind(own.fleet_host, own.fleet_port)
    app = FleetOnlyOnPublic(create_app(config, SuperLinkLifespan), control_port=config.port)
    server = uvicorn.Server(
        uvicorn.Config(
            app=app,
            host=config.host,
            port=config.port,
            reload=False,
            access_log=True,
            workers=1,
            lifespan="on",
            log_config=get_uvicorn_log_config(console_handler.level),
            ssl_keyfile=config.ssl_keyfile,
            ssl_certfile=config.ssl_certfile,
            timeout_graceful_shutdown=5,
        )
    )
    server.run(sockets=[control, fleet])


if __name__ == "__main__":
    main()
