"""The connection handler of every TLS listener (the inbound proxy, the webhook).

accept (``net.serve``) → wrap with the store's *current* context → handshake under
``handshake_timeout_s`` → (where the client speaks first) its first byte, under
``first_byte_timeout_s`` → connection facts (client address, TLS version, verified identity, from
the optional peer policy) → ``serve(stream, facts)``: the forward engine, tcp mode's relay, or the
webhook. The stream is closed when ``serve`` returns (whoever opened it closes it).

Waiting for the first byte here, before any per-connection state of the engine exists, is what
nginx does too (its request structures are made on the first byte): a handshaken connection that
has sent nothing yet holds the TLS stream, this task and one watch — no engine coroutines, no
cancel scope, no connection facts (docs/performance.md, "Idle memory").
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from . import net
from .config import HostPort
from .errors import HTTPError
from .http import headers as hdr
from .http.exchange import IDLE, ConnFacts, Drain
from .log import get_logger
from .metrics import Metrics
from .tls.listener import HandshakeFailed, handshake
from .tls.store import ContextStore
from .tls.stream import TLSStream

log = get_logger("inbound")   # the logger name operators filter on (docs/operations.md)


@dataclass(frozen=True)
class PeerVerdict:
    """What the mTLS policy concluded about a client certificate."""

    identity: str = ""                                   # for logs
    headers: tuple[tuple[bytes, bytes], ...] = ()        # XFCC / RFC 9440 headers for the app
    deny: HTTPError | None = None                        # 403 when outside the identity rules


PeerPolicy = Callable[[TLSStream], PeerVerdict]


@dataclass(frozen=True)
class TLSListenerConfig:
    name: str
    addr: HostPort
    handshake_timeout_s: float
    max_connections: int
    reuse_port: bool = False
    default_port: bytes = b"443"      # X-Forwarded-Port when the Host header names none
    # HTTP and the webhook: the client speaks first; a connection that sends nothing for this long
    # after its handshake is closed quietly (and a drain closes it at once). None (tcp mode: the
    # app may speak first): hand the stream to ``serve`` right after the handshake.
    first_byte_timeout_s: float | None = None


class ConnectionHandler:
    """Turns an accepted socket into a handshaken TLS stream and hands it to ``serve``."""

    def __init__(self, cfg: TLSListenerConfig, store: ContextStore, metrics: Metrics,
                 serve: Callable[[TLSStream, ConnFacts], Awaitable[None]],
                 peer_policy: PeerPolicy | None = None, protocol: str = "http",
                 drain: Drain | None = None) -> None:
        self.cfg = cfg
        self.drain = drain          # needed with first_byte_timeout_s: its watchdog and drain state
        self.store = store
        self.metrics = metrics
        self.serve = serve
        self.peer_policy = peer_policy
        self.protocol = protocol
        self._active = metrics.connections_active.labels(cfg.name, protocol)
        self._accepted = metrics.connections.labels(cfg.name, protocol)
        self._handshakes: dict[tuple[str, str], object] = {}

    def listener(self) -> net.Listener:
        """What ``net.serve`` binds for this handler."""
        cfg = self.cfg
        errors = self.metrics.accept_errors
        return net.Listener(cfg.name, cfg.addr, cfg.max_connections, reuse_port=cfg.reuse_port,
                            on_accept_error=lambda err: errors.labels(cfg.name, err).inc())

    async def __call__(self, sock: socket.socket, peer) -> None:
        ip, port = net.peer_host_port(peer)
        self._accepted.inc()
        self._active.inc()
        try:
            try:
                stream = await handshake(sock, self.store, self.cfg.handshake_timeout_s)
            except HandshakeFailed as exc:
                log.info("handshake failed", listener=self.cfg.name, client=f"{ip}:{port}",
                         reason=exc.reason, detail=exc.detail)
                self.metrics.handshake_failures.labels(self.cfg.name, exc.reason).inc()
                return
            version = stream.version() or "-"
            key = (version, "yes" if stream.session_reused() else "no")
            counter = self._handshakes.get(key)
            if counter is None:
                counter = self._handshakes[key] = self.metrics.handshakes.labels(self.cfg.name, *key)
            counter.inc()
            if self.cfg.first_byte_timeout_s is not None and not await self._first_byte(stream):
                return
            verdict = self.peer_policy(stream) if self.peer_policy else PeerVerdict()
            facts = ConnFacts(
                client=f"{ip}:{port}",
                forward=hdr.ForwardFacts(ip.encode(), b"https", self.cfg.default_port, verdict.headers),
                tls_version=version, identity=verdict.identity, deny=verdict.deny)
            try:
                await self.serve(stream, facts)
            finally:
                stream.close_now()
        finally:
            self._active.dec()

    async def _first_byte(self, stream: TLSStream) -> bool:
        """Wait until the client sends something (or EOF): False when it stayed silent past
        ``first_byte_timeout_s`` or a drain started (close quietly, as an idle keep-alive)."""
        drain = self.drain
        if drain is None:
            return True
        if drain.draining:
            return False
        if stream.ssl_object.pending() or net.readable_now(stream.fileno()):
            return True           # the request came with the handshake's last flight: no park
        watchdog = drain.watchdog
        watch = watchdog.watch_fd(stream.fileno())
        watch.arm(IDLE, self.cfg.first_byte_timeout_s)
        try:
            await trio.lowlevel.wait_readable(watch.fd)
        except trio.ClosedResourceError:
            pass          # woken by the watchdog: expired below
        finally:
            watchdog.forget(watch)
        return watch.expired is None
