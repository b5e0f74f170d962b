"""The plain-HTTP listener (``--http-listen``), in one of two modes (``--http-mode``):

``redirect``
    every request is answered ``301 Moved Permanently`` to the same host and path on the HTTPS port
    clients see (``--redirect-port``); the Location is computed by the pure
    :func:`tlsproxy.http.redirect.redirect_location`. The connection closes after the answer: a
    client that follows the redirect opens a TLS connection anyway.
``forward``
    requests are proxied to the app by the same forward engine as the TLS listener, under a
    :class:`~tlsproxy.http.forward.Route` named ``http``: the app sees ``X-Forwarded-Proto: http``
    and the access log line carries ``scheme=http``.

(``off`` means the App never starts this listener.) Both modes share the accept loop of
:mod:`tlsproxy.net`, so a drain closes this listener together with the TLS one.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

import h11
import trio

from .. import net
from ..config import HostPort
from ..errors import HTTPError
from ..http import headers as hdr
from ..http.exchange import ConnFacts
from ..http.forward import Forwarder
from ..http.redirect import redirect_location
from ..log import get_logger
from ..metrics import Metrics

log = get_logger("inbound")
access = get_logger("access")

LINGER_S = 1.0                    # after answering, read (and drop) what the client still sends
LINGER_BYTES = 64 * 1024
PLAIN_DEFAULT_PORT = b"80"        # X-Forwarded-Port when a plain request's Host names no port


@dataclass(frozen=True)
class PlainListenerConfig:
    addr: HostPort
    mode: str                      # "redirect" or "forward"
    redirect_port: int = 443
    head_timeout_s: float = 10.0
    max_head_bytes: int = 32 * 1024
    max_connections: int = 10_000
    access_log: bool = True
    name: str = "http"


class PlainHandler:
    """One accepted plain-HTTP connection: redirect it, or hand it to the forward engine."""

    def __init__(self, cfg: PlainListenerConfig, metrics: Metrics,
                 forwarder: Forwarder | None = None) -> None:
        if cfg.mode == "forward" and forwarder is None:
            raise ValueError("forward mode needs a Forwarder")
        self.cfg = cfg
        self.metrics = metrics
        self.forwarder = forwarder
        self._active = metrics.connections_active.labels(cfg.name, "http")
        self._accepted = metrics.connections.labels(cfg.name, "http")

    async def __call__(self, sock: socket.socket, peer) -> None:
        ip, port = net.peer_host_port(peer)
        self._accepted.inc()
        self._active.inc()
        stream = net.PlainStream(sock)
        try:
            if self.cfg.mode == "forward":
                assert self.forwarder is not None
                facts = ConnFacts(client=f"{ip}:{port}",
                                  forward=hdr.ForwardFacts(ip.encode(), b"http", PLAIN_DEFAULT_PORT),
                                  extra_log={"scheme": "http"})
                await self.forwarder.serve(stream, facts)
            else:
                await self._redirect(stream, f"{ip}:{port}")
        finally:
            self._active.dec()
            await trio.aclose_forcefully(stream)

    async def _redirect(self, stream: trio.SocketStream, client: str) -> None:
        cfg = self.cfg
        t0 = time.perf_counter()
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=cfg.max_head_bytes)
        req: h11.Request | None = None
        with trio.move_on_after(cfg.head_timeout_s):
            try:
                req = await _read_head(stream, conn)
            except h11.RemoteProtocolError as exc:
                await self._answer(stream, client, b"-", b"-",
                                   HTTPError(exc.error_status_hint, "bad request"), t0)
                return
        if req is None:
            return      # EOF, or the head did not arrive in time: nothing to answer
        host = dict(req.headers).get(b"host")
        try:
            location = redirect_location(host, req.target, cfg.redirect_port)
        except HTTPError as err:
            await self._answer(stream, client, req.method, req.target, err, t0)
            return
        body = b"Moved to " + location + b"\n"
        head = [b"HTTP/1.1 301 Moved Permanently", b"location: " + location,
                b"content-type: text/plain; charset=utf-8", b"content-length: %d" % len(body),
                b"connection: close"]
        await self._send(stream, b"\r\n".join(head) + b"\r\n\r\n" + (b"" if req.method == b"HEAD" else body))
        self._log(client, req.method, req.target, 301, t0, location=location.decode("ascii", "replace"))
        await self._linger(stream)

    async def _answer(self, stream: trio.SocketStream, client: str, method: bytes, target: bytes,
                      err: HTTPError, t0: float) -> None:
        self.metrics.client_errors.labels(self.cfg.name, str(err.status)).inc()
        await self._send(stream, hdr.error_response(err.status, err.reason))
        self._log(client, method, target, err.status, t0, note=err.kind)
        await self._linger(stream)

    async def _send(self, stream: trio.SocketStream, data: bytes) -> None:
        try:
            with trio.move_on_after(self.cfg.head_timeout_s):
                await stream.send_all(data)
                await stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    @staticmethod
    async def _linger(stream: trio.SocketStream) -> None:
        """Closing with unread request bytes would reset the connection and could destroy the
        answer before the client reads it: read and drop a little first."""
        try:
            with trio.move_on_after(LINGER_S):
                drained = 0
                while drained < LINGER_BYTES:
                    chunk = await stream.receive_some(16384)
                    if not chunk:
                        break
                    drained += len(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    def _log(self, client: str, method: bytes, target: bytes, status: int, t0: float, **extra: str) -> None:
        duration = time.perf_counter() - t0
        self.metrics.requests.labels(self.cfg.name, f"{status // 100}xx").inc()
        self.metrics.request_duration.labels(self.cfg.name).observe(duration)
        if self.cfg.access_log:
            access.info("request", listener=self.cfg.name, client=client, scheme="http",
                        method=method.decode("ascii", "replace"),
                        path=target.decode("ascii", "replace")[:2048], status=status,
                        duration_ms=round(duration * 1000, 3), **extra)


async def _read_head(stream: trio.SocketStream, conn: h11.Connection) -> h11.Request | None:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return None
            if not data:
                return None
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            return event
        return None


async def serve_plain(cfg: PlainListenerConfig, handler: PlainHandler, handlers: trio.Nursery, *,
                      task_status: trio.TaskStatus[HostPort] = trio.TASK_STATUS_IGNORED) -> None:
    """Bind and accept forever; each connection's handler runs in ``handlers``."""
    sockets = net.bind(cfg.addr)
    bound = net.bound_address(sockets)
    on_error = lambda err: handler.metrics.accept_errors.labels(cfg.name, err).inc()  # noqa: E731
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: net.serve_listeners(
            sockets, handler, handlers, name=cfg.name, max_connections=cfg.max_connections,
            on_accept_error=on_error, task_status=task_status))
        log.info("listening", listener=cfg.name, addr=str(cfg.addr), bound=str(bound), mode=cfg.mode,
                 **({"redirect_port": cfg.redirect_port} if cfg.mode == "redirect" else {}))
        task_status.started(bound)
