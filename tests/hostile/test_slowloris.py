"""Slow clients: the head, the body, the handshake and idle keep-alive each have a deadline that
a client trickling bytes cannot extend. (A partial head then silence → 408, a stalled
Content-Length body, and the idle close are in tests/inbound/test_errors.py; these add the
byte-by-byte variants, the exact timing and the slow handshake.)"""

from __future__ import annotations

import socket
import time

from tests.hostile.helpers import keepalive_ok, read_all, scripted_upstream, status_of, tls_socket
from tests.support import running_proxy, settings_for, wait_for

HEAD = b"GET /slow HTTP/1.1\r\nHost: localhost\r\nX-Padding: " + b"p" * 200 + b"\r\n\r\n"


def _dribble(sock, data: bytes, interval: float, timeout: float = 10) -> tuple[bytes, str]:
    """Send ``data`` one byte per ``interval`` while reading what comes back, on one thread (an
    SSLSocket must not be read and written from two threads at once). Returns (received, how)."""
    got = bytearray()
    i = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if i < len(data):
            try:
                sock.sendall(data[i:i + 1])
                i += 1
            except OSError:
                i = len(data)                     # the proxy closed: keep reading its answer
        sock.settimeout(interval)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return bytes(got), "reset"
        if not chunk:
            return bytes(got), "eof"
        got += chunk
    return bytes(got), "timeout"


def test_head_dribbled_byte_by_byte_gets_408_at_the_head_timeout(pki):
    with scripted_upstream(keepalive_ok) as up, \
            running_proxy(settings_for(pki, up.port, head_timeout_s=1.0)) as proxy:
        s = tls_socket(proxy.port, pki)
        t0 = time.monotonic()
        try:
            data, how = _dribble(s, HEAD, 0.05)   # 1 byte / 50 ms: the whole head would take ~12 s
        finally:
            s.close()
        elapsed = time.monotonic() - t0
        assert status_of(data) == 408 and how in ("eof", "reset"), (data, how)
        assert 0.9 < elapsed < 2.5, elapsed
        assert up.raw == b""


def test_second_request_dribbled_on_keepalive_gets_408(pki):
    with scripted_upstream(keepalive_ok) as up, \
            running_proxy(settings_for(pki, up.port, head_timeout_s=1.0, idle_timeout_s=30)) as proxy:
        s = tls_socket(proxy.port, pki)
        s.sendall(b"GET /first HTTP/1.1\r\nHost: localhost\r\n\r\n")
        first = s.recv(65536)
        assert first.startswith(b"HTTP/1.1 200") and first.endswith(b"/first")
        t0 = time.monotonic()
        try:
            data, how = _dribble(s, HEAD, 0.05)
        finally:
            s.close()
        assert status_of(data) == 408, data
        assert 0.9 < time.monotonic() - t0 < 2.5
        assert up.requests == [b"/first"]


def test_many_slowloris_connections_do_not_starve_a_normal_client(pki):
    with scripted_upstream(keepalive_ok) as up, \
            running_proxy(settings_for(pki, up.port, head_timeout_s=2.0)) as proxy:
        slow = []
        for _ in range(100):
            s = tls_socket(proxy.port, pki)
            s.sendall(b"GET / HTTP/1.1\r\n")
            slow.append(s)
        try:
            t0 = time.monotonic()
            with tls_socket(proxy.port, pki) as ok:
                ok.sendall(b"GET /normal HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                data, _ = read_all(ok)
            assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"/normal")
            assert time.monotonic() - t0 < 1.5
            answers = [read_all(s, 10)[0] for s in slow]
            assert all(status_of(a) == 408 for a in answers)
        finally:
            for s in slow:
                s.close()
        assert up.requests == [b"/normal"]


