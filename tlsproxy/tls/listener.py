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
    ("VERSION_TOO_LOW", "protocol_version"),            # an SSLv3 ClientHello
    ("WRONG_VERSION_NUMBER", "not_tls"),                # the first record header is not TLS at all
    ("TLSV1_ALERT_PROTOCOL_VERSION", "protocol_version"),
    ("HTTP_REQUEST", "not_tls"),
    ("HTTPS_PROXY_REQUEST", "not_tls"),
    ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "no_client_certificate"),
    ("CERTIFICATE_VERIFY_FAILED", "bad_client_certificate"),
    ("NO_SHARED_CIPHER", "no_shared_cipher"),
    ("NO_SUITABLE_SIGNATURE_ALGORITHM", "no_shared_cipher"),
    ("NO_SUITABLE_KEY_SHARE", "no_shared_cipher"),      # no key-exchange group in common
    ("UNEXPECTED_EOF", "eof"),
    ("NO_APPLICATION_PROTOCOL", "no_application_protocol"),
    ("TLSV1_ALERT_UNKNOWN_CA", "client_rejected_certificate"),
    ("SSLV3_ALERT_BAD_CERTIFICATE", "client_rejected_certificate"),
    ("SSLV3_ALERT_CERTIFICATE_UNKNOWN", "client_rejected_certificate"),
    ("PACKET_LENGTH_TOO_LONG", "not_tls"),
    ("RECORD_LAYER_FAILURE", "not_tls"),
)


# OpenSSL closes without an alert when the first bytes are not a TLS record at all. RFC 8446 §5:
# a record of an unknown type MUST be answered with a fatal unexpected_message alert; we send it.
_SILENT = ("HTTP_REQUEST", "HTTPS_PROXY_REQUEST", "WRONG_VERSION_NUMBER")
UNEXPECTED_MESSAGE_ALERT = b"\x15\x03\x03\x00\x02\x02\x0a"   # alert record: fatal(2), unexpected_message(10)
# RFC 8446 §D.5: a ClientHello.legacy_version of 0x0300 or less MUST get protocol_version; OpenSSL
# answers an SSLv3 hello with handshake_failure, so we look at the first bytes ourselves.
PROTOCOL_VERSION_ALERT = b"\x15\x03\x03\x00\x02\x02\x46"     # fatal(2), protocol_version(70)
LINGER_S = 0.5            # after a refused handshake: read and drop for this long so the kernel
LINGER_BYTES = 64 * 1024  # closes with FIN, not RST (an RST can destroy the alert before it is read)


def classify(exc: BaseException) -> str:
    text = f"{getattr(exc, 'reason', '') or ''} {exc}".upper()
    for needle, reason in _REASONS:
        if needle in text:
            return reason
    if isinstance(exc, ssl.SSLError):
        return "tls_error"
    return "eof"


def stdlib_socket(sock: trio.socket.SocketType) -> socket.socket:
    """Take a trio socket's descriptor into a plain stdlib socket (the trio one is left detached)."""
    family, type_, proto = sock.family, sock.type, sock.proto
    return socket.socket(family, type_, proto, fileno=sock.detach())


async def handshake(raw: socket.socket, store: ContextStore, timeout_s: float) -> TLSStream:
    """Wrap the accepted socket (a plain one, as ``net.accept_loop`` hands out) with the current
    server context and handshake under ``timeout_s``.

    Raises :class:`HandshakeFailed` (the socket is closed) on any failure.
    """
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    raw.setblocking(False)
    stream: TLSStream | None = None
    try:
        # A plain scope, not trio.fail_after: this runs once per connection (docs/performance.md)
        with trio.CancelScope(deadline=trio.current_time() + timeout_s) as scope:
            sslv3 = await _is_sslv3_hello(raw)
            try:
                stream = TLSStream(raw, store.current, server_side=True)
            except (OSError, LookupError) as exc:
                raw.close()
                raise HandshakeFailed("not_ready", str(exc)) from None
            if sslv3:
                await _refuse(stream.fileno(), PROTOCOL_VERSION_ALERT)
                stream.close_now()
                raise HandshakeFailed("protocol_version", "SSLv3 ClientHello")
            await stream.do_handshake()
        if scope.cancelled_caught:
            if stream is None:
                raw.close()
            else:
                stream.close_now()
            raise HandshakeFailed("timeout", f"no handshake within {timeout_s:g}s")
    except HandshakeFailed:
        raise
    except (ssl.SSLError, trio.BrokenResourceError, OSError) as exc:
        detail = str(getattr(exc, "reason", None) or exc)
        if stream is None:
            raw.close()
            raise HandshakeFailed(classify(exc), detail) from None
        if isinstance(exc, ssl.SSLError):
            # OpenSSL sent its alert (or, for bytes that are not TLS, none: we send it). Either
            # way close with a linger, so unread bytes of the client's flight do not turn our
            # close into an RST that can destroy the alert before the client reads it.
            silent = any(k in detail for k in _SILENT)
            await _refuse(stream.fileno(), UNEXPECTED_MESSAGE_ALERT if silent else b"")
        stream.close_now()
        raise HandshakeFailed(classify(exc), detail) from None
    except BaseException:
        if stream is None:
            raw.close()
        else:
            stream.close_now()
        raise
    assert stream is not None
    return stream


async def _is_sslv3_hello(raw: socket.socket) -> bool:
    """Peek (once the first bytes arrived) at the record and handshake headers: a ClientHello whose
    legacy_version is 0x0300 or below. Never consumes bytes. Decides only when the first record
    itself holds the handshake type and legacy_version (record length ≥ 6): a hello fragmented
    into smaller records, or split into tiny segments, is left to OpenSSL — the bytes after a short
    first record belong to the *next* record (e.g. a zero-length application-data record
    interleaved in the handshake, which OpenSSL answers with unexpected_message, RFC 8446 §5.1).
    Usually the hello is already there when we accept: then no wait at all."""
    for _ in range(2):
        try:
            head = raw.recv(11, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            await trio.lowlevel.wait_readable(raw.fileno())
            continue
        except OSError:
            return False
        return is_sslv3_client_hello(head)
    return False


def is_sslv3_client_hello(head: bytes) -> bool:
    """The first 11 bytes of a connection: a handshake record (22) at least 6 bytes long whose
    message is a ClientHello (1) with legacy_version ≤ 0x0300 (SSLv3 or older, RFC 8446 §D.5)."""
    return (len(head) >= 11 and head[0] == 0x16 and int.from_bytes(head[3:5], "big") >= 6
            and head[5] == 0x01 and (head[9], head[10]) <= (3, 0))


async def _refuse(fd: int, alert: bytes) -> None:
    """Send an alert OpenSSL did not send (if any), then a short lingering close."""
    try:
        raw = socket.socket(fileno=fd)
    except OSError:
        return
    try:
        if alert:
            raw.send(alert, socket.MSG_DONTWAIT)
        raw.shutdown(socket.SHUT_WR)
        with trio.move_on_after(LINGER_S):
            dropped = 0
            while dropped < LINGER_BYTES:
                await trio.lowlevel.wait_readable(fd)
                try:
                    got = raw.recv(65536, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    continue
                if not got:
                    break
                dropped += len(got)
    except OSError:
        pass
    finally:
        raw.detach()
