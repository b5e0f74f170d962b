"""Full duplex, early answers, Expect: 100-continue, trailers, a minimum body rate (issue 15).

Real clients (curl, a TLS socket) against real apps (scripted raw sockets) through the proxy.
"""

from __future__ import annotations

import contextlib
import subprocess
import time

import pytest

from tests.hostile.helpers import Conn, scripted_upstream, status_of, tls_socket
from tests.support import make_pki, running_proxy, settings_for


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def _read_head(conn: Conn, timeout: float = 10) -> bytes:
    buf = bytearray()
    conn.sock.settimeout(timeout)
    while b"\r\n\r\n" not in buf:
        data = conn.sock.recv(65536)
        if not data:
            break
        buf += data
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    conn.received[:] = rest
    return head


def _read_until(sock, marker: bytes, timeout: float = 10) -> bytes:
    buf = bytearray()
    deadline = time.monotonic() + timeout
    while marker not in buf and time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(65536)
        except TimeoutError:
            break
        if not data:
            break
        buf += data
    return bytes(buf)


def _upload_refused_early(pki, tmp_path, http: str) -> tuple[str, str, int, float, int]:
    """curl (``--http1.1`` or ``--http2``) PUTs 100 MiB with ``Expect: 100-continue`` to an app
    that answers 401 at once and never reads the body. Returns the HTTP version and status curl
    saw, the bytes it uploaded, how long it took, and the body bytes that reached the app."""
    after_head = []

    def refuse_unread(conn: Conn) -> None:
        _read_head(conn)
        conn.sock.sendall(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 13\r\n\r\nunauthorized\n")
        got = len(conn.received)      # count what still arrives, without acting on it
        conn.sock.settimeout(5)
        try:
            while data := conn.sock.recv(65536):
                got += len(data)
        except OSError:
            pass
        after_head.append(got)

    big = tmp_path / "big"
    with big.open("wb") as f:
        f.truncate(100 * 1024 * 1024)
    with scripted_upstream(refuse_unread) as up, running_proxy(settings_for(pki, up.port)) as proxy:
        t0 = time.monotonic()
        p = subprocess.run(["curl", "-sS", http, "-o", "/dev/null",
                            "-w", "%{http_version} %{http_code} %{size_upload}", "--cacert", str(pki.ca_file),
                            "-H", "Expect: 100-continue", "--limit-rate", "50M",
                            "-T", str(big), f"{proxy.url}/upload"], capture_output=True, timeout=60)
        elapsed = time.monotonic() - t0
    assert after_head, p.stderr
    version, code, uploaded = p.stdout.decode().split()
    return version, code, int(uploaded), elapsed, after_head[0]


def test_early_401_reaches_curl_before_the_upload(pki, tmp_path):
    """HTTP/1.1: the proxy passes ``Expect: 100-continue`` on and relays the app's early 401, so
    curl never starts the body (over HTTP/2 the proxy answers ``100`` itself: the next test)."""
    version, code, uploaded, elapsed, at_app = _upload_refused_early(pki, tmp_path, "--http1.1")
    assert (version, code) == ("1.1", "401")
    assert uploaded < 1024 * 1024, uploaded
    assert elapsed < 5, elapsed
    assert at_app < 1024 * 1024


def test_early_401_stops_an_http2_upload(pki, tmp_path):
    """HTTP/2: the proxy answers ``Expect: 100-continue`` itself (docs/http2.md), so the body
    starts; the app's early 401 still reaches curl at once and ends the upload after what the
    stream window and the app's unread socket buffers took — a fraction of the 100 MiB."""
    version, code, uploaded, elapsed, _ = _upload_refused_early(pki, tmp_path, "--http2")
    assert (version, code) == ("2", "401")
    assert uploaded < 16 * 1024 * 1024, uploaded
    assert elapsed < 5, elapsed


def test_response_streams_while_the_request_body_still_streams(pki):
    def echo(conn: Conn) -> None:
        _read_head(conn)
        conn.sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        def send(wire: bytes) -> None:   # echo what arrived, CRLFs shown as "|" (no stray terminator)
            data = wire.replace(b"\r\n", b"|")
            conn.sock.sendall(b"%x\r\n%s\r\n" % (len(data), data))

        wire = bytearray(conn.received)
        if wire:
            send(bytes(wire))
        conn.sock.settimeout(10)
        while not wire.endswith(b"0\r\n\r\n"):
            data = conn.sock.recv(65536)
            if not data:
                return
            wire += data
            send(data)
        conn.sock.sendall(b"0\r\n\r\n")

    with scripted_upstream(echo) as up, running_proxy(settings_for(pki, up.port)) as proxy, \
            tls_socket(proxy.port, pki) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        first = _read_until(s, b"hello", timeout=5)
        assert first.startswith(b"HTTP/1.1 200"), first
        assert b"hello" in first          # echoed before the request body ended
        s.sendall(b"5\r\nworld\r\n0\r\n\r\n")
        rest = _read_until(s, b"\r\n0\r\n\r\n", timeout=5)
        assert b"world" in rest and rest.endswith(b"\r\n0\r\n\r\n"), rest


def _trailer_app(seen: list[bytes]):
    def app(conn: Conn) -> None:
        head = _read_head(conn)
        wire = bytearray(conn.received)
        conn.sock.settimeout(10)
        while not wire.endswith(b"\r\n\r\n"):
            data = conn.sock.recv(65536)
            if not data:
                return
            wire += data
        seen.append(head + b"\r\n\r\n" + bytes(wire))
        conn.sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: grpc-status\r\n\r\n"
                          b"5\r\nhello\r\n0\r\ngrpc-status: 0\r\nContent-Length: 99\r\n\r\n")
    return app


