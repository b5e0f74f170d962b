"""Handshakes on accepted sockets, each with the context that is *current* at accept time.

A reload swaps the store's reference; a connection keeps the context it started with.
A failed handshake has already sent its alert (OpenSSL owns the socket, see ``stream.py``);
here we only classify the failure for logs and metrics.
"""

from __future__ import annotations

import socket
import ssl

import trio

from .store import ContextStore
from .stream import TLSStream


class HandshakeFailed(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


_REASONS = (
    ("UNSUPPORTED_PROTOCOL", "protocol_version"),
    ("WRONG_VERSION_NUMBER", "protocol_version"),
    ("TLSV1_ALERT_PROTOCOL_VERSION", "protocol_version"),
    ("HTTP_REQUEST", "not_tls"),
    ("HTTPS_PROXY_REQUEST", "not_tls"),
    ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "no_client_certificate"),
    ("CERTIFICATE_VERIFY_FAILED", "bad_client_certificate"),
    ("NO_SHARED_CIPHER", "no_shared_cipher"),
    ("NO_SUITABLE_SIGNATURE_ALGORITHM", "no_shared_cipher"),
    ("NO_APPLICATION_PROTOCOL", "no_application_protocol"),
    ("TLSV1_ALERT_UNKNOWN_CA", "client_rejected_certificate"),
    ("SSLV3_ALERT_BAD_CERTIFICATE", "client_rejected_certificate"),
    ("SSLV3_ALERT_CERTIFICATE_UNKNOWN", "client_rejected_certificate"),
    ("PACKET_LENGTH_TOO_LONG", "not_tls"),
    ("RECORD_LAYER_FAILURE", "not_tls"),
)


def classify(exc: BaseException) -> str:
    text = f"{getattr(exc, 'reason', '') or ''} {exc}".upper()
    for needle, reason in _REASONS:
        if needle in text:
            return reason
    if isinstance(exc, ssl.SSLError):
        return "tls_error"
    return "eof"


def stdlib_socket(sock: trio.socket.SocketType) -> socket.socket:
    """Take an accepted trio socket's descriptor into a plain (non-blocking) stdlib socket."""
    family, type_, proto = sock.family, sock.type, sock.proto
    return socket.socket(family, type_, proto, fileno=sock.detach())


async def handshake(sock: trio.socket.SocketType, store: ContextStore, timeout_s: float) -> TLSStream:
    """Wrap with the current server context and handshake under ``timeout_s``.

    Raises :class:`HandshakeFailed` (the socket is closed) on any failure.
    """
    raw = stdlib_socket(sock)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        stream = TLSStream(raw, store.current, server_side=True)
    except (OSError, LookupError) as exc:
        raw.close()
        raise HandshakeFailed("not_ready", str(exc)) from None
    try:
        with trio.fail_after(timeout_s):
            await stream.do_handshake()
    except trio.TooSlowError:
        stream.close_now()
        raise HandshakeFailed("timeout", f"no handshake within {timeout_s:g}s") from None
    except (ssl.SSLError, trio.BrokenResourceError, OSError) as exc:
        stream.close_now()
        raise HandshakeFailed(classify(exc), str(getattr(exc, "reason", None) or exc)) from None
    except BaseException:
        stream.close_now()
        raise
    return stream
