"""Outbound: plain-HTTP listeners on this pod that originate verified TLS 1.3 to peers.

Two kinds of listener, both feeding THE forwarding engine (``http/forward.py``):

* a route listener (``--outbound LISTEN=URL`` or an ``outbound_routes`` entry) sends every request
  to its one peer: the engine's pool opens :class:`~.peers.PeerOpener` connections and the route
  rewrites ``Host`` to the peer's authority;
* the forward proxy (``--outbound-proxy``) reads absolute-form requests (``GET http://peer.ns.svc:8443/x``,
  what a client with ``HTTP_PROXY`` sends) and resolves each one through ``Route.resolve``: the
  destination is checked against the allow-list *as written* — refused with 403 before any name
  is resolved or any connection dialled — then sent over TLS with the origin-form target. A
  ``CONNECT host:port`` (the client speaks TLS itself) is checked the same way and tunnelled
  unchanged with ``relay.py``. The proxy only needs to tell CONNECT apart, so it peeks at the first
  bytes and replays them to the engine when the request is anything else.

Every listener binds loopback unless given an explicit address, and runs its accept loop in the
caller's *accept* nursery and its connections in the *handlers* nursery, so a drain stops accepting
first and gives in-flight requests their deadline.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import trio

from .. import net, tcprelay
from ..config import HostPort, Settings
from ..errors import HTTPError, UpstreamError
from ..http import headers as hdr
from ..http.exchange import ConnFacts, Destination, Drain, Limits, Route
from ..http.forward import Forwarder
from ..http.pool import Pool
from ..log import get_logger
from ..metrics import Metrics
from ..net import connect_tcp
from ..relay import relay
from ..tls.identity import AllowRules
from . import routes as _routes
from .peers import ClientTLS, PeerOpener, PeerPools

log = get_logger("outbound")
access = get_logger("access")

PROXY_LISTENER = "outbound-proxy"
DENIED_PEER = "not-allowed"   # the peer label of forward-proxy refusals
CONNECT_OK = b"HTTP/1.1 200 Connection established\r\n\r\n"
_CONNECT = b"CONNECT "


class Outbound:
    """Every outbound listener of one proxy, built once from Settings."""

    def __init__(self, settings: Settings, metrics: Metrics, drain: Drain, limits: Limits) -> None:
        s = settings
        self.settings = settings
        self.metrics = metrics
        self.drain = drain
        self.limits = limits
        self.routes = _routes.parse_routes(s.outbound, s.outbound_routes)
        self.allow = _routes.parse_allow(s.outbound_allow)
        self.proxy_addr = _routes.local_listen(str(s.outbound_proxy), "--outbound-proxy") \
            if s.outbound_proxy is not None else None
        self._tls: dict[tuple[Path | None, Path | None, tuple[str, ...]], ClientTLS] = {}
        self._pools: list[Pool] = []
        self._peer_pools: PeerPools | None = None
        self.started = False
        self.ca_secret = None           # --outbound-ca-secret: followed through the API once started
        if s.outbound_ca_secret is not None:
            from ..k8s.secrets import CASecret, cluster_config

            cluster = cluster_config(s)
            self.ca_secret = CASecret(s.outbound_ca_secret.resolved(cluster.namespace), cluster, metrics)
        # Load every TLS source now: bad material stops the proxy at startup (CertError, exit 2).
        for r in self.routes:
            self.tls_for(r.ca, r.cert_dir, r.alpn)
        if self.proxy_addr is not None:
            self.tls_for(None, None)

    @property
    def enabled(self) -> bool:
        return bool(self.routes) or self.proxy_addr is not None

    def tls_for(self, ca: Path | None, cert_dir: Path | None,
                alpn: tuple[str, ...] = ("http/1.1",)) -> ClientTLS:
        """A route's own ``ca``/``cert_dir`` win; unset ones fall back to the global flags."""
        key = (ca or self.settings.outbound_ca, cert_dir or self.settings.outbound_cert_dir, alpn)
        tls = self._tls.get(key)
        if tls is None:
            ca_secret = self.ca_secret if key[0] is None else None     # a route's own ca wins
            tls = self._tls[key] = ClientTLS(key[0], key[1], self.metrics, alpn=alpn, ca_secret=ca_secret)
            if ca_secret is None:
                tls.load()          # a Secret's ca.crt is loaded once read (start), not before
        return tls

    def _opener(self, host: str, port: int, tls: ClientTLS, server_name: str | None = None,
                pin: AllowRules | None = None) -> PeerOpener:
        s = self.settings
        return PeerOpener(host, port, tls, self.metrics, server_name=server_name, pin=pin,
                          connect_timeout_s=s.upstream_connect_timeout_s,
                          handshake_timeout_s=s.handshake_timeout_s)

    # ------------------------------------------------------------------ running
    async def start(self, accepting: trio.Nursery, handlers: trio.Nursery) -> dict[str, HostPort]:
        """Bind and start every outbound listener; returns ``{name: bound address}``
        (``outbound/0``, ``outbound/1``… in route order, and ``outbound-proxy``)."""
        bound: dict[str, HostPort] = {}
        s = self.settings
        # Reload watchers live as long as the listeners: a drain stops reloads with accepting (the
        # in-flight requests keep the last good context for their remaining seconds).
        if self.ca_secret is not None:
            async def reload_trust(trigger: str) -> None:
                for tls in list(self._tls.values()):
                    if tls.ca_secret is not None:
                        await tls.reloader.reload(trigger)

            await accepting.start(self.ca_secret.serve, reload_trust)
        for tls in self._tls.values():
            if tls.watch_paths:
                await accepting.start(lambda task_status, tls=tls: tls.served.serve_reloads(
                    s.reload_check_interval_s, task_status=task_status))
        for i, r in enumerate(self.routes):
            tls = self.tls_for(r.ca, r.cert_dir, r.alpn)
            opener = self._opener(r.host, r.port, tls, r.server_name, r.pin)
            if r.scheme == "tls":
                handler: Callable = TLSRelayHandler(r.label, opener, self.metrics, _relay_limits(s),
                                                    s.access_log)
            else:
                pool = Pool(opener)
                self._pools.append(pool)
                _flush_on_reload(tls, pool.close_idle)
                route = Route(name=r.label, pool=pool, limits=self.limits,
                              host_override=r.authority.encode(), access_log=s.access_log,
                              upstream_label=f"https://{r.authority}")
                handler = PlainHandler(route.name, Forwarder(route, self.metrics, self.drain), self.metrics)
            bound[f"outbound/{i}"] = await accepting.start(
                net.serve, net.Listener(r.label, r.listen, s.max_connections), handler, handlers)
            log.info("outbound route", listen=str(bound[f"outbound/{i}"]), peer=f"{r.scheme}://{r.authority}",
                     server_name=r.name_checked, trust=tls.trust,
                     client_cert=str(r.cert_dir or s.outbound_cert_dir or "-"),
                     pin="-" if r.pin.empty else r.pin.describe())
        if self.proxy_addr is not None:
            tls = self.tls_for(None, None)
            self._peer_pools = PeerPools(lambda host, port: self._opener(host, port, tls))
            _flush_on_reload(tls, self._peer_pools.close_idle)
            proxy = ForwardProxy(self.allow, self._peer_pools, self.limits, self.metrics, self.drain,
                                 access_log=s.access_log, connect_timeout_s=s.upstream_connect_timeout_s)
            bound[PROXY_LISTENER] = await accepting.start(
                net.serve, net.Listener(PROXY_LISTENER, self.proxy_addr, s.max_connections), proxy.handle,
                handlers)
            log.info("outbound forward proxy", listen=str(bound[PROXY_LISTENER]), allow=",".join(self.allow))
        self.started = True
        return bound

    def close_idle(self) -> None:
        for pool in self._pools:
            pool.close_idle()
        if self._peer_pools is not None:
            self._peer_pools.close_idle()

    async def readiness(self) -> str | None:
        if not self.started:
            return "outbound listeners not bound yet"
        if any(not tls.store.ready for tls in self._tls.values()):
            return "outbound TLS not loaded yet" + (f" (waiting for the {self.ca_secret.describe()})"
                                                    if self.ca_secret is not None else "")
        return None


