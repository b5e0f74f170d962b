"""Upstream faults: the client gets 502/504, or a truncated response ended by closing its
connection — never a hang, never bytes meant for another client. (Refused connections, garbage
instead of a response and a slow first byte are in tests/inbound/test_errors.py.)"""

from __future__ import annotations

import socket
import subprocess
import time

from tests.hostile.helpers import (
    Conn,
    keepalive_ok,
    ok_response,
    parse_responses,
    proxy_process,
    read_all,
    scripted_upstream,
    status_of,
    tls_socket,
)
from tests.support import client_context, running_proxy, settings_for, wait_for

GET = b"GET /%s HTTP/1.1\r\nHost: localhost\r\n\r\n"


def _one(port, pki, target: bytes = b"a", timeout: float = 10) -> tuple[bytes, str]:
    with tls_socket(port, pki, timeout) as s:
        s.sendall(GET % target)
        return read_all(s, timeout)


def _get(port, pki, target: bytes) -> tuple[int, bytes]:
    """One request with Connection: close; (status, body)."""
    with tls_socket(port, pki) as s:
        s.sendall(b"GET /%s HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n" % target)
        data, _ = read_all(s)
    got = parse_responses(data)
    return got[0] if got else (0, data)


def test_upstream_resets_before_answering_gives_502(pki):
    def behaviour(conn: Conn) -> None:
        conn.read_request()
        conn.reset()

    with scripted_upstream(behaviour) as up, running_proxy(settings_for(pki, up.port)) as proxy:
        data, how = _one(proxy.port, pki)
        assert status_of(data) == 502 and how == "eof", data
        assert b"upstream failed" in data
        assert proxy.app.metrics.upstream_errors.labels("inbound", "reset")._value.get() >= 1


def test_upstream_closes_before_answering_gives_502(pki):
    def behaviour(conn: Conn) -> None:
        conn.read_request()
        conn.sock.close()

    with scripted_upstream(behaviour) as up, running_proxy(settings_for(pki, up.port)) as proxy:
        data, how = _one(proxy.port, pki)
        assert status_of(data) == 502, data
        assert how == "eof"


def test_upstream_resets_mid_response_truncates_and_closes(pki):
    def behaviour(conn: Conn) -> None:
        conn.read_request()
        conn.sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
        time.sleep(0.2)
        conn.reset()

    with scripted_upstream(behaviour) as up, running_proxy(settings_for(pki, up.port)) as proxy:
        t0 = time.monotonic()
        data, how = _one(proxy.port, pki)
        assert time.monotonic() - t0 < 5
        assert how == "eof", how
        head, _, body = data.partition(b"\r\n\r\n")
        assert status_of(head) == 200 and b"content-length: 100000" in head.lower()
        assert 0 < len(body) < 100000          # truncated: the client can tell from Content-Length
        assert proxy.app.metrics.upstream_errors.labels("inbound", "reset")._value.get() >= 1


def test_upstream_closes_mid_chunked_body_truncates_without_final_chunk(pki):
    def behaviour(conn: Conn) -> None:
        conn.read_request()
        conn.sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        time.sleep(0.2)
        conn.sock.close()

    with scripted_upstream(behaviour) as up, running_proxy(settings_for(pki, up.port)) as proxy:
        data, how = _one(proxy.port, pki)
        assert how == "eof"
        assert status_of(data) == 200
        assert b"hello" in data
        assert not data.endswith(b"0\r\n\r\n")   # no terminating chunk: the client sees truncation


def test_upstream_garbage_in_chunked_body_truncates_and_closes(pki):
    """Garbage after the head was forwarded: truncated, closed. Garbage in the very first read
    (nothing forwarded yet): a 502 instead of an empty reply."""

    def behaviour(conn: Conn) -> None:
        req = conn.read_request()
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        if req is not None and req.target == b"/later":
            conn.sock.sendall(head)
            time.sleep(0.3)
            conn.sock.sendall(b"ZZZ\r\n")
        else:
            conn.sock.sendall(head + b"ZZZ\r\n")
        time.sleep(2)

    with scripted_upstream(behaviour) as up, running_proxy(settings_for(pki, up.port)) as proxy:
        t0 = time.monotonic()
        data, how = _one(proxy.port, pki, b"later")
        assert how == "eof" and time.monotonic() - t0 < 2
        assert status_of(data) == 200 and b"hello" in data and not data.endswith(b"0\r\n\r\n")
        data, how = _one(proxy.port, pki, b"now")
        assert how == "eof" and time.monotonic() - t0 < 4
        assert status_of(data) == 502 and b"invalid response" in data, data
        assert proxy.app.metrics.upstream_errors.labels("inbound", "protocol")._value.get() == 2


