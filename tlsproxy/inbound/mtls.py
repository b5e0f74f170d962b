"""Mutual TLS on the inbound listener: which CA verifies clients, and the per-connection verdict.

Theory of operation
-------------------
Two halves, both driven by :class:`MTLSConfig` (built once from settings):

* **The handshake** (OpenSSL's job). When mTLS is on, the server context gets the client CA bundle
  and ``CERT_REQUIRED``; OpenSSL then refuses, with the TLS alert the RFC names, a client that sends
  no certificate (``certificate_required``, 116, in TLS 1.3), one from an unknown CA
  (``unknown_ca``), an expired one (``certificate_expired``) and one whose Extended Key Usage lacks
  ``clientAuth`` (``unsupported_certificate``: a server verifying a client applies OpenSSL's
  ``sslclient`` purpose by default). A certificate with *no* EKU extension is usable for any purpose
  (RFC 5280 section 4.2.1.12; OpenSSL, Go and Envoy agree, and cert-manager issues such certificates
  by default), so it passes. The CA bundle is read by :meth:`tlsproxy.app.App.build_generation`
  (through :func:`client_ca_pem`), so it is part of every context generation and reloads with the
  server certificate.

* **The verdict** (ours). After a successful handshake :func:`make_policy`'s callable runs once per
  connection: the peer's DER → :class:`~tlsproxy.tls.identity.Identity` → the ``--allow-*`` rules
  → a :class:`~tlsproxy.accept.PeerVerdict` carrying the identity for logs, the
  ``X-Forwarded-Client-Cert`` / RFC 9440 headers for the app, or a 403 for every request of a
  client outside the rules. Client-sent identity headers are stripped by ``http/headers.py`` on
  every request, mTLS or not; the ones here are added after that.

``Client-Cert-Chain`` needs the verified chain. ``SSLSocket.get_verified_chain()`` is public from
Python 3.13; before it the chain is rebuilt from the peer certificate and the CA certificates of the
context that verified it (:func:`chain_from`, public API only). When it cannot be rebuilt (the client
sent an intermediate the CA bundle lacks), the header is left out (RFC 9440 forbids putting the leaf
in it, and a partial chain would mislead).
"""

from __future__ import annotations

import functools
import ssl
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from ..accept import PeerPolicy, PeerVerdict
from ..certs.bundle import Bundle
from ..config import Settings
from ..errors import CertError, HTTPError
from ..log import get_logger
from ..tls import identity as ident
from ..tls.stream import TLSStream

log = get_logger("inbound.mtls")

XFCC = b"X-Forwarded-Client-Cert"
CLIENT_CERT = b"Client-Cert"
CLIENT_CERT_CHAIN = b"Client-Cert-Chain"
DENIED_KIND = "client_identity"          # HTTPError kind: metric/log label of the 403
# Verdicts are cached by certificate (DER + chain): a fleet of clients reconnects with a handful of
# certificates, and parsing one costs ~70 us per connection (measured here); a hit, under 1 us.
VERDICT_CACHE_SIZE = 1024


@dataclass(frozen=True)
class MTLSConfig:
    """mTLS as configured; ``enabled`` False means no client certificate is asked for."""

    enabled: bool = False
    ca_file: str | None = None            # --client-ca, or None for ca.crt of the Secret directory
    rules: ident.AllowRules = ident.AllowRules()
    header_mode: str = "xfcc"

    @classmethod
    def from_settings(cls, s: Settings) -> MTLSConfig:
        """Raises ConfigError for bad ``--allow-*`` values."""
        rules = ident.AllowRules.parse(cn=s.allow_cn, dns=s.allow_dns, uri=s.allow_uri, ou=s.allow_ou)
        enabled = s.client_ca is not None or bool(s.require_client_cert)
        return cls(enabled=enabled, ca_file=str(s.client_ca) if s.client_ca is not None else None,
                   rules=rules, header_mode=getattr(s, "client_cert_header", "xfcc"))

    def describe(self) -> str:
        if not self.enabled:
            return "off"
        return f"required, CA {self.ca_file or 'ca.crt of the certificate directory'}; " \
               f"allowed: {self.rules.describe()}; headers: {self.header_mode}"


def client_ca_pem(cfg: MTLSConfig, bundle: Bundle) -> bytes | None:
    """The CA bundle that verifies clients for a context built from ``bundle`` (None: mTLS off).

    The source puts ``--client-ca`` (when given) in ``bundle.ca_pem``; otherwise it is the Secret's
    ``ca.crt``. Raises CertError when mTLS is on and there is none: such a generation must not be
    served (startup exits 2; a reload keeps the previous one)."""
    if not cfg.enabled:
        return None
    if not bundle.ca_pem:
        where = bundle.ca_path or str(bundle.cert_path).rsplit("/", 1)[0] + "/ca.crt"
        raise CertError(where, "mutual TLS needs a client CA bundle: give --client-ca FILE or put "
                        "ca.crt in the certificate directory")
    return bundle.ca_pem


# ---------------------------------------------------------------------------- the verdict (pure)