def _flush_on_reload(tls: ClientTLS, close_idle: Callable[[], None]) -> None:
    """After a reload, idle pooled connections are closed so that the next requests handshake with
    the new material (a rotated client certificate is presented at once, not after the idle
    timeout). Requests in flight finish on the connection they have."""
    tls.store.subscribe(lambda old, new: close_idle() if old is not None else None)


def _facts(peer) -> ConnFacts:
    ip, port = net.peer_host_port(peer)
    return ConnFacts(client=f"{ip}:{port}", forward=hdr.ForwardFacts(ip.encode(), b"http", b"80"))


class PlainHandler:
    """An accepted plain connection → the engine."""

    def __init__(self, name: str, forwarder: Forwarder, metrics: Metrics) -> None:
        self.forwarder = forwarder
        self._accepted = metrics.connections.labels(name, "http")
        self._active = metrics.connections_active.labels(name, "http")

    async def __call__(self, sock: socket.socket, peer) -> None:
        self._accepted.inc()
        self._active.inc()
        try:
            await self.forwarder.serve(net.PlainStream(sock), _facts(peer))
        finally:
            self._active.dec()


class TLSRelayHandler:
    """A ``tls://`` route: each accepted connection gets its own verified TLS connection to the peer,
    and bytes are relayed both ways unchanged (no HTTP parsing; for databases, gRPC, anything)."""

    def __init__(self, name: str, opener: PeerOpener, metrics: Metrics, limits: tcprelay.RelayLimits,
                 access_log: bool) -> None:
        self.name = name
        self.opener = opener
        self.limits = limits
        self.access_log = access_log
        self.metrics = metrics
        self._accepted = metrics.connections.labels(name, "tcp")
        self._active = metrics.connections_active.labels(name, "tcp")
        self._in = metrics.bytes_received.labels(name, "tcp")
        self._out = metrics.bytes_sent.labels(name, "tcp")

    async def __call__(self, sock: socket.socket, peer) -> None:
        self._accepted.inc()
        self._active.inc()
        t0 = time.monotonic()
        client = net.socket_stream(sock)
        fields = {"listener": self.name, "client": _facts(peer).client, "peer": self.opener.peer}
        try:
            try:
                upstream = await self.opener()
            except UpstreamError as exc:   # logged and counted by the opener; the client sees a close
                tcprelay.log_refused(fields, "upstream_failed", exc.reason, t0, self.metrics, self.name,
                                     self.access_log)
                return
            try:
                # bytes counted as they flow: to the peer = received from our client, and back
                counted = tcprelay.CountingStream(upstream, self._in, self._out, bulk=True)
                await tcprelay.run(client, counted, listener=self.name, protocol="tcp", metrics=self.metrics,
                                   limits=self.limits, log_fields=fields, access_log=self.access_log)
            finally:
                upstream.close_now()
        finally:
            self._active.dec()
            await trio.aclose_forcefully(client)


