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

(``off`` means the App never starts this listener.) Both modes are served by ``net.serve``, the
serve function of every listener, so a drain closes this listener together with the TLS one.
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
from ..http.forward import ConnFacts, Forwarder
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

    def listener(self) -> net.Listener:
        """What ``net.serve`` binds for this handler."""
        cfg = self.cfg
        errors = self.metrics.accept_errors
        extra: tuple[tuple[str, object], ...] = (("mode", cfg.mode),)
        if cfg.mode == "redirect":
            extra += (("redirect_port", cfg.redirect_port),)
        return net.Listener(cfg.name, cfg.addr, cfg.max_connections, log_fields=extra,
                            on_accept_error=lambda err: errors.labels(cfg.name, err).inc())

    async def __call__(self, sock: socket.socket, peer) -> None:
        ip, port = net.peer_host_port(peer)
        self._accepted.inc()
        self._active.inc()
        stream = net.socket_stream(sock)
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

    async def _redirect(self, stream: net.PlainStream, client: str) -> None:
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
        # h11's public view of the headers: (lowercased name, value) pairs
        host = next((value for name, value in req.headers if name == b"host"), None)
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

    async def _answer(self, stream: net.PlainStream, client: str, method: bytes, target: bytes,
                      err: HTTPError, t0: float) -> None:
        self.metrics.client_errors.labels(self.cfg.name, str(err.status)).inc()
        await self._send(stream, hdr.error_response(err.status, err.reason))
        self._log(client, method, target, err.status, t0, note=err.kind)
        await self._linger(stream)

    async def _send(self, stream: net.PlainStream, data: bytes) -> None:
        try:
            with trio.move_on_after(self.cfg.head_timeout_s):
                await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    @staticmethod
    async def _linger(stream: net.PlainStream) -> None:
        """Closing with unread request bytes would reset the connection and could destroy the
        answer before the client reads it: the stream's lingering close reads and drops a little."""
        await stream.linger_close(LINGER_S, LINGER_BYTES)

    def _log(self, client: str, method: bytes, target: bytes, status: int, t0: float, **extra: str) -> None:
        duration = time.perf_counter() - t0
        self.metrics.requests.labels(self.cfg.name, f"{status // 100}xx").inc()
        self.metrics.request_duration.labels(self.cfg.name).observe(duration)
        if self.cfg.access_log:
            access.info("request", listener=self.cfg.name, client=client, scheme="http",
                        method=method.decode("ascii", "replace"),
                        path=target.decode("ascii", "replace")[:2048], status=status,
                        duration_ms=round(duration * 1000, 3), **extra)


async def _read_head(stream: net.PlainStream, conn: h11.Connection) -> h11.Request | None:
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
