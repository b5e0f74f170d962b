"""The plain-HTTP admin listener: /healthz, /readyz, /metrics, /certs, POST /shutdown.

Tiny by design: GET/POST only, no bodies larger than a few KiB, one request per connection is
fine for probes and scrapers, but keep-alive works too. Handlers are ``async (Request) -> Reply``.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus

import h11
import trio

from .. import net
from ..config import HostPort
from ..log import get_logger

log = get_logger("admin")

ADMIN_TIMEOUT_S = 10.0        # a probe or scrape that takes longer than this is dropped
MAX_ADMIN_HEAD = 8 * 1024
MAX_ADMIN_BODY = 64 * 1024
MAX_ADMIN_CONNECTIONS = 64


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


def admin_handler(routes: AdminRoutes) -> net.Handler:
    """The connection handler of the admin listener (run it with ``net.serve``)."""
    async def handle(sock: socket.socket, peer) -> None:
        stream = net.socket_stream(sock)
        client_ip, _ = net.peer_host_port(peer)
        try:
            with trio.move_on_after(ADMIN_TIMEOUT_S):
                await _serve_conn(stream, routes, client_ip)
        finally:
            stream.close_now()

    return handle


async def _serve_conn(stream: net.PlainStream, routes: AdminRoutes, client_ip: str) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_ADMIN_HEAD)
    while True:
        try:
            req, body = await _read_request(stream, conn)
        except (h11.RemoteProtocolError, ValueError):
            await stream.send_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 12\r\nconnection: close"
                                  b"\r\n\r\nbad request\n")
            return
        if req is None:
            return
        target = req.target.decode("ascii", "replace")
        path, _, query = target.partition("?")
        areq = AdminRequest(req.method.decode("ascii", "replace"), path, query, client_ip, body)
        try:
            reply = await routes.dispatch(areq)
        except Exception as exc:
            log.error("admin handler failed", path=path, error=repr(exc))
            reply = Reply.text(500, "internal error")
        headers = [("Content-Type", reply.content_type), ("Content-Length", str(len(reply.body))),
                   ("Cache-Control", "no-store"), *reply.headers]
        data = conn.send(h11.Response(status_code=reply.status, headers=headers,
                                      reason=_reason(reply.status)))
        if areq.method != "HEAD":
            data += conn.send(h11.Data(data=reply.body))
        data += conn.send(h11.EndOfMessage())
        await stream.send_all(data)
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        else:
            return


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


async def _read_request(stream: net.PlainStream, conn: h11.Connection):
    req = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            req = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_ADMIN_BODY:
                raise ValueError("body too large")
        elif isinstance(event, h11.EndOfMessage):
            return req, bytes(body)
        elif isinstance(event, h11.ConnectionClosed):
            return None, b""