def _relay_limits(s: Settings) -> tcprelay.RelayLimits:
    """tls:// routes relay under the tcp-mode timeouts (--tcp-idle-timeout, --tcp-close-timeout,
    --tcp-max-lifetime)."""
    return tcprelay.RelayLimits(idle_timeout_s=s.tcp_idle_timeout_s, close_timeout_s=s.tcp_close_timeout_s,
                                max_lifetime_s=s.tcp_max_lifetime_s)


# ---------------------------------------------------------------------------- the forward proxy

class ForwardProxy:
    def __init__(self, allow: tuple[str, ...], pools: PeerPools, limits: Limits, metrics: Metrics,
                 drain: Drain, *, access_log: bool = True, connect_timeout_s: float = 5.0) -> None:
        self.allow = allow
        self.pools = pools
        self.limits = limits
        self.metrics = metrics
        self.connect_timeout_s = connect_timeout_s
        self.access_log = access_log
        route = Route(name=PROXY_LISTENER, pool=Pool(_no_default_peer), limits=limits, access_log=access_log,
                      upstream_label="allow-listed peers", resolve=self.resolve)
        self.forwarder = Forwarder(route, metrics, drain)
        self._accepted = metrics.connections.labels(PROXY_LISTENER, "http")
        self._active = metrics.connections_active.labels(PROXY_LISTENER, "http")

    def _check_allowed(self, target: _routes.Target) -> None:
        if not _routes.host_allowed(target.host, self.allow):
            # one label value for every refusal: names a client makes up must not grow the metrics
            self.metrics.outbound_errors.labels(DENIED_PEER, "denied").inc()
            raise HTTPError(403, f"destination {target.host} is not on the outbound allow-list "
                            f"({', '.join(self.allow)})", kind="proxy_denied")

    def resolve(self, method: bytes, target: bytes) -> Destination:
        t = _routes.parse_proxy_target(target)
        self._check_allowed(t)
        return Destination(self.pools.get(t.host, t.port), t.path, t.authority.encode())

    async def handle(self, sock: socket.socket, peer) -> None:
        self._accepted.inc()
        self._active.inc()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stream = net.PlainStream(sock)
        try:
            buf = await self._peek(stream)
            if buf is None:
                return
            if buf.startswith(_CONNECT):
                await self._connect(stream, buf, _facts(peer))
            else:
                await self.forwarder.serve(stream, _facts(peer), received=bytes(buf))
        finally:
            self._active.dec()
            stream.close_now()

    async def _peek(self, stream: net.PlainStream) -> bytearray | None:
        """Enough of the first request to tell CONNECT apart: the whole head for a CONNECT, the first
        bytes for anything else (the engine reads the rest, with its own limits)."""
        buf = bytearray()
        with trio.move_on_after(self.limits.head_timeout_s):
            while True:
                try:
                    data = await stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return None
                if not data:
                    return None
                buf += data
                n = min(len(buf), len(_CONNECT))
                if buf[:n] != _CONNECT[:n]:
                    return buf
                if n == len(_CONNECT):
                    if hdr.find_head_end(buf) >= 0:
                        return buf
                    if len(buf) > self.limits.max_head_bytes:
                        await _answer(stream, 431, "request head too large")
                        return None
        await _answer(stream, 408, "request head not received in time")
        return None

    async def _connect(self, stream: net.PlainStream, buf: bytearray, facts: ConnFacts) -> None:
        t0 = time.perf_counter()
        end = hdr.find_head_end(buf)
        head, rest = bytes(buf[:end]), bytes(buf[end:])
        fields: dict = {"listener": PROXY_LISTENER, "client": facts.client, "method": "CONNECT"}
        try:
            raw_target = _routes.connect_request(head)
            if raw_target is None:
                raise HTTPError(400, "bad request: malformed CONNECT request line", kind="proxy_target")
            fields["path"] = raw_target.decode("ascii", "replace")[:300]
            target = _routes.parse_connect_target(raw_target)
            self._check_allowed(target)
            try:
                upstream = await connect_tcp(target.host, target.port, self.connect_timeout_s)
            except UpstreamError as exc:
                self.metrics.outbound_errors.labels(target.authority, exc.kind).inc()
                self.metrics.upstream_errors.labels(PROXY_LISTENER, exc.kind).inc()
                status = 504 if exc.kind == "connect_timeout" else 502
                raise HTTPError(status, f"upstream unavailable: {exc.reason}", kind="upstream_" + exc.kind) \
                    from None
        except HTTPError as err:
            self.metrics.client_errors.labels(PROXY_LISTENER, str(err.status)).inc()
            self.metrics.requests.labels(PROXY_LISTENER, f"{err.status // 100}xx").inc()
            if err.status >= 500:
                log.warning("upstream error", listener=PROXY_LISTENER, client=facts.client,
                            status=err.status, reason=err.reason)
            await _answer(stream, err.status, err.reason)
            self._log(fields, err.status, t0, note=err.kind)
            return
        try:
            await stream.send_all(CONNECT_OK)
            if rest:
                await upstream.send_all(rest)
            self.metrics.requests.labels(PROXY_LISTENER, "2xx").inc()
            result = await relay(stream, upstream, idle_timeout_s=None,
                                 close_timeout_s=self.limits.upgrade_close_timeout_s)
            fields.update(bytes_in=result.a_to_b + len(rest), bytes_out=result.b_to_a)
            self.metrics.bytes_received.labels(PROXY_LISTENER, "tcp").inc(result.a_to_b + len(rest))
            self.metrics.bytes_sent.labels(PROXY_LISTENER, "tcp").inc(result.b_to_a)
            self._log(fields, 200, t0, note=f"tunnel {result.ended_by}")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._log(fields, 200, t0, note="tunnel broken")
        finally:
            await trio.aclose_forcefully(upstream)

    def _log(self, fields: dict, status: int, t0: float, note: str) -> None:
        if self.access_log:
            access.info("request", **fields, status=status,
                        duration_ms=round((time.perf_counter() - t0) * 1000, 3), note=note)


async def _no_default_peer() -> trio.abc.Stream:
    raise UpstreamError("internal", "the forward proxy has no default peer")


async def _answer(stream: trio.abc.Stream, status: int, reason: str) -> None:
    try:
        with trio.move_on_after(5):
            await stream.send_all(hdr.error_response(status, reason))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