def verdict(cfg: MTLSConfig, leaf_der: bytes | None, chain_der: Sequence[bytes] = ()) -> PeerVerdict:
    """What to do with a connection whose (already verified) client sent ``leaf_der``.

    ``chain_der`` is the verified chain, leaf first, or empty when unknown."""
    if not cfg.enabled:
        return PeerVerdict()
    if not leaf_der:
        # Cannot happen with CERT_REQUIRED; refuse rather than trust a connection we cannot name.
        return PeerVerdict(deny=HTTPError(403, "forbidden: no client certificate", kind=DENIED_KIND))
    try:
        who = ident.Identity.from_der(leaf_der)
    except Exception:  # noqa: BLE001 - OpenSSL verified it but cryptography cannot read it: refuse, never crash
        return PeerVerdict(deny=HTTPError(403, "forbidden: client certificate does not parse",
                                          kind=DENIED_KIND))
    described = who.describe()
    decision = cfg.rules.decide(who)
    if not decision.allowed:
        return PeerVerdict(identity=described,
                           deny=HTTPError(403, f"forbidden: {decision.reason}", kind=DENIED_KIND))
    return PeerVerdict(identity=described, headers=identity_headers(cfg.header_mode, who, chain_der))


def identity_headers(mode: str, who: ident.Identity, chain_der: Sequence[bytes] = ()
                     ) -> tuple[tuple[bytes, bytes], ...]:
    out: list[tuple[bytes, bytes]] = []
    if mode in ("xfcc", "both"):
        out.append((XFCC, ident.xfcc_value(who).encode("ascii")))
    if mode in ("rfc9440", "both"):
        out.append((CLIENT_CERT, ident.client_cert_value(who.der).encode("ascii")))
        chain = ident.client_cert_chain_value(list(chain_der[1:])) if chain_der else None
        if chain is not None:
            out.append((CLIENT_CERT_CHAIN, chain.encode("ascii")))
    return tuple(out)


# ---------------------------------------------------------------------------- the policy (I/O edge)

def verified_chain_der(sock: ssl.SSLSocket) -> list[bytes]:
    """The verified chain, leaf first, as DER; empty when it cannot be told.

    Python 3.13 has ``SSLSocket.get_verified_chain()``. Before it, the chain is rebuilt from public
    values: the peer's certificate and the CA certificates of the context that verified it
    (``SSLContext.get_ca_certs``), walking issuer to issuer (:func:`chain_from`)."""
    if sys.version_info >= (3, 13):
        try:
            return [bytes(c) for c in sock.get_verified_chain()]   # type: ignore[attr-defined]
        except (ValueError, ssl.SSLError):
            return []
    leaf = sock.getpeercert(binary_form=True)
    if not leaf:
        return []
    return list(chain_from(leaf, tuple(sock.context.get_ca_certs(binary_form=True))))


@functools.lru_cache(maxsize=VERDICT_CACHE_SIZE)
def chain_from(leaf_der: bytes, ca_ders: tuple[bytes, ...]) -> tuple[bytes, ...]:
    """``leaf_der`` and its issuers out of ``ca_ders``, up to a self-issued root: the chain OpenSSL
    verified when the client sent no intermediates the CA bundle lacks. Each link is checked by
    signature (``verify_directly_issued_by``), not by name alone. Empty when the leaf's issuer is
    not in the bundle (the client sent an intermediate of its own: the chain is unknown here, and
    RFC 9440 says to leave the header out rather than send a partial one). Pure; cached.
    cryptography is imported here, not at the top: serving without client certificates never loads
    it (it is the largest dependency of an idle sidecar, docs/performance.md)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_der_x509_certificate(leaf_der)
        cas = [x509.load_der_x509_certificate(d) for d in ca_ders]
    except ValueError:
        return ()
    chain = [cert]
    while cert.issuer != cert.subject and len(chain) <= len(cas):
        issuer = next((ca for ca in cas if ca.subject == cert.issuer and _issued_by(cert, ca)), None)
        if issuer is None:
            return ()
        chain.append(issuer)
        cert = issuer
    if cert.issuer != cert.subject:
        return ()      # no root in reach (or a loop of cross-signed CAs): unknown
    return tuple(c.public_bytes(serialization.Encoding.DER) for c in chain)


def _issued_by(cert, issuer) -> bool:
    """True when ``issuer`` (a cryptography Certificate) signed ``cert``."""
    from cryptography.exceptions import InvalidSignature

    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def make_policy(cfg: MTLSConfig) -> PeerPolicy | None:
    """The per-connection hook for ``ConnectionHandler`` (None when mTLS is off)."""
    if not cfg.enabled:
        return None
    wants_chain = cfg.header_mode in ("rfc9440", "both")

    @functools.lru_cache(maxsize=VERDICT_CACHE_SIZE)
    def cached(leaf: bytes | None, chain: tuple[bytes, ...]) -> PeerVerdict:
        return verdict(cfg, leaf, chain)

    def policy(stream: TLSStream) -> PeerVerdict:
        leaf = stream.getpeercert(binary_form=True)
        chain = tuple(verified_chain_der(stream.ssl_object)) if wants_chain else ()
        result = cached(leaf, chain)
        if result.deny is not None:
            # A fresh exception per connection: the forward engine raises it, and a raised
            # exception object carries its traceback and context; never share one between tasks.
            deny = result.deny
            result = PeerVerdict(identity=result.identity,
                                 deny=HTTPError(deny.status, deny.reason, kind=deny.kind))
            try:
                host, port = stream.ssl_object.getpeername()[:2]
                peer = f"{host}:{port}"
            except OSError:
                peer = "-"
            log.warning("client certificate not allowed", client=peer,
                        identity=result.identity or "-", reason=result.deny.reason,
                        rules=cfg.rules.describe())
        return result

    return policy
