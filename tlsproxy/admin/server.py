"""The plain-HTTP admin listener: /healthz, /readyz, /metrics, /certs, POST /shutdown.

Tiny by design: GET/POST only, no bodies larger than a few KiB, one request per connection is
fine for probes and scrapers, but keep-alive works too. Handlers are ``async (Request) -> Reply``;
the HTTP/1.1 connection is the engine's (``http/forward.py``), with the admin routes as its local
handler (``http/local.py``): one server loop for every listener.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from .. import net
from ..config import HostPort
from ..http.deadlines import tick_for
from ..http.exchange import ConnFacts, Drain, Limits, LocalRequest, LocalResponse, Route
from ..http.forward import Forwarder
from ..http.headers import ForwardFacts
from ..log import get_logger
from ..metrics import Metrics

log = get_logger("admin")

ADMIN_TIMEOUT_S = 10.0        # a probe or scrape that takes longer than this is dropped
MAX_ADMIN_HEAD = 8 * 1024
MAX_ADMIN_BODY = 64 * 1024
MAX_ADMIN_CONNECTIONS = 64
ADMIN_LIMITS = Limits(max_head_bytes=MAX_ADMIN_HEAD, max_body_bytes=MAX_ADMIN_BODY,
                      head_timeout_s=ADMIN_TIMEOUT_S, body_timeout_s=ADMIN_TIMEOUT_S,
                      idle_timeout_s=ADMIN_TIMEOUT_S, min_body_rate_bps=0)


@dataclass(frozen=True)
class AdminRequest:
    method: str
    path: str
    query: str
    client_ip: str
    body: bytes = b""


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def json(cls, status: int, data: object) -> Reply:
        return cls(status, (json.dumps(data, indent=2, default=str) + "\n").encode(), "application/json")

    @classmethod
    def text(cls, status: int, text: str) -> Reply:
        return cls(status, (text.rstrip("\n") + "\n").encode())


Handler = Callable[[AdminRequest], Awaitable[Reply]]


class AdminRoutes:
    def __init__(self) -> None:
        self._routes: dict[str, tuple[tuple[str, ...], Handler]] = {}

    def add(self, path: str, handler: Handler, methods: tuple[str, ...] = ("GET", "HEAD")) -> None:
        self._routes[path] = (methods, handler)

    async def dispatch(self, req: AdminRequest) -> Reply:
        route = self._routes.get(req.path)
        if route is None:
            return Reply.text(404, f"not found: {req.path}")
        methods, handler = route
        if req.method not in methods:
            return Reply(405, b"method not allowed\n", headers=[("Allow", ", ".join(methods))])
        return await handler(req)


def admin_listener(addr: HostPort) -> net.Listener:
    """What ``net.serve`` binds for the admin endpoints."""
    return net.Listener("admin", addr, MAX_ADMIN_CONNECTIONS, log_event="admin listening")


class AdminHandler:
    """The admin listener's connection handler (run it with ``net.serve``): the engine's HTTP/1.1
    loop with the admin routes as its local handler. It has a deadline watchdog of its own (run
    :meth:`watchdog` beside it) and never drains: probes keep their answers (``/readyz`` says 503)
    while the proxy drains."""

    def __init__(self, routes: AdminRoutes) -> None:
        self._routes = routes
        self._drain = Drain()
        self._drain.watchdog.tick_s = tick_for(ADMIN_TIMEOUT_S)
        route = Route(name="admin", pool=None, limits=ADMIN_LIMITS, access_log=False, local=self._answer,
                      max_local_body_bytes=MAX_ADMIN_BODY)
        self._forwarder = Forwarder(route, Metrics(), self._drain)  # own registry: probes are not app traffic

    async def watchdog(self) -> None:
        await self._drain.watchdog.run()

    async def _answer(self, req: LocalRequest) -> LocalResponse:
        areq = AdminRequest(req.method, req.path, req.query, req.client_ip, req.body)
        try:
            reply = await self._routes.dispatch(areq)
        except Exception as exc:
            log.error("admin handler failed", path=areq.path, error=repr(exc))
            reply = Reply.text(500, "internal error")
        headers = [("Content-Type", reply.content_type), ("Cache-Control", "no-store"), *reply.headers]
        return LocalResponse(reply.status, reply.body, headers)

    async def __call__(self, sock: socket.socket, peer) -> None:
        ip, port = net.peer_host_port(peer)
        stream = net.PlainStream(sock)
        try:
            await self._forwarder.serve(stream, ConnFacts(client=f"{ip}:{port}",
                                                          forward=ForwardFacts(ip.encode(), b"http", b"80")))
        finally:
            stream.close_now()
