"""The plain-HTTP listener (``--http-listen``), in one of two modes (``--http-mode``):

``redirect``
    every request is answered ``301 Moved Permanently`` to the same host and path on the HTTPS port
    clients see (``--redirect-port``); the Location is computed by the pure
    :func:`tlsproxy.http.redirect.redirect_location`. The answer is a *local handler* of the engine
    (:func:`redirect_handler`), so the redirect port has the engine's head limits, timeouts, error
    answers and access-log line. The connection closes after the answer: a client that follows the
    redirect opens a TLS connection anyway.
``forward``
    requests are proxied to the app by the same forward engine as the TLS listener, under a
    :class:`~tlsproxy.http.exchange.Route` named ``http``: the app sees ``X-Forwarded-Proto: http``
    and the access log line carries ``scheme=http``.

(``off`` means the App never starts this listener.) Both modes are served by ``net.serve``, the
serve function of every listener, so a drain closes this listener together with the TLS one.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from .. import net
from ..config import HostPort
from ..http import headers as hdr
from ..http.exchange import ConnFacts, LocalHandler, LocalRequest, LocalResponse
from ..http.forward import Forwarder
from ..http.redirect import redirect_location
from ..log import get_logger
from ..metrics import Metrics

log = get_logger("inbound")

PLAIN_DEFAULT_PORT = b"80"        # X-Forwarded-Port when a plain request's Host names no port


@dataclass(frozen=True)
class PlainListenerConfig:
    addr: HostPort
    mode: str                      # "redirect" or "forward"
    redirect_port: int = 443
    max_connections: int = 10_000
    name: str = "http"


def redirect_handler(redirect_port: int) -> LocalHandler:
    """The local handler of redirect mode: 301 to https on ``redirect_port`` (400 for a bad Host)."""
    async def answer(req: LocalRequest) -> LocalResponse:
        location = redirect_location(req.header(b"host"), req.target.encode("ascii"), redirect_port)
        return LocalResponse(301, b"Moved to " + location + b"\n",
                             [("location", location.decode("ascii")),
                              ("content-type", "text/plain; charset=utf-8")], close=True)

    return answer


class PlainHandler:
    """One accepted plain-HTTP connection → the engine (a forwarding or a redirecting route)."""

    def __init__(self, cfg: PlainListenerConfig, metrics: Metrics, forwarder: Forwarder) -> None:
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
        stream = net.PlainStream(sock)
        try:
            facts = ConnFacts(client=f"{ip}:{port}",
                              forward=hdr.ForwardFacts(ip.encode(), b"http", PLAIN_DEFAULT_PORT),
                              extra_log={"scheme": "http"})
            await self.forwarder.serve(stream, facts)
        finally:
            self._active.dec()
            stream.close_now()
