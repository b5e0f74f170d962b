"""``tlsproxy demo``: a small built-in HTTP app behind the proxy, so a newcomer sees it work.

The demo app answers every request with a JSON echo of what it received (method, path, the
X-Forwarded-* headers the proxy added), which shows what an unmodified app sees behind tlsproxy.
"""

from __future__ import annotations

import json
import socket

import trio

from . import log as logging_setup
from . import net
from .app import App, run_main
from .config import HostPort, Settings, Upstream
from .http.deadlines import tick_for
from .http.exchange import ConnFacts, Drain, Limits, LocalRequest, LocalResponse, Route
from .http.forward import Forwarder
from .http.headers import ForwardFacts
from .metrics import Metrics

DEMO_MAX_BODY_BYTES = 16 * 1024 * 1024   # the echo counts a body; it reads it whole first
DEMO_LIMITS = Limits(max_body_bytes=DEMO_MAX_BODY_BYTES)


async def _echo(req: LocalRequest) -> LocalResponse:
    echo = {
        "app": "tlsproxy demo",
        "method": req.method, "path": req.target,
        "headers": {name.decode("latin-1"): value.decode("latin-1") for name, value in req.headers},
        "body_bytes": len(req.body),
    }
    return LocalResponse(200, (json.dumps(echo, indent=2) + "\n").encode(),
                         [("Content-Type", "application/json")])


async def serve_demo_app(port: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """The demo app on 127.0.0.1:``port``: a local handler of the engine on a plain listener (the
    same HTTP/1.1 loop as every listener of the proxy). ``started`` hands back the bound port."""
    drain = Drain()
    drain.watchdog.tick_s = tick_for(DEMO_LIMITS.head_timeout_s)
    route = Route(name="demo", pool=None, limits=DEMO_LIMITS, access_log=False, local=_echo,
                  max_local_body_bytes=DEMO_MAX_BODY_BYTES)
    forwarder = Forwarder(route, Metrics(), drain)     # its own registry: the app is not the proxy

    async def handle(sock: socket.socket, peer) -> None:
        ip, peer_port = net.peer_host_port(peer)
        stream = net.PlainStream(sock)
        try:
            await forwarder.serve(stream, ConnFacts(client=f"{ip}:{peer_port}",
                                                    forward=ForwardFacts(ip.encode(), b"http", b"80")))
        finally:
            stream.close_now()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain.watchdog.run)
        bound = await nursery.start(net.serve, net.Listener("demo", HostPort("127.0.0.1", port), 256,
                                                             log_event="demo app listening"),
                                    handle, nursery)
        task_status.started(bound.port)


def main_demo(settings: Settings, app_port: int = 0) -> int:
    logging_setup.setup(settings.log_format, settings.log_level)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_demo_app, app_port)
            app = App(settings.replace(upstream=Upstream("http", "127.0.0.1", port)))
            app.load_certificates()
            await app.run_with_signals()
            nursery.cancel_scope.cancel()

    return run_main(run)