REQUEST = (b"POST /t HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n%s\r\n"
           b"3\r\nabc\r\n0\r\nX-Checksum: sum\r\nHost: evil\r\n\r\n")


def test_trailers_both_ways_to_a_client_that_takes_them(pki):
    seen: list[bytes] = []
    with scripted_upstream(_trailer_app(seen)) as up, running_proxy(settings_for(pki, up.port)) as proxy, \
            tls_socket(proxy.port, pki) as s:
        s.sendall(REQUEST % b"TE: trailers\r\n")
        data = _read_until(s, b"\r\n0\r\n", timeout=5)
        data += _read_until(s, b"\r\n\r\n", timeout=2) if not data.endswith(b"\r\n\r\n") else b""
    assert status_of(data) == 200, data
    body_part = data.split(b"\r\n\r\n", 1)[1]
    assert b"grpc-status: 0\r\n" in body_part          # relayed to a client that sent TE: trailers
    assert b"Content-Length: 99" not in body_part      # framing fields never travel as trailers
    app_saw = seen[0].lower()
    assert b"\r\nte: trailers\r\n" in app_saw.split(b"\r\n\r\n")[0] + b"\r\n"
    upstream_body = seen[0].split(b"\r\n\r\n", 1)[1]
    assert b"X-Checksum: sum\r\n" in upstream_body     # request trailers relayed upstream
    assert b"evil" not in upstream_body


def test_trailers_dropped_for_a_client_that_did_not_ask(pki):
    seen: list[bytes] = []
    with scripted_upstream(_trailer_app(seen)) as up, running_proxy(settings_for(pki, up.port)) as proxy, \
            tls_socket(proxy.port, pki) as s:
        s.sendall(REQUEST % b"")
        data = _read_until(s, b"\r\n0\r\n\r\n", timeout=5)
    assert status_of(data) == 200, data
    assert data.endswith(b"hello\r\n0\r\n\r\n"), data
    assert b"grpc-status" not in data
    assert b"\r\nte:" not in seen[0].lower().split(b"\r\n\r\n")[0]


