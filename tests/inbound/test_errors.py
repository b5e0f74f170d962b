"""Errors the proxy answers itself: a status, a short plain-text body, a log line — never a hang."""

from __future__ import annotations

import socket
import threading
import time

from tests.support import curl, raw_exchange, running_proxy, settings_for, tls_connect
from tests.support import free_port as _free_port


def _status(data: bytes) -> int:
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0


def test_app_refusing_connections_gives_502(pki):
    with running_proxy(settings_for(pki, _free_port())) as proxy:
        r = curl("--cacert", str(pki.ca_file), "-w", "\n%{http_code}", f"{proxy.url}/")
        body, code = r.stdout.rsplit(b"\n", 1)
        assert code == b"502"
        assert b"refused" in body
        kinds = proxy.app.metrics.upstream_errors.labels("inbound", "connect")._value.get()
        assert kinds >= 1


def test_slow_app_gives_504(pki, app):
    with running_proxy(settings_for(pki, app.port, upstream_response_timeout_s=0.5)) as proxy:
        t0 = time.monotonic()
        r = curl("--cacert", str(pki.ca_file), "-o", "/dev/null", "-w", "%{http_code}",
                 f"{proxy.url}/sleep/3")
        assert r.stdout == b"504"
        assert time.monotonic() - t0 < 2.5


def test_head_too_large_gives_431_and_long_line_414(pki, app):
    with running_proxy(settings_for(pki, app.port, max_head_bytes=4096)) as proxy:
        big = b"GET / HTTP/1.1\r\nHost: localhost\r\n" + b"".join(
            b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(60)) + b"\r\n"
        assert _status(raw_exchange(proxy.port, pki, big)) == 431
        long_line = b"GET /" + b"a" * 8000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n"
        assert _status(raw_exchange(proxy.port, pki, long_line)) == 414
        assert app.seen == []


def test_body_over_limit_gives_413(pki, app):
    with running_proxy(settings_for(pki, app.port, max_body_bytes=1000)) as proxy:
        r = curl("--cacert", str(pki.ca_file), "-o", "/dev/null", "-w", "%{http_code}",
                 "--data-binary", "x" * 5000, f"{proxy.url}/")
        assert r.stdout == b"413"
        chunked = (b"POST / HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
                   + b"3e8\r\n" + b"y" * 1000 + b"\r\n" + b"3e8\r\n" + b"y" * 1000 + b"\r\n0\r\n\r\n")
        assert _status(raw_exchange(proxy.port, pki, chunked)) == 413
        ok = curl("--cacert", str(pki.ca_file), "-o", "/dev/null", "-w", "%{http_code}",
                  "--data-binary", "x" * 1000, f"{proxy.url}/")
        assert ok.stdout == b"200"


def test_slow_head_gives_408(pki, app):
    with running_proxy(settings_for(pki, app.port, head_timeout_s=0.5)) as proxy:
        s = tls_connect(proxy.port, pki)
        s.sendall(b"GET / HTTP/1.1\r\n")
        t0 = time.monotonic()
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        assert _status(data) == 408
        assert time.monotonic() - t0 < 3
        s.close()
        assert app.seen == []


def test_stalled_body_cuts_connection(pki, app):
    with running_proxy(settings_for(pki, app.port, body_timeout_s=0.5)) as proxy:
        s = tls_connect(proxy.port, pki)
        s.sendall(b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\nabc")
        t0 = time.monotonic()
        data = s.recv(4096)
        assert data == b""
        assert time.monotonic() - t0 < 3
        s.close()


def test_idle_keepalive_closed(pki, app):
    with running_proxy(settings_for(pki, app.port, idle_timeout_s=0.5)) as proxy:
        s = tls_connect(proxy.port, pki)
        s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        first = s.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        t0 = time.monotonic()
        rest = b""
        while chunk := s.recv(65536):
            rest += chunk
        assert time.monotonic() - t0 < 3
        s.close()


def test_malformed_requests_get_400_and_app_sees_nothing(pki, app):
    cases = {
        b"GARBAGE\r\n\r\n": 400,
        b"GET / HTTP/1.1\r\n\r\n": 400,                                            # no Host
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n": 400,                       # two Hosts
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n": 400,
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd": 400,
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n": 400,
        b"GET / HTTP/1.1\nHost: a\n\n": 400,                                        # bare LF
        b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n  folded\r\n\r\n": 400,           # obs-fold
        b"GET / HTTP/1.1\r\nHost : a\r\n\r\n": 400,                                 # space before colon
        b"GET / HTTP/2.0\r\nHost: a\r\n\r\n": 505,
        b"GET /\r\n\r\n": 400,                                                      # HTTP/0.9
        b"GET / HTTP/1.1\r\nHost: a\r\nNoColonHere\r\n\r\n": 400,
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n": 400,  # bad chunk size
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n": 405,
    }
    with running_proxy(settings_for(pki, app.port)) as proxy:
        for raw, expected in cases.items():
            data = raw_exchange(proxy.port, pki, raw)
            assert _status(data) == expected, (raw, data[:200])
            assert data.endswith(b"\n")
            assert b"connection: close" in data.lower()
        assert app.seen == [], [s.path for s in app.seen]
        # still up
        r = curl("--cacert", str(pki.ca_file), "-o", "/dev/null", "-w", "%{http_code}", f"{proxy.url}/")
        assert r.stdout == b"200"


def test_upstream_garbage_gives_502(pki):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    stop = threading.Event()

    def serve():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except TimeoutError:
                continue
            c.recv(65536)
            c.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            c.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with running_proxy(settings_for(pki, port)) as proxy:
            r = curl("--cacert", str(pki.ca_file), "-w", "\n%{http_code}", f"{proxy.url}/")
            assert r.stdout.endswith(b"502")
    finally:
        stop.set()
        t.join()
        srv.close()


def test_max_connections_waits_in_backlog(pki, app):
    with running_proxy(settings_for(pki, app.port, max_connections=2)) as proxy:
        held = [tls_connect(proxy.port, pki) for _ in range(2)]
        # a third connection is accepted by the kernel but not served until a slot frees up
        third = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        for s in held:
            s.close()
        import ssl
        ctx = ssl.create_default_context(cafile=str(pki.ca_file))
        with ctx.wrap_socket(third, server_hostname="localhost") as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 200")
