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

import trio

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


def _local(routes: AdminRoutes):
    """The admin routes as a local handler of the engine."""
    async def answer(req: LocalRequest) -> LocalResponse:
        areq = AdminRequest(req.method, req.path, req.query, req.client_ip, req.body)
        try:
            reply = await routes.dispatch(areq)
        except Exception as exc:
            log.error("admin handler failed", path=areq.path, error=repr(exc))
            reply = Reply.text(500, "internal error")
        headers = [("Content-Type", reply.content_type), ("Cache-Control", "no-store"), *reply.headers]
        return LocalResponse(reply.status, reply.body, headers)

    return answer


async def serve_admin(addr: HostPort, routes: AdminRoutes, *,
                      task_status: trio.TaskStatus[HostPort] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``routes`` on ``addr`` with the engine's HTTP/1.1 loop (a local route named ``admin``).
    The admin listener has its own deadline watchdog and never drains: probes keep their answers
    (``/readyz`` says 503) while the proxy drains."""
    sockets = net.bind(addr)
    bound = net.bound_address(sockets)
    drain = Drain()
    drain.watchdog.tick_s = tick_for(ADMIN_TIMEOUT_S)
    route = Route(name="admin", pool=None, limits=ADMIN_LIMITS, access_log=False, local=_local(routes),
                  max_local_body_bytes=MAX_ADMIN_BODY)
    forwarder = Forwarder(route, Metrics(), drain)     # its own registry: probes are not app traffic

    async def handle(sock: socket.socket, peer) -> None:
        ip, port = net.peer_host_port(peer)
        stream = net.PlainStream(sock)
        try:
            await forwarder.serve(stream, ConnFacts(client=f"{ip}:{port}",
                                                    forward=ForwardFacts(ip.encode(), b"http", b"80")))
        finally:
            stream.close_now()

    async with trio.open_nursery() as handlers:
        handlers.start_soon(drain.watchdog.run)
        await handlers.start(lambda task_status: net.serve_listeners(
            sockets, handle, handlers, name="admin", max_connections=MAX_ADMIN_CONNECTIONS,
            task_status=task_status))
        log.info("admin listening", addr=str(addr), bound=str(bound))
        task_status.started(bound)