def test_trickled_chunked_body_that_stalls_is_cut_and_the_app_never_gets_it_complete(pki):
    with scripted_upstream(keepalive_ok) as up, \
            running_proxy(settings_for(pki, up.port, body_timeout_s=0.5)) as proxy:
        s = tls_socket(proxy.port, pki)
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(5):                      # keeps arriving within the inactivity timeout...
            s.sendall(b"1\r\nx\r\n")
            time.sleep(0.2)
        t0 = time.monotonic()                   # ...then stops
        data, how = read_all(s, 5)
        s.close()
        assert data == b"" and how in ("eof", "reset")
        assert 0.3 < time.monotonic() - t0 < 2
        assert up.requests == []               # the app saw a request start, never a whole one


def test_idle_keepalive_is_closed_at_the_idle_timeout_not_before(pki):
    with scripted_upstream(keepalive_ok) as up, \
            running_proxy(settings_for(pki, up.port, idle_timeout_s=1.0)) as proxy:
        s = tls_socket(proxy.port, pki)
        s.sendall(b"GET /a HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert s.recv(65536).endswith(b"/a")
        t0 = time.monotonic()
        data, how = read_all(s, 5)
        elapsed = time.monotonic() - t0
        s.close()
        assert data == b"" and how == "eof"
        assert 0.9 < elapsed < 2.0, elapsed
        active = proxy.app.metrics.connections_active.labels("inbound", "http")
        assert wait_for(lambda: active.value == 0, 5)


def test_connection_that_handshakes_then_says_nothing_is_closed_at_the_head_timeout(pki):
    with scripted_upstream(keepalive_ok) as up, \
            running_proxy(settings_for(pki, up.port, head_timeout_s=1.0, idle_timeout_s=30)) as proxy:
        s = tls_socket(proxy.port, pki)
        t0 = time.monotonic()
        data, how = read_all(s, 5)
        s.close()
        assert data == b"" and how == "eof"
        assert 0.9 < time.monotonic() - t0 < 2.0


def test_client_hello_dribbled_byte_by_byte_is_cut_at_the_handshake_timeout(pki):
    """A real ClientHello (from Python's ssl, captured through a memory BIO) sent one byte every
    50 ms: the handshake deadline is absolute, so it is cut at handshake_timeout_s."""
    import ssl

    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    assert hello[0] == 0x16
    with scripted_upstream(keepalive_ok) as up, \
            running_proxy(settings_for(pki, up.port, handshake_timeout_s=1.0)) as proxy:
        s = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        t0 = time.monotonic()
        try:
            data, how = _dribble(s, hello, 0.05)
        finally:
            s.close()
        assert data == b"" and how in ("eof", "reset")
        assert 0.9 < time.monotonic() - t0 < 2.5
        failures = proxy.app.metrics.handshake_failures.labels("inbound", "timeout")
        assert wait_for(lambda: failures._value.get() == 1, 5)
        assert up.raw == b""


def test_a_drain_closes_connections_that_have_not_sent_a_request_at_once(pki):
    """A handshaken connection that has sent nothing waits for its first byte in the TLS listener
    (no engine state yet): a drain must still close it at once, as it closes idle keep-alives, and
    a connection that then sends its request is unaffected by the earlier ones' wait."""
    with scripted_upstream(keepalive_ok) as up, \
            running_proxy(settings_for(pki, up.port, head_timeout_s=30, idle_timeout_s=30,
                                       drain_delay_s=0.0)) as proxy:
        silent = [tls_socket(proxy.port, pki) for _ in range(3)]
        talker = tls_socket(proxy.port, pki)
        talker.sendall(b"GET /a HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert talker.recv(65536).endswith(b"/a")
        active = proxy.app.metrics.connections_active.labels("inbound", "http")
        assert wait_for(lambda: active.value == 4, 5), active.value
        t0 = time.monotonic()
        proxy.call(proxy.app.request_drain)
        for s in [*silent, talker]:
            data, how = read_all(s, 5)
            s.close()
            assert data == b"" and how == "eof"
        assert time.monotonic() - t0 < 2.0        # not the 30 s head or idle timeout
        assert wait_for(lambda: active.value == 0, 5)