def test_upstream_stalling_mid_body_is_cut_at_body_timeout(pki):
    def behaviour(conn: Conn) -> None:
        conn.read_request()
        conn.sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        time.sleep(5)

    with scripted_upstream(behaviour) as up, \
            running_proxy(settings_for(pki, up.port, body_timeout_s=0.5)) as proxy:
        t0 = time.monotonic()
        data, how = _one(proxy.port, pki)
        elapsed = time.monotonic() - t0
        assert how == "eof" and 0.4 < elapsed < 3, (how, elapsed)
        assert data.endswith(b"abc")
        assert proxy.app.metrics.upstream_errors.labels("inbound", "body_timeout")._value.get() == 1


def test_extra_bytes_after_a_response_never_reach_another_request(pki):
    """An app that answers one request twice (or lies in Content-Length) must not desynchronise
    the pool: the stray second answer must never be delivered as the answer to a later request."""

    def behaviour(conn: Conn) -> None:
        while True:
            req = conn.read_request()
            if req is None:
                return
            if req.target == b"/twice":
                conn.sock.sendall(ok_response(b"first") + ok_response(b"STRAY"))
            else:
                conn.sock.sendall(ok_response(req.target))

    with scripted_upstream(behaviour) as up, running_proxy(settings_for(pki, up.port)) as proxy:
        assert _get(proxy.port, pki, b"twice") == (200, b"first")
        for i in range(5):
            target = b"next%d" % i
            assert _get(proxy.port, pki, target) == (200, b"/" + target)


def test_stray_bytes_arriving_while_pooled_never_reach_another_request(pki):
    """The app writes an unsolicited response while the connection sits idle in the pool."""

    def behaviour(conn: Conn) -> None:
        req = conn.read_request()
        if req is None:
            return
        conn.sock.sendall(ok_response(req.target))
        time.sleep(0.3)
        conn.sock.sendall(ok_response(b"STRAY"))
        keepalive_ok(conn)

    with scripted_upstream(behaviour) as up, running_proxy(settings_for(pki, up.port)) as proxy:
        assert _get(proxy.port, pki, b"one") == (200, b"/one")
        time.sleep(0.6)
        assert _get(proxy.port, pki, b"two") == (200, b"/two")


def test_restarted_app_dead_pooled_connections_are_not_used(pki):
    """The app restarted: every pooled keep-alive connection is dead (FIN received while idle).
    The proxy notices before using one, so GET and POST alike reach the new app exactly once."""
    with scripted_upstream(keepalive_ok) as up:
        port = up.port
        with running_proxy(settings_for(pki, port)) as proxy:
            assert _get(proxy.port, pki, b"before") == (200, b"/before")
            up.stop()
            with scripted_upstream(keepalive_ok, port=port) as up2:
                assert _get(proxy.port, pki, b"after") == (200, b"/after")
                with tls_socket(proxy.port, pki) as s:
                    s.sendall(b"POST /post HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n"
                              b"Connection: close\r\n\r\nhello")
                    data, _ = read_all(s)
                assert parse_responses(data) == [(200, b"/post")]
                assert up2.requests == [b"/after", b"/post"]


def _closes_second_request(conn: Conn) -> None:
    """Keep-alive app that closes a reused connection right after reading its next request
    (the race RFC 9112 §9.3.1 warns about: the app's idle timeout fired as our request arrived)."""
    first = conn.read_request()
    if first is None:
        return
    conn.sock.sendall(ok_response(first.target))
    conn.read_request()
    conn.sock.close()


def test_idempotent_request_lost_on_a_reused_connection_is_retried_once(pki):
    with scripted_upstream(_closes_second_request) as up, \
            running_proxy(settings_for(pki, up.port)) as proxy:
        assert _get(proxy.port, pki, b"one") == (200, b"/one")
        assert _get(proxy.port, pki, b"two") == (200, b"/two")     # retried on a fresh connection
        assert up.requests == [b"/one", b"/two", b"/two"]
        assert up.connections == 2


def test_request_with_body_lost_on_a_reused_connection_is_not_retried(pki):
    with scripted_upstream(_closes_second_request) as up, \
            running_proxy(settings_for(pki, up.port)) as proxy:
        assert _get(proxy.port, pki, b"one") == (200, b"/one")
        with tls_socket(proxy.port, pki) as s:
            s.sendall(b"PUT /put HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nhello")
            data, _ = read_all(s)
        assert status_of(data) == 502, data
        assert up.requests == [b"/one", b"/put"]           # sent once, never replayed
        assert up.connections == 1


