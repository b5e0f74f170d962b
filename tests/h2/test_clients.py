"""Real HTTP/2 clients over TLS through the proxy: curl, nghttp, h2load, httpx, Node's http2."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.h2.helpers import H2Client, fast_app, proxy_process
from tests.hostile.helpers import scripted_upstream
from tests.support import captured_logs, curl, make_pki, running_proxy, settings_for, wait_for

MiB = 1 << 20
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_curl_negotiates_h2_and_the_app_sees_the_engine_headers(pki, app):
    with running_proxy(settings_for(pki, app.port)) as proxy, captured_logs("tlsproxy.access") as logs:
        r = curl("--http2", "-sS", "-w", "\n%{http_version}", "--cacert", str(pki.ca_file),
                 "-H", "cookie: a=1", "-H", "cookie: b=2", "-H", "x-request-id: abc-123",
                 "-H", "x-forwarded-for: 10.9.9.9", "-H", "x-forwarded-client-cert: spoofed",
                 f"{proxy.url}/hello?q=1")
        # the line is written as the stream's task ends, which may be just after curl exits
        assert wait_for(lambda: any(rec.getMessage() == "request" for rec in logs), 5)
    assert r.returncode == 0, r.stderr
    body, _, version = r.stdout.rpartition(b"\n")
    assert version == b"2"
    seen = json.loads(body)
    h = {k.lower(): v for k, v in seen["headers"].items()}
    assert seen["method"] == "GET" and seen["path"] == "/hello?q=1"
    assert h["host"] == f"localhost:{proxy.port}"
    assert h["cookie"] == "a=1; b=2"                     # RFC 9113 §8.2.3
    assert h["x-request-id"] == "abc-123"
    assert h["x-forwarded-for"] == "10.9.9.9, 127.0.0.1"
    assert h["x-forwarded-proto"] == "https"
    assert "x-forwarded-client-cert" not in h            # never from the client
    assert not {"connection", "transfer-encoding", "te", "upgrade"} & set(h)
    fields = [rec.fields for rec in logs if rec.getMessage() == "request"][-1]
    assert (fields["status"], fields["path"], fields["protocol"]) == (200, "/hello?q=1", "h2")
    assert fields["request_id"] == "abc-123"


def test_64_mib_each_way_with_curl_sha256(pki, app):
    size = 64 * MiB
    with running_proxy(settings_for(pki, app.port)) as proxy:
        r = curl("--http2", "-sS", "--cacert", str(pki.ca_file), f"{proxy.url}/bytes/{size}", timeout=120)
        assert r.returncode == 0, r.stderr
        assert hashlib.sha256(r.stdout).hexdigest() == hashlib.sha256(b"x" * size).hexdigest()
        upload = bytes(range(256)) * (size // 256)
        p = subprocess.run(["curl", "--http2", "-sS", "--cacert", str(pki.ca_file), "--data-binary", "@-",
                            f"{proxy.url}/sha256"], input=upload, capture_output=True, timeout=120)
        assert p.returncode == 0, p.stderr
        assert p.stdout.decode() == hashlib.sha256(upload).hexdigest()


def test_64_mib_each_way_with_nghttp_sha256(pki, app, tmp_path):
    size = 64 * MiB
    upload = tmp_path / "up.bin"
    upload.write_bytes(bytes(range(251)) * (size // 251))
    with running_proxy(settings_for(pki, app.port)) as proxy:
        url = f"https://localhost:{proxy.port}"
        # nghttp does not verify certificates: what it tests is the protocol, the bytes below
        p = subprocess.run(["nghttp", f"{url}/bytes/{size}"], capture_output=True, timeout=120)
        assert p.returncode == 0, p.stderr
        assert hashlib.sha256(p.stdout).hexdigest() == hashlib.sha256(b"x" * size).hexdigest()
        p = subprocess.run(["nghttp", "-d", str(upload), f"{url}/sha256"], capture_output=True, timeout=120)
        assert p.returncode == 0, p.stderr
        assert p.stdout.decode() == hashlib.sha256(upload.read_bytes()).hexdigest()


def test_h2load_100000_requests_zero_errors(pki):
    with fast_app() as app, proxy_process(pki, app.url, "--access-log", "off") as proxy:
        p = subprocess.run(["h2load", "-c", "10", "-m", "10", "-n", "100000", "-T", "30",
                            f"https://localhost:{proxy.port}/"], capture_output=True, timeout=300)
    out = p.stdout.decode()
    assert p.returncode == 0, out + p.stderr.decode()
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                  r"(\d+) errored, (\d+) timeout", out)
    assert m, out
    total, _started, done, ok, failed, errored, timeout = map(int, m.groups())
    assert (total, done, ok, failed, errored, timeout) == (100000, 100000, 100000, 0, 0, 0), out
    assert "status codes: 100000 2xx" in out, out


def test_httpx_http2(pki, app):
    verify = ssl.create_default_context(cafile=str(pki.ca_file))
    with running_proxy(settings_for(pki, app.port)) as proxy, \
            httpx.Client(http2=True, verify=verify, timeout=10) as client:
        r = client.get(f"{proxy.url}/x")
        assert r.http_version == "HTTP/2"
        assert r.status_code == 200 and r.json()["path"] == "/x"
        r = client.post(f"{proxy.url}/sha256", content=b"abc" * 100_000)
        assert r.text == hashlib.sha256(b"abc" * 100_000).hexdigest()
        r = client.get(f"{proxy.url}/status/404")
        assert r.status_code == 404
        assert client.get(f"{proxy.url}/bytes/10").content == b"x" * 10


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_node_http2(pki, app):
    with running_proxy(settings_for(pki, app.port)) as proxy:
        p = subprocess.run(["node", str(HERE / "node_h2_client.js"), f"https://localhost:{proxy.port}",
                            str(pki.ca_file)], capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr.decode() + p.stdout.decode()
    result = json.loads(p.stdout)
    assert result["alpn"] == "h2"
    assert result["get"]["status"] == 200 and json.loads(result["get"]["body"])["path"] == "/node"
    assert result["post"]["body"] == hashlib.sha256(b"n" * 300_000).hexdigest()


def _trailer_app(conn) -> None:
    conn.read_request(timeout=10)
    conn.sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: grpc-status\r\n\r\n"
                      b"5\r\nhello\r\n0\r\ngrpc-status: 0\r\nx-checksum: 42\r\n\r\n")


def test_response_trailers_reach_the_h2_client(pki):
    with scripted_upstream(_trailer_app) as up, running_proxy(settings_for(pki, up.port)) as proxy:
        client = H2Client(proxy.port, pki)
        try:
            status, body, trailers = client.get("/t")
        finally:
            client.close()
    assert (status, body) == (200, b"hello")
    assert trailers == {b"grpc-status": b"0", b"x-checksum": b"42"}


def test_grpc_towards_an_http11_upstream_is_a_clear_grpc_error(pki, app):
    with running_proxy(settings_for(pki, app.port)) as proxy:
        r = subprocess.run(["curl", "--http2", "-sS", "-D-", "-o", "/dev/null", "--cacert", str(pki.ca_file),
                            "-H", "content-type: application/grpc", "-H", "te: trailers",
                            "--data-binary", "@-", f"{proxy.url}/pkg.Svc/Call"],
                           input=b"\x00\x00\x00\x00\x00", capture_output=True, timeout=20)
    assert r.returncode == 0, r.stderr
    head = r.stdout.decode().lower()
    assert "http/2 200" in head and "grpc-status: 14" in head and "grpc-message: tlsproxy" in head
    assert not app.seen                        # nothing went upstream


def test_errors_are_answered_on_the_stream_and_the_connection_lives(pki, app):
    with running_proxy(settings_for(pki, app.port, max_body_bytes=1000)) as proxy:
        client = H2Client(proxy.port, pki)
        try:
            sid = client.headers("/big", "POST", [(b"content-length", b"5000")], end=False)
            status, body, _ = client.response(sid)
            assert status == 413 and b"larger than 1000" in body
            assert client.get("/after")[0] == 200       # same connection, next stream
        finally:
            client.close()


def test_request_trailers_go_upstream_chunked(pki):
    raw: list[bytes] = []

    def app(conn) -> None:
        conn.sink = bytearray()
        conn.read_request(timeout=10)
        raw.append(bytes(conn.sink))
        conn.sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    with scripted_upstream(app) as up, running_proxy(settings_for(pki, up.port)) as proxy:
        client = H2Client(proxy.port, pki)
        try:
            sid = client.headers("/up", "POST", [(b"te", b"trailers")], end=False)
            client.conn.send_data(sid, b"hello")
            client.conn.send_headers(sid, [(b"x-checksum", b"42")], end_stream=True)
            client.flush()
            status, body, _ = client.response(sid)
        finally:
            client.close()
    assert (status, body) == (200, b"ok")
    wire = raw[0].lower()
    assert b"transfer-encoding: chunked\r\n" in wire and b"te: trailers\r\n" in wire
    assert wire.endswith(b"5\r\nhello\r\n0\r\nx-checksum: 42\r\n\r\n"), wire
