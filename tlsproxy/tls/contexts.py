"""Pure builders of ``ssl.SSLContext`` values from certificate bundles.

A context is built once, fully configured, and never changed afterwards: a configuration change or
a certificate rotation builds a *new* context (see ``store.py``). Reconfiguring a context that has
served connections is unsafe — a failed ``load_cert_chain`` leaves it half-updated.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

from ..certs.bundle import Bundle
from ..errors import CertError

ALPN_HTTP1 = ("http/1.1",)
ALPN_HTTP = ("h2", "http/1.1")     # HTTP mode's default: HTTP/2 preferred (docs/http2.md)


@dataclass(frozen=True)
class ServerTLSOptions:
    min_version: str = "1.3"               # "1.3", or "1.2" as an opt-in
    session_tickets: int = 2               # TLS 1.3 tickets per handshake; 0 disables resumption
    alpn: tuple[str, ...] = ALPN_HTTP1     # the inbound listener passes --alpn (HTTP mode: h2,http/1.1)
    client_ca_pem: bytes | None = None     # when set, client certificates are required and verified


def _tls_version(text: str) -> ssl.TLSVersion:
    return ssl.TLSVersion.TLSv1_3 if text == "1.3" else ssl.TLSVersion.TLSv1_2


def load_chain_from_memory(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes, path: str) -> None:
    """``load_cert_chain`` only takes paths: hand it an anonymous in-memory file (memfd) so the key
    never touches disk and what is loaded is exactly the bytes that were validated."""
    data = cert_pem.rstrip(b"\n") + b"\n" + key_pem
    fd = -1
    try:
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("tlsproxy-chain", os.MFD_CLOEXEC)
            os.write(fd, data)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
            return
        with tempfile.NamedTemporaryFile(prefix="tlsproxy-", suffix=".pem") as f:
            os.chmod(f.name, 0o600)
            f.write(data)
            f.flush()
            ctx.load_cert_chain(f.name)
    except ssl.SSLError as exc:
        raise CertError(path, f"OpenSSL refused the certificate/key: {exc.reason or exc}") from None
    finally:
        if fd >= 0:
            os.close(fd)


def _strict_eof(ctx: ssl.SSLContext) -> None:
    """An EOF without close_notify stays an error (a cut ClientHello gets a decode_error alert, a
    truncated TLS stream is told from a closed one). CPython 3.11.0-3.11.2 (Debian bookworm's
    python3, which the image ships) turn OP_IGNORE_UNEXPECTED_EOF on by default; later releases
    do not: clear it, so the behaviour does not depend on the interpreter's patch level."""
    ctx.options &= ~ssl.OP_IGNORE_UNEXPECTED_EOF


def server_context(bundles: Sequence[Bundle], opts: ServerTLSOptions = ServerTLSOptions()) -> ssl.SSLContext:
    """A server context serving every bundle given (e.g. one ECDSA and one RSA certificate:
    OpenSSL picks the one the client's signature algorithms allow)."""
    if not bundles:
        raise ValueError("at least one certificate bundle is needed")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _tls_version(opts.min_version)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    _strict_eof(ctx)
    if opts.min_version == "1.2":
        # Forward-secret AEAD suites only for the TLS 1.2 opt-in (Mozilla "intermediate").
        ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")
    ctx.num_tickets = opts.session_tickets
    if opts.session_tickets == 0:
        ctx.options |= ssl.OP_NO_TICKET
    if opts.alpn:
        ctx.set_alpn_protocols(list(opts.alpn))
    for bundle in bundles:
        load_chain_from_memory(ctx, bundle.cert_pem, bundle.key_pem, bundle.cert_path)
    if opts.client_ca_pem:
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            ctx.load_verify_locations(cadata=opts.client_ca_pem.decode("ascii", "replace"))
        except ssl.SSLError as exc:
            raise CertError("client CA", f"cannot load: {exc.reason or exc}") from None
    return ctx


@dataclass(frozen=True)
class ClientTLSOptions:
    ca_pem: bytes | None = None            # None: the system trust store
    client_bundle: Bundle | None = None    # a client certificate to present
    alpn: tuple[str, ...] = ALPN_HTTP1
    min_version: str = "1.3"


def client_context(opts: ClientTLSOptions = ClientTLSOptions()) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = _tls_version(opts.min_version)
    _strict_eof(ctx)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    if opts.ca_pem:
        try:
            ctx.load_verify_locations(cadata=opts.ca_pem.decode("ascii", "replace"))
        except ssl.SSLError as exc:
            raise CertError("CA bundle", f"cannot load: {exc.reason or exc}") from None
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if opts.client_bundle:
        b = opts.client_bundle
        load_chain_from_memory(ctx, b.cert_pem, b.key_pem, b.cert_path)
    if opts.alpn:
        ctx.set_alpn_protocols(list(opts.alpn))
    return ctx
