"""Size and count limits: heads that never end, too many fields, chunk-extension floods, pipelines.

(431/414 for a head that arrives in one read with a small --max-head-bytes and 413 for bodies are in
tests/inbound/test_errors.py.) Here: the default limits, heads dribbled in pieces (h11's incomplete
event bound rather than ours), a megabyte of head that never ends, 10,000 pipelined requests,
thousands of silent connections and --max-connections (the proxy as a process: its own RSS and fds).
"""

from __future__ import annotations

import select
import socket
import ssl
import time

import h11
import pytest

from tests.hostile.helpers import (
    keepalive_ok,
    parse_responses,
    proxy_process,
    read_all,
    scripted_upstream,
    status_of,
    tls_socket,
)
from tests.support import make_pki, running_proxy, settings_for, wait_for


@pytest.fixture(scope="module")
def proxy_and_app(tmp_path_factory):
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    with scripted_upstream(keepalive_ok) as up, running_proxy(settings_for(pki, up.port)) as proxy:
        yield pki, proxy, up


def _send_pieces(pki, port, pieces, timeout: float = 10) -> tuple[bytes, str]:
    with tls_socket(port, pki, timeout) as s:
        for piece in pieces:
            try:
                s.sendall(piece)
            except OSError:
                break                      # the proxy answered and closed: read what it said
        return read_all(s, timeout)


def _headers(n: int) -> bytes:
    return b"".join(b"X-F%d: v\r\n" % i for i in range(n))


def test_too_many_header_fields_gets_431(proxy_and_app):
    pki, proxy, up = proxy_and_app
    before = len(up.raw)
    data, how = _send_pieces(pki, proxy.port, [b"GET / HTTP/1.1\r\nHost: a\r\n" + _headers(100) + b"\r\n"])
    assert status_of(data) == 431 and how == "eof", data[:200]
    assert len(up.raw) == before
    # 99 fields + Host is the most we take
    data, _ = _send_pieces(pki, proxy.port, [b"GET /ok HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
                                             + _headers(98) + b"\r\n"])
    assert parse_responses(data) == [(200, b"/ok")]


def test_request_line_dribbled_past_the_limit_gets_414(proxy_and_app):
    pki, proxy, up = proxy_and_app
    before = len(up.raw)
    pieces = [b"GET /"] + [b"a" * 8192] * 8
    data, how = _send_pieces(pki, proxy.port, pieces)
    assert status_of(data) == 414 and how == "eof", data[:200]
    assert len(up.raw) == before


