"""Connections to peers: TCP, then a verified TLS 1.3 handshake, then the pinned-identity check.

Theory of operation
-------------------
:class:`ClientTLS` holds the *current* client ``SSLContext`` for one pair of sources — a CA bundle
file (``--outbound-ca``, or a route's ``ca``) and a client-certificate Secret directory
(``--outbound-cert-dir``, or a route's ``cert_dir``). The trust bundle is, in order: the CA file;
else the ``ca.crt`` of the certificate directory; else the system trust store.

Hot reload is the inbound one (``tls/served.py``: ``certs/source.py`` reads, ``tls/reload.py``
builds and swaps, ``certs/watch.py`` watches): the directories holding the files are watched,
with a periodic re-check as a backstop (``--reload-check-interval``); a change reads every file
once, hashes the bytes, and only new bytes are validated and built into a *new* context that
replaces the store's reference (new handshakes use it, open and pooled connections keep theirs).
On failure the old context is kept and the failure logged once.

:class:`PeerOpener` is a :class:`~tlsproxy.http.pool.Pool` opener. Each failure becomes an
:class:`~tlsproxy.errors.UpstreamError` whose ``reason`` is the 502/504 body and log line: a rejected
certificate says *unknown CA*, *name mismatch* or *expired* (from OpenSSL's verify code), a refused
or unresolvable peer says so, and a slow connect or handshake is ``connect_timeout`` (504).
"""

from __future__ import annotations

import dataclasses
import ssl
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from ..certs import bundle as _bundle
from ..certs.source import CertSource, Material
from ..errors import CertError, UpstreamError
from ..http.pool import Pool
from ..log import get_logger
from ..metrics import Metrics
from ..net import connect_tcp
from ..tls.contexts import ALPN_HTTP1, ClientTLSOptions, client_context
from ..tls.identity import AllowRules, Identity
from ..tls.served import ServedTLS
from ..tls.store import Generation
from ..tls.stream import TLSStream

if TYPE_CHECKING:
    from ..k8s.secrets import CASecret

log = get_logger("outbound")

MAX_PEER_POOLS = 256     # forward proxy: pools kept for distinct destinations (LRU beyond)


# ---------------------------------------------------------------------------- client TLS material

class _SecretTrust:
    """A client source whose trust bundle is the ``ca.crt`` of a Secret followed through the
    Kubernetes API (``--outbound-ca-secret``); the client certificate, if any, is still read from
    its directory."""

    def __init__(self, files: CertSource, secret: CASecret) -> None:
        self.files = files
        self.secret = secret

    def read(self) -> Material:
        ca = self.secret.ca_pem
        if ca is None:
            raise CertError(f"Secret {self.secret.ref}", "ca.crt not read from the Kubernetes API yet")
        return dataclasses.replace(self.files.read(), client_ca_pem=ca,
                                   client_ca_path=f"Secret {self.secret.ref} ca.crt")

    def describe(self) -> str:
        return f"{self.files.describe()} ca_secret={self.secret.ref}"

    @property
    def watch_paths(self) -> tuple[Path, ...]:
        return self.files.watch_paths