def test_non_idempotent_request_lost_on_a_reused_connection_is_not_retried(pki):
    with scripted_upstream(_closes_second_request) as up, \
            running_proxy(settings_for(pki, up.port)) as proxy:
        assert _get(proxy.port, pki, b"one") == (200, b"/one")
        with tls_socket(proxy.port, pki) as s:
            s.sendall(b"POST /post HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n")
            data, _ = read_all(s)
        assert status_of(data) == 502, data
        assert up.requests == [b"/one", b"/post"]
        assert up.connections == 1


def test_failed_request_is_never_answered_on_another_clients_connection(pki):
    """Two clients at once; the app resets one exchange. The other still gets exactly its own answer."""

    def behaviour(conn: Conn) -> None:
        while True:
            req = conn.read_request()
            if req is None:
                return
            if req.target == b"/boom":
                conn.sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\npartial")
                conn.reset()
                return
            time.sleep(0.05)
            conn.sock.sendall(ok_response(req.target))

    with scripted_upstream(behaviour) as up, running_proxy(settings_for(pki, up.port)) as proxy:
        for i in range(10):
            with tls_socket(proxy.port, pki) as a, tls_socket(proxy.port, pki) as b:
                a.sendall(GET % b"boom")
                b.sendall(GET % (b"mine%d" % i))
                data_b = b""
                deadline = time.monotonic() + 10
                while b"/mine" not in data_b and time.monotonic() < deadline:
                    chunk = b.recv(65536)
                    if not chunk:
                        break
                    data_b += chunk
                assert parse_responses(data_b) == [(200, b"/mine%d" % i)], data_b
                data_a, how = read_all(a)
                assert b"mine" not in data_a and how == "eof"


def test_slow_reader_is_cut_and_frees_its_slot(pki):
    """A client that requests a large body and never reads it must not hold the connection (and
    the upstream connection) forever: the send is bounded by the body timeout."""

    def behaviour(conn: Conn) -> None:
        conn.read_request()
        size = 64 << 20
        conn.sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        block = b"x" * (1 << 20)
        for _ in range(64):
            conn.sock.sendall(block)

    with scripted_upstream(behaviour) as up, \
            running_proxy(settings_for(pki, up.port, body_timeout_s=1.0)) as proxy:
        raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s = client_context(pki).wrap_socket(raw, server_hostname="localhost")
        s.sendall(GET % b"big")
        active = proxy.app.metrics.connections_active.labels("inbound", "http")
        assert wait_for(lambda: active.value == 1, 5)
        # never read: the proxy must give up within body_timeout (plus slack) and close
        assert wait_for(lambda: active.value == 0, 8), "slow reader held its connection"
        s.close()


def test_descriptor_exhaustion_is_logged_backed_off_and_recovers(pki):
    """``ulimit -n 64``: 100 clients that connect and say nothing exhaust the proxy's descriptors.
    accept() fails with EMFILE: logged, counted, retried with a capped backoff (not a busy loop,
    not a crash); once the clients go, the proxy serves again."""
    with scripted_upstream(keepalive_ok) as up, \
            proxy_process(pki, up.port, "--handshake-timeout", "60s", nofile=64) as proc:
        socks = [socket.create_connection(("127.0.0.1", proc.port), timeout=10) for _ in range(100)]
        try:
            assert wait_for(lambda: proc.count("accept failed; backing off") >= 3, 10)
            assert proc.fds() <= 64
            errors = [e for e in proc.events if e.get("event") == "accept failed; backing off"]
            assert errors[0]["level"] == "error" and errors[0]["error"] == "Too many open files"
            time.sleep(2)
            # capped exponential backoff: a handful of attempts in ~3 s, not thousands
            assert proc.count("accept failed; backing off") < 30
            assert proc.proc.poll() is None
        finally:
            for s in socks:
                s.close()
        t0 = time.monotonic()
        ok = False
        while time.monotonic() - t0 < 10 and not ok:
            r = subprocess.run(["curl", "-sS", "--max-time", "3", "--cacert", str(pki.ca_file),
                                f"https://localhost:{proc.port}/after"], capture_output=True, timeout=10)
            ok = r.stdout == b"/after"
        assert ok, r
        assert time.monotonic() - t0 < 5          # within one max backoff (1 s) plus slack
        assert proc.metric("tlsproxy_accept_errors_total", listener="inbound", error="EMFILE") >= 3
        assert wait_for(lambda: proc.fds() < 30, 10)
