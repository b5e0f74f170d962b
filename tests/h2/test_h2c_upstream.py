"""``--upstream h2c://``: HTTP/1.1 clients over TLS in front of real HTTP/2 apps — hypercorn (tests/h2/
asgi_app.py) for what apps do, a scripted h2 app (tests/h2/scripted_app.py) for what they should not."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.h2.asgi_app import BLOCK, pattern
from tests.h2.grpc_apps import UNARY, EchoApp
from tests.h2.scripted_app import ScriptedApp
from tests.h2.support import h2c_settings, hypercorn_app
from tests.support import client_context, curl, raw_exchange, running_proxy

MIB = 1024 * 1024


def _get(proxy, pki, path: str, *extra: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return curl("--http1.1", "--cacert", str(pki.ca_file), "-w", "\n%{http_code}", *extra,
                f"{proxy.url}{path}", timeout=timeout)


def _split(r: subprocess.CompletedProcess) -> tuple[bytes, int]:
    body, _, code = r.stdout.rpartition(b"\n")
    return body, int(code or 0)


def _open_connections(proxy) -> float:
    return proxy.app.metrics.registry.get_sample_value("tlsproxy_upstream_h2_connections")


def test_get_reaches_h2c_app_with_forwarded_headers(pki):
    with hypercorn_app() as app, running_proxy(h2c_settings(pki, app.port)) as proxy:
        body, code = _split(_get(proxy, pki, "/conn", "-H", "X-Request-Id: h2c-1"))
        assert code == 200
        seen = json.loads(body)
        assert seen["http_version"] == "2"
        headers = dict(seen["headers"])
        assert headers["x-forwarded-proto"] == "https"
        assert headers["x-request-id"] == "h2c-1"
        assert headers["host"] == f"localhost:{proxy.port}"       # from :authority
        assert "connection" not in headers and "transfer-encoding" not in headers
        body, code = _split(_get(proxy, pki, "/bytes/100000"))
        assert code == 200 and body == pattern(100000)
        body, code = _split(_get(proxy, pki, "/nowhere"))
        assert code == 404 and body == b"no such route"


@pytest.mark.slow
def test_64_mib_each_way_checked_by_sha256(pki, tmp_path):
    size = 64 * MIB
    upload = tmp_path / "up.bin"
    with open(upload, "wb") as f:
        for i in range(size // MIB):
            f.write(hashlib.sha256(b"%d" % i).digest() * (MIB // 32))
    want_up = hashlib.sha256(upload.read_bytes()).hexdigest()
    with hypercorn_app() as app, running_proxy(h2c_settings(pki, app.port)) as proxy:
        down = tmp_path / "down.bin"
        r = curl("--http1.1", "--cacert", str(pki.ca_file), "-o", str(down), f"{proxy.url}/bytes/{size}",
                 timeout=120)
        assert r.returncode == 0, r.stderr
        h = hashlib.sha256()
        for _i in range(size // len(BLOCK)):
            h.update(BLOCK)
        assert os.path.getsize(down) == size
        assert hashlib.sha256(down.read_bytes()).hexdigest() == h.hexdigest()
        echoed = tmp_path / "echo.bin"     # curl sends Expect: 100-continue: the proxy answers it itself
        r = curl("--http1.1", "--cacert", str(pki.ca_file), "-H", "Content-Type: application/octet-stream",
                 "--data-binary", f"@{upload}", "-o", str(echoed), f"{proxy.url}/echo", timeout=120)
        assert r.returncode == 0, r.stderr
        assert hashlib.sha256(echoed.read_bytes()).hexdigest() == want_up
        # chunked upload (no Content-Length): streamed the same way
        r = curl("--http1.1", "--cacert", str(pki.ca_file), "-H", "Transfer-Encoding: chunked",
                 "--data-binary", f"@{upload}", "-o", str(echoed), f"{proxy.url}/echo", timeout=120)
        assert r.returncode == 0, r.stderr
        assert hashlib.sha256(echoed.read_bytes()).hexdigest() == want_up


def test_echo_streams_both_ways(pki):
    """The app's first bytes reach the client before the request body ended."""
    with hypercorn_app() as app, running_proxy(h2c_settings(pki, app.port)) as proxy:
        s = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        with client_context(pki).wrap_socket(s, server_hostname="localhost") as tls:
            tls.sendall(b"POST /echo HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"5\r\nfirst\r\n")
            got = b""
            while b"first" not in got:
                chunk = tls.recv(65536)
                assert chunk, got
                got += chunk
            assert got.startswith(b"HTTP/1.1 200 ")
            tls.sendall(b"6\r\nsecond\r\n0\r\n\r\n")
            while not got.endswith(b"0\r\n\r\n"):
                chunk = tls.recv(65536)
                assert chunk, got
                got += chunk
            assert b"second" in got


def test_trailers_reach_a_client_that_asked(pki):
    with hypercorn_app() as app, running_proxy(h2c_settings(pki, app.port)) as proxy:
        data = raw_exchange(proxy.port, pki, b"GET /trailers HTTP/1.1\r\nHost: localhost\r\nTE: trailers\r\n"
                            b"Connection: close\r\n\r\n")
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and b"transfer-encoding: chunked" in head.lower()
        assert body.endswith(b"0\r\nx-checksum: sha256-abc\r\nx-status: done\r\n\r\n"), body
        assert b"hello " in body and b"trailers" in body
        # without TE: trailers the app is not asked for them (and none reach the client)
        data = raw_exchange(proxy.port, pki, b"GET /trailers HTTP/1.1\r\nHost: localhost\r\n"
                            b"Connection: close\r\n\r\n")
        assert b"x-checksum" not in data and b"hello " in data


def test_request_trailers_reach_the_app(pki):
    with ScriptedApp() as app, running_proxy(h2c_settings(pki, app.port)) as proxy:
        data = raw_exchange(proxy.port, pki, b"POST /trailers-in HTTP/1.1\r\nHost: localhost\r\n"
                            b"Transfer-Encoding: chunked\r\nTE: trailers\r\nConnection: close\r\n\r\n"
                            b"5\r\nhello\r\n0\r\nx-sum: 42\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 200 "), data
        seen = json.loads(data.partition(b"\r\n\r\n")[2])
        assert seen == {"body": 5, "trailers": {"x-sum": "42"}}


def test_many_concurrent_requests_share_few_connections(pki):
    n = 150        # hypercorn allows 100 streams per connection: two connections are enough
    with hypercorn_app() as app, running_proxy(h2c_settings(pki, app.port)) as proxy:
        def one(_i: int) -> tuple:
            data = raw_exchange(proxy.port, pki, b"GET /hold/%d HTTP/1.1\r\nHost: localhost\r\n"
                                b"Connection: close\r\n\r\n" % n, timeout=30)
            assert data.startswith(b"HTTP/1.1 200 "), data[:200]
            seen = json.loads(data.partition(b"\r\n\r\n")[2])
            assert seen["held"] >= n                 # all 150 were in flight at once
            return tuple(seen["client"])

        with ThreadPoolExecutor(n) as ex:
            clients = set(ex.map(one, range(n)))
        assert len(clients) == 2, clients          # the app saw two connections for 150 requests
        reg = proxy.app.metrics.registry
        assert reg.get_sample_value("tlsproxy_upstream_h2_connections") == 2
        assert reg.get_sample_value("tlsproxy_upstream_h2_streams") == 0


def test_slow_app_stream_does_not_stall_another(pki):
    with hypercorn_app() as app, running_proxy(h2c_settings(pki, app.port)) as proxy:
        slow = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        with client_context(pki).wrap_socket(slow, server_hostname="localhost") as tls:
            tls.sendall(b"GET /slow HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert b"tick" in tls.recv(65536) or b"tick" in tls.recv(65536)
            t0 = time.monotonic()
            body, code = _split(_get(proxy, pki, "/bytes/4000000"))
            assert code == 200 and body == pattern(4000000)
            assert time.monotonic() - t0 < 4
            assert _open_connections(proxy) == 1        # the same connection carried both


def test_slow_client_does_not_stall_another_stream(pki):
    """A client that stops reading a large response holds its own stream's window only."""
    with hypercorn_app() as app, running_proxy(h2c_settings(pki, app.port)) as proxy:
        slow = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        with client_context(pki).wrap_socket(slow, server_hostname="localhost") as tls:
            tls.sendall(b"GET /bytes/%d HTTP/1.1\r\nHost: localhost\r\n\r\n" % (256 * MIB))
            assert tls.recv(100).startswith(b"HTTP/1.1 200")
            time.sleep(1)                             # the slow stream's window fills
            t0 = time.monotonic()
            for _ in range(3):
                body, code = _split(_get(proxy, pki, "/bytes/8000000"))
                assert code == 200 and len(body) == 8000000
            assert time.monotonic() - t0 < 10
            assert _open_connections(proxy) == 1


def test_goaway_before_serving_is_retried_on_a_new_connection(pki):
    with ScriptedApp() as app, running_proxy(h2c_settings(pki, app.port)) as proxy:
        body, code = _split(_get(proxy, pki, "/ok"))          # the pool's first connection
        assert code == 200 and body == b"ok"
        body, code = _split(_get(proxy, pki, "/goaway-once"))
        assert code == 200 and body == b"ok", body            # refused unserved: retried elsewhere
        assert app.goaways == 1 and app.connections == 2
        body, code = _split(_get(proxy, pki, "/ok"))          # the new connection serves the next
        assert code == 200 and body == b"ok" and app.connections == 2


def test_goaway_refused_stream_gets_502_never_a_hang(pki):
    with ScriptedApp() as app, running_proxy(h2c_settings(pki, app.port)) as proxy:
        body, code = _split(_get(proxy, pki, "/ok"))
        assert code == 200
        t0 = time.monotonic()
        body, code = _split(_get(proxy, pki, "/goaway"))
        assert code == 502, body
        assert b"GOAWAY" in body
        body, code = _split(_get(proxy, pki, "/goaway", "-X", "POST", "-d", "x"))
        assert code == 502, body
        assert time.monotonic() - t0 < 5
        body, code = _split(_get(proxy, pki, "/ok"))
        assert code == 200
        assert app.goaways >= 2
        reg = proxy.app.metrics.registry
        closed = sum(reg.get_sample_value("tlsproxy_upstream_h2_connections_closed_total", {"reason": r}) or 0
                     for r in ("goaway", "closed"))
        assert closed >= 2


def test_app_dying_mid_stream_closes_the_response(pki):
    with ScriptedApp() as app, running_proxy(h2c_settings(pki, app.port)) as proxy:
        t0 = time.monotonic()
        r = _get(proxy, pki, "/die")
        assert r.returncode == 18, (r.returncode, r.stderr)     # curl: transfer closed with data left
        assert time.monotonic() - t0 < 5
        body, code = _split(_get(proxy, pki, "/reset"))
        assert code == 502 and b"reset the stream" in body
        body, code = _split(_get(proxy, pki, "/ok"))
        assert code == 200


def test_early_answer_before_the_body_reaches_the_client(pki, tmp_path):
    # under the engine's 1 MiB discard bound: the proxy reads and drops the rest of the body and
    # the client reads the answer (a larger body is cut with a close, and curl may then report its
    # send failure instead of the answer: the same for any upstream, see docs/errors.md)
    upload = tmp_path / "up.bin"
    upload.write_bytes(b"u" * (512 * 1024))
    with ScriptedApp() as app, running_proxy(h2c_settings(pki, app.port)) as proxy:
        t0 = time.monotonic()
        body, code = _split(_get(proxy, pki, "/early", "--data-binary", f"@{upload}"))
        assert code == 403 and body == b"no"
        assert time.monotonic() - t0 < 5
        body, code = _split(_get(proxy, pki, "/ok"))                # the connection still serves
        assert code == 200 and app.connections == 1


def test_app_that_never_answers_gets_504(pki):
    with ScriptedApp() as app, running_proxy(h2c_settings(pki, app.port, upstream_response_timeout_s=1.0)) \
            as proxy:
        body, code = _split(_get(proxy, pki, "/silent"))
        assert code == 504, body
        body, code = _split(_get(proxy, pki, "/ok"))           # the connection still serves others
        assert code == 200 and app.connections == 1


def test_app_killed_gives_502_then_recovers(pki):
    with hypercorn_app() as app, running_proxy(h2c_settings(pki, app.port)) as proxy:
        body, code = _split(_get(proxy, pki, "/bytes/10"))
        assert code == 200
        app.kill()
        body, code = _split(_get(proxy, pki, "/bytes/10"))
        assert code == 502, body
        assert b"upstream" in body


def test_http11_app_behind_h2c_is_a_clear_502(pki, app):
    with running_proxy(h2c_settings(pki, app.port)) as proxy:
        body, code = _split(_get(proxy, pki, "/"))
        assert code == 502, body
        assert b"does not speak HTTP/2" in body and b"SETTINGS" in body


def test_websocket_upgrade_to_h2c_upstream_is_refused(pki):
    with hypercorn_app() as app, running_proxy(h2c_settings(pki, app.port)) as proxy:
        ws = ("-H", "Connection: Upgrade", "-H", "Upgrade: websocket", "-H", "Sec-WebSocket-Version: 13",
              "-H", "Sec-WebSocket-Key: dGhlIHNhbXBsZQ==")
        body, code = _split(_get(proxy, pki, "/conn", *ws))
        assert code == 502 and b"upgrade" in body
        # with a body the Upgrade is ignored (RFC 9110 section 7.8): an ordinary request
        body, code = _split(_get(proxy, pki, "/echo", "-H", "Connection: Upgrade", "-H", "Upgrade: h2c",
                                 "--data-binary", "payload"))
        assert code == 200 and body == b"payload"




def _grpc_frame(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


def _dechunk(body: bytes) -> tuple[bytes, bytes]:
    """(data, trailer section) of a chunked body."""
    data = b""
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return data, body
        data, body = data + body[:size], body[size + 2:]


def test_grpc_app_behind_h2c_answers_an_http11_client_with_trailers(pki, tmp_path):
    """A gRPC call written by hand over HTTP/1.1 (chunked, TE: trailers) reaches grpcio's server
    over h2c; grpc-status comes back as a chunked trailer, the client's identity as XFCC."""
    client = pki.issue("front", client=True, server=False, uris=("spiffe://cluster.local/ns/shop/sa/front",))
    cert, key = tmp_path / "c.crt", tmp_path / "c.key"
    cert.write_bytes(client.cert_pem)
    key.write_bytes(client.key_pem)
    with EchoApp() as app, running_proxy(h2c_settings(pki, app.port, client_ca=pki.ca_file)) as proxy:
        for message, status in ((b"hello grpc", b"0"), (b"fail", b"3")):
            body = _grpc_frame(message)
            request = (b"POST %s HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/grpc\r\n"
                       b"TE: trailers\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                       % (UNARY.encode(), len(body), body))
            ctx = client_context(pki)
            ctx.load_cert_chain(str(cert), str(key))
            raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(request)
                data = b""
                while chunk := tls.recv(65536):
                    data += chunk
            head, _, rest = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 "), data
            assert b"content-type: application/grpc" in head.lower()
            payload, trailers = _dechunk(rest)
            assert b"grpc-status: " + status in trailers, trailers
            if status == b"0":
                assert payload == _grpc_frame(message)
                assert b"seen-xfcc: " in head.lower()
                assert b"URI=spiffe://cluster.local/ns/shop/sa/front" in head
            else:
                assert b"grpc-message: the app refused this message" in trailers
        assert len(app.seen) == 2
        for method, metadata in app.seen:
            assert method == UNARY
            assert "URI=spiffe://cluster.local/ns/shop/sa/front" in metadata["x-forwarded-client-cert"]


def test_drain_lets_streams_in_flight_finish(pki):
    with hypercorn_app() as app:
        proxy = running_proxy(h2c_settings(pki, app.port, drain_timeout_s=10.0))
        with proxy as p:
            with ThreadPoolExecutor(1) as ex:
                request = b"GET /sleep/1000 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
                pending = ex.submit(raw_exchange, p.port, pki, request, 15)
                time.sleep(0.4)
                t0 = time.monotonic()
                p.stop()                                   # SIGTERM's drain, in this thread
                assert time.monotonic() - t0 < 5
                data = pending.result(15)
            assert data.startswith(b"HTTP/1.1 200 "), data[:200]
            reg = p.app.metrics.registry
            closed = reg.get_sample_value("tlsproxy_upstream_h2_connections_closed_total",
                                          {"reason": "drain"})
            assert closed == 1                             # closed with a GOAWAY once its stream ended