class ClientTLS:
    """The current client context for one (CA file, client-certificate directory) pair: one
    :class:`~tlsproxy.tls.served.ServedTLS` (read, validate, build, store, reload — the inbound
    machinery) whose build makes a client context."""

    def __init__(self, ca: Path | None, cert_dir: Path | None, metrics: Metrics | None = None, *,
                 alpn: tuple[str, ...] = ALPN_HTTP1, ca_secret: CASecret | None = None) -> None:
        self.ca = ca
        self.cert_dir = cert_dir
        self.ca_secret = ca_secret        # --outbound-ca-secret: ca.crt of a Secret, from the API
        self.alpn = alpn
        files = CertSource(cert_dir=cert_dir, client_ca=ca)
        source = files if ca_secret is None else _SecretTrust(files, ca_secret)
        self.served = ServedTLS(source, self._build, metrics, role="outbound", describe=self.describe())
        self.store = self.served.store
        self.reloader = self.served.reloader     # --outbound-ca-secret: reloaded when the Secret changes
        self.trust = self._describe_trust(False)
        self.served.subscribe(self._on_swap)

    def describe(self) -> str:
        parts = [f"ca={self.ca}" if self.ca else "", f"cert_dir={self.cert_dir}" if self.cert_dir else "",
                 f"ca_secret={self.ca_secret.ref}" if self.ca_secret else ""]
        return " ".join(p for p in parts if p) or "system trust store"

    def _describe_trust(self, dir_has_ca: bool) -> str:
        if self.ca is not None:
            return f"the CA bundle {self.ca}"
        if self.ca_secret is not None:
            return f"the {self.ca_secret.describe()}"
        if self.cert_dir is not None and dir_has_ca:
            return f"the CA bundle {self.cert_dir / _bundle.CA_FILE}"
        return "the system trust store"

    @property
    def watch_paths(self) -> tuple[Path, ...]:
        """Directories to watch (never the files: kubelet swaps a symlinked directory)."""
        return self.served.watch_paths

    def load(self) -> None:
        """First load: raises :class:`CertError` (the proxy refuses to start on bad material)."""
        self.served.load_now()

    def current(self) -> ssl.SSLContext:
        """The context for a new handshake."""
        return self.served.current()

    @property
    def client_bundle(self) -> _bundle.Bundle | None:
        gen = self.store.generation
        return gen.bundles[0] if gen is not None and gen.bundles else None

    def _build(self, material: Material) -> tuple[ssl.SSLContext, list[_bundle.Bundle]]:
        pair = material.pairs[0] if material.pairs else None
        client = pair.validate() if pair is not None else None
        # An explicit CA (a file, or --outbound-ca-secret's ca.crt) always wins; the client
        # certificate directory's ca.crt is the trust bundle only without one.
        if self.ca is not None or self.ca_secret is not None:
            trust, where = material.client_ca_pem, material.client_ca_path or str(self.ca)
        else:
            trust, where = (pair.ca_pem, pair.ca_path or "") if pair is not None else (None, "")
        if trust is not None:
            _bundle.parse_pem_certs(trust, where, "CA bundle")
        ctx = client_context(ClientTLSOptions(ca_pem=trust, client_bundle=client, alpn=self.alpn))
        return ctx, [client] if client is not None else []

    def _on_swap(self, old: Generation | None, new: Generation) -> None:
        client = new.bundles[0] if new.bundles else None
        self.trust = self._describe_trust(client is not None and client.ca_pem is not None)
        fields = {"trust": self.trust, "generation": new.number}
        if client is not None:
            fields.update(client_cert=client.cert_path, subject=client.info.subject,
                          not_after=client.info.not_after.isoformat())
        log.info("outbound TLS loaded" if old is None else "outbound TLS reloaded", **fields)


# ---------------------------------------------------------------------------- failures, named

# OpenSSL X509_V_ERR_* codes -> (metric kind, what to call it)
_VERIFY_KINDS = {
    2: ("unknown_ca", "unknown CA"), 18: ("unknown_ca", "unknown CA"), 19: ("unknown_ca", "unknown CA"),
    20: ("unknown_ca", "unknown CA"), 21: ("unknown_ca", "unknown CA"),
    9: ("not_yet_valid", "not yet valid"), 10: ("expired", "expired"),
    62: ("name_mismatch", "name mismatch"), 64: ("name_mismatch", "name mismatch"),
    26: ("wrong_purpose", "not a server certificate"), 23: ("revoked", "revoked"),
}