def test_curl_gets_the_trailers_it_asked_for(pki):
    seen: list[bytes] = []
    with scripted_upstream(_trailer_app(seen)) as up, running_proxy(settings_for(pki, up.port)) as proxy:
        p = subprocess.run(["curl", "-sS", "--http1.1", "--raw", "--cacert", str(pki.ca_file),
                            "-H", "TE: trailers",
                            "-H", "Transfer-Encoding: chunked", "--data-binary", "abc", f"{proxy.url}/t"],
                           capture_output=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert b"grpc-status: 0" in p.stdout, p.stdout


def test_trickling_body_is_cut_by_the_minimum_rate(pki):
    def app(conn: Conn) -> None:
        conn.read_request(timeout=30)

    settings = settings_for(pki, 0, min_body_rate=100, min_body_rate_grace_s=2.0)
    with scripted_upstream(app) as up, \
            running_proxy(settings_for(pki, up.port, min_body_rate=100, min_body_rate_grace_s=2.0)) as proxy:
        assert settings.min_body_rate == 100
        with tls_socket(proxy.port, pki) as s:
            s.sendall(b"POST /slow HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n")
            t0 = time.monotonic()
            data = b""
            while time.monotonic() - t0 < 15 and not data:
                try:
                    s.sendall(b"x")        # one byte every 2 s: the inactivity timer never fires
                except OSError:
                    break
                s.settimeout(2.0)
                try:
                    data = s.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    break
            elapsed = time.monotonic() - t0
    assert status_of(data) == 408, data
    assert elapsed < 8, elapsed


def test_proxy_sends_100_itself_when_the_app_says_nothing(pki):
    def silent_reader(conn: Conn) -> None:         # never sends 100: waits for the body
        while (req := conn.read_request(timeout=15)) is not None:
            body = b"%d" % len(conn.body)
            conn.sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            assert req.target == b"/up"

    with scripted_upstream(silent_reader) as up, running_proxy(settings_for(pki, up.port)) as proxy:
        t0 = time.monotonic()
        p = subprocess.run(["curl", "-sS", "-v", "--http1.1", "--cacert", str(pki.ca_file),
                            "-H", "Expect: 100-continue", "--expect100-timeout", "20",
                            "--data-binary", "@-", f"{proxy.url}/up"],
                           input=b"z" * 100_000, capture_output=True, timeout=30)
        elapsed = time.monotonic() - t0
    assert p.returncode == 0, p.stderr
    assert b"HTTP/1.1 100 Continue" in p.stderr
    assert p.stdout == b"100000"
    assert 0.9 < elapsed < 5, elapsed                  # about EXPECT_WAIT_S, far below curl's 20 s


def test_proxy_answers_100_at_once_for_an_http10_app(pki):
    def http10(conn: Conn) -> None:
        req = conn.read_request(timeout=15)
        if req is not None:
            conn.sock.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")

    with scripted_upstream(http10) as up, running_proxy(settings_for(pki, up.port)) as proxy:
        with tls_socket(proxy.port, pki) as s:            # the proxy learns: this app speaks HTTP/1.0
            s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            assert status_of(_read_until(s, b"ok")) == 200
        with tls_socket(proxy.port, pki) as s:
            t0 = time.monotonic()
            s.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
            interim = _read_until(s, b"\r\n\r\n", timeout=5)
            waited = time.monotonic() - t0
            assert interim.startswith(b"HTTP/1.1 100 Continue"), interim
            assert waited < 0.5, waited
            s.sendall(b"hi")
            assert status_of(_read_until(s, b"ok", timeout=5)) == 200


def test_early_answer_then_the_rest_of_the_body_keeps_the_connection(pki):
    def early_then_normal(conn: Conn) -> None:
        if conn.index == 0:
            _read_head(conn)
            conn.sock.sendall(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 5\r\n\r\nnope\n")
            time.sleep(2)
            return
        while (req := conn.read_request()) is not None:
            target = req.target
            conn.sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(target), target))

    with scripted_upstream(early_then_normal) as up, running_proxy(settings_for(pki, up.port)) as proxy, \
            tls_socket(proxy.port, pki) as s:
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\n\r\n" + b"x" * 1000)
        first = _read_until(s, b"nope\n", timeout=5)
        assert status_of(first) == 401, first          # before the body ended
        assert b"connection: close" not in first.lower()
        s.sendall(b"x" * 4000 + b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")   # the rest, then the next request
        second = _read_until(s, b"/next", timeout=5)
        assert status_of(second) == 200 and second.endswith(b"/next"), second


def test_trickling_body_after_the_response_started_is_closed(pki):
    def answers_first(conn: Conn) -> None:
        _read_head(conn)
        conn.sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nearly\r\n")
        conn.sock.settimeout(30)
        with contextlib.suppress(OSError):
            while conn.sock.recv(65536):
                pass

    rate = {"min_body_rate": 100, "min_body_rate_grace_s": 2.0}
    with scripted_upstream(answers_first) as up, running_proxy(settings_for(pki, up.port, **rate)) as proxy, \
            tls_socket(proxy.port, pki) as s:
        s.sendall(b"POST /slow HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n")
        t0 = time.monotonic()
        data = b""
        closed = False
        while time.monotonic() - t0 < 15 and not closed:
            try:
                s.sendall(b"x")
                s.settimeout(2.0)
                chunk = s.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                closed = True
                break
            data += chunk
            closed = not chunk
        elapsed = time.monotonic() - t0
    assert status_of(data) == 200 and b"early" in data, data    # the response had started ...
    assert closed and not data.endswith(b"0\r\n\r\n"), data     # ... so the cut is a close
    assert elapsed < 8, elapsed