def test_header_line_dribbled_past_the_limit_gets_431(proxy_and_app):
    pki, proxy, up = proxy_and_app
    before = len(up.raw)
    pieces = [b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: "] + [b"v" * 8192] * 8
    data, how = _send_pieces(pki, proxy.port, pieces)
    assert status_of(data) == 431 and how == "eof", data[:200]
    assert len(up.raw) == before


def test_a_megabyte_of_head_that_never_ends_is_cut_early(proxy_and_app):
    """The proxy answers 431 once it holds more than --max-head-bytes; it never buffers the MB."""
    pki, proxy, up = proxy_and_app
    before = len(up.raw)
    pieces = [b"GET / HTTP/1.1\r\nHost: a\r\n"] + [b"X-Filler: " + b"f" * 1000 + b"\r\n"] * 1000
    t0 = time.monotonic()
    data, how = _send_pieces(pki, proxy.port, pieces)
    assert status_of(data) == 431, data[:200]
    assert time.monotonic() - t0 < 5
    assert len(up.raw) == before


def test_huge_chunk_extension_gets_400(proxy_and_app):
    """One chunk-size line carrying 100 KB of extension: refused, the body never completes upstream."""
    pki, proxy, up = proxy_and_app
    n = len(up.seen)
    head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    pieces = [head, b"5;ext=" + b"e" * 100_000 + b"\r\nhello\r\n0\r\n\r\n"]
    data, how = _send_pieces(pki, proxy.port, pieces)
    assert status_of(data) == 400 and how == "eof", data[:200]
    assert len(up.seen) == n                   # no complete request reached the app


def test_chunk_extension_flood_gets_400(proxy_and_app):
    """Many 1-byte chunks each with a 4 KB extension (under the line limit): the framing
    overhead bound refuses it; without it 400 KB of wire bytes would carry 100 bytes of data."""
    pki, proxy, up = proxy_and_app
    n = len(up.seen)
    head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"1;" + b"e" * 4000 + b"\r\nx\r\n"
    data, how = _send_pieces(pki, proxy.port, [head] + [chunk * 10] * 10 + [b"0\r\n\r\n"])
    assert status_of(data) == 400 and b"overhead" in data, data[:300]
    assert len(up.seen) == n
    # ordinary extensions are fine
    ok = head.replace(b"Host: a\r\n", b"Host: a\r\nConnection: close\r\n") + \
        b"5;name=value\r\nhello\r\n" * 20 + b"0\r\n\r\n"
    data, _ = _send_pieces(pki, proxy.port, [ok])
    assert parse_responses(data) == [(200, b"/")]
    assert up.seen[-1][1] == b"hello" * 20


def test_ten_thousand_pipelined_requests_are_answered_in_order(pki):
    """One write of 10,000 requests (~370 KB): answered in order, then a clean close. The proxy
    reads a pipeline only as fast as it answers it, so its memory stays flat (measured on the
    proxy process)."""
    with scripted_upstream(keepalive_ok) as up, proxy_process(pki, up.port) as proc:
        rss0 = proc.rss_kib()
        _pipeline(pki, proc.port, up)
        print(f"pipeline: proxy RSS {rss0} KiB -> {proc.rss_kib()} KiB")
        assert proc.rss_kib() - rss0 < 16 * 1024, (rss0, proc.rss_kib())


def _pipeline(pki, port, up) -> None:
    """Write the whole pipeline while reading the answers, on one thread with a non-blocking
    socket (an SSLSocket must not be read and written from two threads at once)."""
    count = 10_000
    n = len(up.seen)
    requests = b"".join(b"GET /r%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(count - 1))
    requests += b"GET /r%d HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n" % (count - 1)
    s = tls_socket(port, pki, timeout=120)
    s.setblocking(False)
    out = memoryview(requests)
    parser = h11.Connection(h11.CLIENT)
    got = 0
    closed = False
    t0 = time.monotonic()
    try:
        while not closed and got < count and time.monotonic() - t0 < 120:
            readable, writable, _ = select.select([s], [s] if out else [], [], 1)
            if writable and out:
                try:
                    out = out[s.send(out[:16384]):]
                except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                    pass
            while readable or s.pending():
                readable = []
                try:
                    data = s.recv(65536)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    break
                parser.receive_data(data)
                while True:
                    if parser.our_state is h11.IDLE:
                        parser.send(h11.Request(method="GET", target="/", headers=[("Host", "a")]))
                        parser.send(h11.EndOfMessage())
                    event = parser.next_event()
                    if event is h11.NEED_DATA:
                        break
                    if isinstance(event, h11.Response):
                        assert event.status_code == 200
                    elif isinstance(event, h11.Data):
                        assert event.data == b"/r%d" % got, (got, event.data)
                    elif isinstance(event, h11.EndOfMessage):
                        got += 1
                        if got < count:
                            parser.start_next_cycle()
                        else:
                            break
                    elif isinstance(event, h11.ConnectionClosed):
                        closed = True
                        break
                if not data or closed or got >= count:
                    break
        assert got == count, f"answered {got} of {count}"
        s.settimeout(10)
        assert s.recv(10) == b""              # then a clean close (the last asked for it)
    finally:
        s.close()
    assert [r.target for r, _ in up.seen[n:]] == [b"/r%d" % i for i in range(count)]


def _active(proc) -> float:
    return proc.metric("tlsproxy_connections_active", listener="inbound")


def test_thousands_of_silent_connections_cost_bounded_memory_and_are_freed(pki):
    """2,000 TCP connections that never send a byte, twice. Each costs the proxy a few KiB
    (measured ~15 KiB), the handshake timeout frees them all, descriptors return to the baseline,
    and the second wave does not grow the process (nothing leaked)."""
    with scripted_upstream(keepalive_ok) as up, \
            proxy_process(pki, up.port, "--handshake-timeout", "2s") as proc:
        fds0 = proc.fds()
        rss = [proc.rss_kib()]
        for _wave in range(2):
            socks = [socket.create_connection(("127.0.0.1", proc.port), timeout=10) for _ in range(2000)]
            try:
                assert wait_for(lambda: _active(proc) == 2000, 15, 0.2)
                rss.append(proc.rss_kib())
                assert (rss[-1] - rss[0]) / 2000 < 40, rss          # KiB per connection
                t0 = time.monotonic()
                assert wait_for(lambda: _active(proc) == 0, 10, 0.2)
                assert time.monotonic() - t0 < 4
                for s in socks[:50]:                               # they see the close
                    s.settimeout(5)
                    assert s.recv(10) == b""
            finally:
                for s in socks:
                    s.close()
        assert rss[2] < rss[1] * 1.1 + 2048, rss                   # second wave reuses memory
        assert wait_for(lambda: proc.fds() <= fds0 + 2, 5), (proc.fds(), fds0)
        assert proc.metric("tlsproxy_handshake_failures_total", listener="inbound", reason="timeout") == 4000
        with tls_socket(proc.port, pki) as s:
            s.sendall(b"GET /alive HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            assert read_all(s)[0].endswith(b"/alive")


def test_max_connections_reached_new_connections_wait_then_are_served(pki):
    """--max-connections 50 and 200 silent clients: never more than 50 handled at once; the rest
    wait in the kernel backlog (no refusal, no crash) and are served as slots free up."""
    with scripted_upstream(keepalive_ok) as up, \
            proxy_process(pki, up.port, "--handshake-timeout", "1s", "--max-connections", "50") as proc:
        socks = [socket.create_connection(("127.0.0.1", proc.port), timeout=10) for _ in range(200)]
        try:
            peak = 0.0
            t0 = time.monotonic()
            while time.monotonic() - t0 < 2.5:
                peak = max(peak, _active(proc))
                time.sleep(0.1)
            assert peak == 50
            # a real client queued behind them is served once the silent ones time out (4 waves of 1 s)
            with tls_socket(proc.port, pki, timeout=15) as s:
                s.sendall(b"GET /queued HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                assert read_all(s, 15)[0].endswith(b"/queued")
        finally:
            for s in socks:
                s.close()
        assert proc.proc.poll() is None