def describe_verify_failure(code: int, message: str, peer: str, name: str, trust: str) -> tuple[str, str]:
    """(metric kind, reason) for a peer certificate OpenSSL rejected. Pure."""
    kind, what = _VERIFY_KINDS.get(code, ("cert_rejected", "rejected"))
    reason = f"peer {peer}: certificate rejected: {what} ({message or f'verify error {code}'})"
    if kind == "unknown_ca":
        reason += f"; it is not signed by {trust}"
    elif kind == "name_mismatch":
        reason += f"; the name checked was {name!r} (set server_name to check another)"
    return kind, reason


_HANDSHAKE_REASONS = {
    "WRONG_VERSION_NUMBER": "the peer does not speak TLS on this port (plain HTTP?)",
    "RECORD_LAYER_FAILURE": "the peer does not speak TLS on this port (plain HTTP?)",
    "PACKET_LENGTH_TOO_LONG": "the peer does not speak TLS on this port (plain HTTP?)",
    "TLSV1_ALERT_PROTOCOL_VERSION": "the peer does not offer TLS 1.3",
    "UNSUPPORTED_PROTOCOL": "the peer does not offer TLS 1.3",
    "NO_APPLICATION_PROTOCOL": "the peer does not accept ALPN http/1.1",
    "TLSV1_ALERT_NO_APPLICATION_PROTOCOL": "the peer does not accept ALPN http/1.1",
}


def _handshake_reason(exc: ssl.SSLError) -> str:
    reason = exc.reason or ""
    for needle, text in _HANDSHAKE_REASONS.items():
        if needle in reason:
            return f"{text} [{reason}]"
    return reason or str(exc)


# ---------------------------------------------------------------------------- refusals after the handshake

# TLS 1.3 lets a server refuse the client's certificate *after* the client finished its handshake:
# the alert arrives on the first read or write of the request. Alerts worth naming:
_PEER_ALERTS = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "it requires a client certificate",
    "SSLV3_ALERT_BAD_CERTIFICATE": "it rejected our client certificate (bad certificate)",
    "TLSV1_ALERT_UNKNOWN_CA": "it does not trust the CA of our client certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "it says our client certificate expired",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "it rejected our client certificate",
    "TLSV1_ALERT_ACCESS_DENIED": "it denied access to our client certificate's identity",
}


def alert_reason(exc: BaseException | None) -> str | None:
    """Our words for a TLS alert the peer sent, when ``exc`` (or what caused it) carries one."""
    while exc is not None:
        name = getattr(exc, "reason", None)
        if isinstance(name, str) and name in _PEER_ALERTS:
            return _PEER_ALERTS[name]
        exc = exc.__cause__
    return None


class PeerStream(TLSStream):
    """A client TLS stream that names the peer's refusal when the first exchange fails on an alert
    (instead of "EOF occurred in violation of protocol")."""

    peer = ""
    client_cert = False
    _fresh = True

    def _explain(self, exc: trio.BrokenResourceError) -> trio.BrokenResourceError:
        reason = alert_reason(exc)
        if reason is None:
            try:    # a failed write: the alert may be waiting unread; read it without blocking
                self.ssl_object.recv(1)
            except ssl.SSLError as read_exc:
                reason = alert_reason(read_exc)
            except OSError:
                pass
        if reason is None:
            return exc
        hint = "" if self.client_cert else " (none is presented: set --outbound-cert-dir or cert_dir)"
        return trio.BrokenResourceError(f"peer {self.peer} refused the connection after the handshake: "
                                        f"{reason}{hint}")

    async def send_all(self, data) -> None:
        if not self._fresh:
            return await super().send_all(data)
        try:
            await super().send_all(data)
        except trio.BrokenResourceError as exc:
            raise self._explain(exc) from None

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self._fresh:
            return await super().receive_some(max_bytes)
        try:
            data = await super().receive_some(max_bytes)
        except trio.BrokenResourceError as exc:
            raise self._explain(exc) from None
        self._fresh = False
        return data


# ---------------------------------------------------------------------------- the opener

