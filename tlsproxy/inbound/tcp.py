"""Inbound tcp mode: the handshaken TLS stream is relayed, byte for byte, to a plain TCP upstream.

Theory of operation
-------------------
``accept.ConnectionHandler`` does the accept, the handshake under its deadline and the mTLS verdict,
exactly as in HTTP mode; :func:`make_serve` builds the ``serve(stream, facts)`` it then calls:

1. A client outside the ``--allow-*`` rules is refused: there is no HTTP status to send, so the
   connection is closed (``close_notify``) before anything is dialled — the app sees nothing.
2. Connect to ``--upstream tcp://HOST:PORT`` under ``--upstream-connect-timeout``; a failure closes
   the client's connection (logged and counted as an upstream error).
3. With ``--proxy-protocol v2``, a PROXY v2 header (``proxyproto.py``) goes first: client and local
   address, TLS version, cipher, SNI, ALPN, the client certificate's CN and URI SANs.
4. ``tcprelay.run`` copies both ways until both directions end, under the idle timeout, the close
   timeout and the maximum lifetime, counting bytes as they flow and writing one log line.

Half-close. The upstream leg is TCP, so when the client ends its stream (``close_notify``, or a
bare FIN) the upstream gets a FIN (``shutdown(SHUT_WR)``) and its answer keeps flowing back. The
client leg is TLS, and a TLS stream cannot half-close here: ``close_notify`` is one-way in TLS 1.3
but ``trio``-style streams have no ``send_eof`` for it, and many TLS clients treat ``close_notify``
as the end of everything. So when the *upstream* ends first, the client gets ``--tcp-close-timeout``
to finish sending, then both sides are closed.

Drain: relays run in the handlers nursery; ``App.run`` puts the drain deadline on it, so a relay
still open ``--drain-timeout`` after SIGTERM is cancelled, closed and logged with ``ended=drain``.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from .. import proxyproto, tcprelay
from ..config import Settings, Upstream
from ..errors import UpstreamError
from ..http.exchange import ConnFacts
from ..log import get_logger
from ..metrics import Metrics
from ..net import connect_tcp
from ..tls import identity as ident
from ..tls.stream import TLSStream

log = get_logger("inbound.tcp")

PROTOCOL = "tcp"
SNI_ATTR = "tlsproxy_sni"      # set on the server-side SSLSocket by remember_sni


@dataclass(frozen=True)
class TCPConfig:
    listener: str
    upstream: Upstream
    connect_timeout_s: float
    limits: tcprelay.RelayLimits
    proxy_protocol: str = "off"      # "off" or "v2"
    access_log: bool = True

    @classmethod
    def from_settings(cls, s: Settings, listener: str = "inbound") -> TCPConfig:
        return cls(listener=listener, upstream=s.upstream, connect_timeout_s=s.upstream_connect_timeout_s,
                   limits=tcprelay.RelayLimits(idle_timeout_s=s.tcp_idle_timeout_s,
                                               close_timeout_s=s.tcp_close_timeout_s,
                                               max_lifetime_s=s.tcp_max_lifetime_s),
                   proxy_protocol=s.proxy_protocol, access_log=s.access_log)


def adapt_context(ctx: ssl.SSLContext, s: Settings) -> None:
    """What tcp mode adds to a freshly built server context (called before it serves anything).

    * ``OP_IGNORE_UNEXPECTED_EOF``: a client that half-closes with a bare TCP FIN (no
      ``close_notify``) is relayed as an EOF anyway (the stream reads ``b""``); without this option
      OpenSSL 3 marks the session failed at that EOF, so the upstream's reply could not be sent back.
      It weakens nothing here: the EOF is passed on either way.
    * the SNI callback, when the PROXY header needs the server name."""
    ctx.options |= getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    if s.proxy_protocol != "off":
        ctx.sni_callback = remember_sni


def remember_sni(ssl_sock, server_name: str | None, _ctx) -> None:
    """``SSLContext.sni_callback``: keep the name the client asked for on its socket (Python offers
    no other way to read the SNI on the server side)."""
    if server_name:
        try:
            setattr(ssl_sock, SNI_ATTR, server_name)
        except AttributeError:
            pass
    return None


def tls_facts(stream: TLSStream) -> proxyproto.TLSFacts:
    """The PROXY-header facts of a handshaken server-side stream."""
    sock = stream.ssl_object
    der = stream.getpeercert(True)
    cn, uris = None, ()
    if der:
        try:
            who = ident.Identity.from_der(der)
            cn, uris = who.cn, who.uris
        except ValueError:
            pass
    cipher = sock.cipher()
    return proxyproto.TLSFacts(
        version=stream.version(), cipher=cipher[0] if cipher else None,
        sni=getattr(sock, SNI_ATTR, None), alpn=stream.selected_alpn_protocol(),
        cert_in_connection=bool(der) and not stream.session_reused(), cert_in_session=bool(der),
        # a peer certificate is only there when CERT_REQUIRED verified it (mTLS on)
        verified=bool(der), cn=cn, uris=tuple(uris))


def proxy_header(stream: TLSStream) -> bytes:
    sock = stream.ssl_object
    src = sock.getpeername()[:2]
    dst = sock.getsockname()[:2]
    return proxyproto.v2_header(src, dst, tls_facts(stream))


def make_serve(cfg: TCPConfig, metrics: Metrics) -> Callable[[TLSStream, ConnFacts], Awaitable[None]]:
    """The ``serve`` of a ``ConnectionHandler`` in tcp mode."""
    to_upstream = metrics.bytes_received.labels(cfg.listener, PROTOCOL)
    from_upstream = metrics.bytes_sent.labels(cfg.listener, PROTOCOL)
    host, port = cfg.upstream.host, cfg.upstream.port

    async def serve(stream: TLSStream, facts: ConnFacts) -> None:
        t0 = time.monotonic()
        fields = {"listener": cfg.listener, "client": facts.client, "identity": facts.identity or "-",
                  "tls_version": facts.tls_version, "alpn": stream.selected_alpn_protocol() or "-"}
        if facts.deny is not None:
            # mtls.make_policy already logged the warning with the rules; the connection is closed
            # by ConnectionHandler (close_notify), before anything is dialled.
            tcprelay.log_refused(fields, "refused", facts.deny.reason, t0, metrics, cfg.listener,
                                 cfg.access_log)
            return
        try:
            upstream = await connect_tcp(host, port, cfg.connect_timeout_s)
        except UpstreamError as exc:
            metrics.upstream_errors.labels(cfg.listener, exc.kind).inc()
            log.warning("upstream error", listener=cfg.listener, client=facts.client, kind=exc.kind,
                        reason=exc.reason)
            tcprelay.log_refused(fields, "upstream_failed", exc.reason, t0, metrics, cfg.listener,
                                 cfg.access_log)
            return
        try:
            if cfg.proxy_protocol == "v2":
                try:
                    header = proxy_header(stream)
                    with trio.fail_after(cfg.connect_timeout_s):
                        await upstream.send_all(header)
                except (OSError, ValueError, trio.TooSlowError, trio.BrokenResourceError) as exc:
                    metrics.upstream_errors.labels(cfg.listener, "proxy_protocol").inc()
                    tcprelay.log_refused(fields, "upstream_failed", f"PROXY header: {exc}", t0, metrics,
                                         cfg.listener, cfg.access_log)
                    return
            counted = tcprelay.CountingStream(upstream, to_upstream, from_upstream)
            client = tcprelay.CountingStream(stream, bulk=True)      # TLS: whole bursts per receive
            await tcprelay.run(client, counted, listener=cfg.listener, protocol=PROTOCOL, metrics=metrics,
                               limits=cfg.limits, log_fields=fields, access_log=cfg.access_log)
        finally:
            await trio.aclose_forcefully(upstream)

    return serve