class PeerOpener:
    """Pool opener: a verified TLS 1.3 stream to one peer (ALPN http/1.1)."""

    def __init__(self, host: str, port: int, tls: ClientTLS, metrics: Metrics, *,
                 server_name: str | None = None, pin: AllowRules | None = None,
                 connect_timeout_s: float = 5.0, handshake_timeout_s: float = 10.0) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.metrics = metrics
        self.server_name = server_name or host
        self.pin = pin or AllowRules()
        self.connect_timeout_s = connect_timeout_s
        self.handshake_timeout_s = handshake_timeout_s
        self.peer = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def __call__(self) -> PeerStream:
        try:
            return await self._open()
        except UpstreamError as exc:
            self.metrics.outbound_errors.labels(self.peer, exc.kind).inc()
            log.warning("peer connection failed", peer=self.peer, kind=exc.kind, reason=exc.reason)
            raise

    async def _open(self) -> PeerStream:
        try:
            ctx = self.tls.current()
        except LookupError:   # never loaded: Outbound loads every source before it binds
            raise UpstreamError("tls_config", "outbound TLS material not loaded") from None
        tcp = await connect_tcp(self.host, self.port, self.connect_timeout_s)
        raw = tcp.detach()
        try:
            stream = PeerStream(raw, ctx, server_side=False, server_hostname=self.server_name)
        except (OSError, ValueError) as exc:
            raw.close()
            raise UpstreamError("tls", f"peer {self.peer}: cannot start TLS: {exc}") from None
        stream.peer = self.peer
        stream.client_cert = self.tls.client_bundle is not None
        try:
            with trio.fail_after(self.handshake_timeout_s):
                await stream.do_handshake()
            self._check_pin(stream)
        except trio.TooSlowError:
            stream.close_now()
            raise UpstreamError("connect_timeout", f"peer {self.peer}: no TLS handshake within "
                                f"{self.handshake_timeout_s:g}s") from None
        except ssl.SSLCertVerificationError as exc:
            stream.close_now()
            kind, reason = describe_verify_failure(exc.verify_code, exc.verify_message or "", self.peer,
                                                   self.server_name, self.tls.trust)
            raise UpstreamError(kind, reason) from None
        except ssl.SSLError as exc:
            stream.close_now()
            raise UpstreamError("tls", f"peer {self.peer}: TLS handshake failed: "
                                f"{_handshake_reason(exc)}") from None
        except (trio.BrokenResourceError, OSError) as exc:
            stream.close_now()
            raise UpstreamError("tls", f"peer {self.peer}: connection lost during the TLS handshake "
                                f"({exc})") from None
        except BaseException:
            stream.close_now()
            raise
        return stream

    def _check_pin(self, stream: TLSStream) -> None:
        if self.pin.empty:
            return
        der = stream.getpeercert(True)
        try:
            identity = Identity.from_der(der)
        except (ValueError, TypeError):
            raise UpstreamError("identity", f"peer {self.peer}: certificate does not parse") from None
        if not self.pin.decide(identity).allowed:
            raise UpstreamError("identity", f"peer {self.peer}: identity not allowed: the certificate has "
                                f"{identity.describe()}, the route pins {self.pin.describe()}")


# ---------------------------------------------------------------------------- pools per peer

class PeerPools:
    """Forward proxy: one keep-alive pool per destination, created on first use, LRU-bounded."""

    def __init__(self, make_opener: Callable[[str, int], PeerOpener],
                 max_pools: int = MAX_PEER_POOLS) -> None:
        self._make = make_opener
        self._pools: OrderedDict[tuple[str, int], Pool] = OrderedDict()
        self._max = max_pools

    def get(self, host: str, port: int) -> Pool:
        key = (host.lower(), port)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = Pool(self._make(host, port))
            while len(self._pools) > self._max:
                _old_key, old = self._pools.popitem(last=False)
                old.close_idle()
        else:
            self._pools.move_to_end(key)
        return pool

    def close_idle(self) -> None:
        for pool in self._pools.values():
            pool.close_idle()

    def __len__(self) -> int:
        return len(self._pools)
