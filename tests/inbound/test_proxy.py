"""The inbound core end to end: real TLS, real clients (curl, openssl, Python ssl), a real app."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess

from tests.support import curl, raw_exchange, running_proxy, settings_for, tls_connect


def test_curl_get_reaches_app_with_forwarded_headers(pki, app):
    with running_proxy(settings_for(pki, app.port)) as proxy:
        r = curl("--tlsv1.3", "--cacert", str(pki.ca_file), "-H", "X-Forwarded-For: 10.1.2.3",
                 "-H", "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                 f"{proxy.url}/hello?x=1")
        assert r.returncode == 0, r.stderr
        echo = json.loads(r.stdout)
        assert echo["path"] == "/hello?x=1"
        seen = app.seen[-1]
        assert seen.header("Host") == f"localhost:{proxy.port}"
        assert seen.header("X-Forwarded-For") == "10.1.2.3, 127.0.0.1"
        assert seen.header("X-Forwarded-Proto") == "https"
        assert seen.header("X-Forwarded-Host") == f"localhost:{proxy.port}"
        assert seen.header("X-Forwarded-Port") == str(proxy.port)
        assert len(seen.header("X-Request-Id")) == 32
        assert seen.header("traceparent") == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_request_id_passed_through(pki, app):
    with running_proxy(settings_for(pki, app.port)) as proxy:
        r = curl("--cacert", str(pki.ca_file), "-H", "X-Request-Id: my-id-42", f"{proxy.url}/")
        assert r.returncode == 0, r.stderr
        assert app.seen[-1].header("X-Request-Id") == "my-id-42"


def test_tls12_client_gets_protocol_version_alert(pki, app):
    with running_proxy(settings_for(pki, app.port)) as proxy:
        out = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{proxy.port}", "-tls1_2",
                              "-servername", "localhost"], input=b"", capture_output=True, timeout=20)
        text = (out.stdout + out.stderr).decode()
        assert "alert protocol version" in text, text
        # and TLS 1.3 works
        ok = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{proxy.port}", "-tls1_3",
                             "-CAfile", str(pki.ca_file), "-servername", "localhost", "-brief"],
                            input=b"", capture_output=True, timeout=20)
        assert b"Protocol version: TLSv1.3" in ok.stdout + ok.stderr


def test_tls12_opt_in(pki, app):
    with running_proxy(settings_for(pki, app.port, tls_min_version="1.2")) as proxy:
        r = curl("--tlsv1.2", "--tls-max", "1.2", "--cacert", str(pki.ca_file), f"{proxy.url}/")
        assert r.returncode == 0, r.stderr


def _alpn(port: int, pki, offer: list[str]) -> str | None:
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    ctx.set_alpn_protocols(offer)
    with socket.create_connection(("127.0.0.1", port)) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as s:
        return s.selected_alpn_protocol()


def test_alpn_offers_h2_and_http11_by_default(pki, app):
    with running_proxy(settings_for(pki, app.port)) as proxy:
        assert _alpn(proxy.port, pki, ["h2", "http/1.1"]) == "h2"
        assert _alpn(proxy.port, pki, ["http/1.1"]) == "http/1.1"


def test_alpn_narrowed_to_http11_turns_h2_off(pki, app):
    with running_proxy(settings_for(pki, app.port, alpn=("http/1.1",))) as proxy:
        assert _alpn(proxy.port, pki, ["h2", "http/1.1"]) == "http/1.1"
        assert _alpn(proxy.port, pki, ["h2"]) is None


def test_keepalive_and_pipelining(pki, app):
    with running_proxy(settings_for(pki, app.port)) as proxy:
        reqs = b"".join(b"GET /p%d HTTP/1.1\r\nHost: localhost\r\n\r\n" % i for i in range(20))
        reqs += b"GET /last HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        data = raw_exchange(proxy.port, pki, reqs)
        assert data.count(b"HTTP/1.1 200 OK") == 21
        paths = [json.loads(part.split(b"\r\n\r\n", 1)[1].split(b"HTTP/1.1")[0])["path"]
                 for part in data.split(b"HTTP/1.1 200 OK")[1:]]
        assert paths == [f"/p{i}" for i in range(20)] + ["/last"]
        registry = proxy.app.metrics.registry
        assert registry.get_sample_value("tlsproxy_connections_total",
                                         {"listener": "inbound", "protocol": "http"}) == 1
        assert registry.get_sample_value("tlsproxy_requests_total",
                                         {"listener": "inbound", "code_class": "2xx"}) == 21
        assert registry.get_sample_value("tlsproxy_request_duration_seconds_count",
                                         {"listener": "inbound"}) == 21


def test_next_request_already_waiting_in_its_own_record_is_served(pki, app):
    """After a response the proxy waits for readability before reading (no read that can only
    fail): a next request that is already in the socket, in a TLS record of its own, must still be
    read at once, and one that OpenSSL already decrypted must not be waited for."""
    with running_proxy(settings_for(pki, app.port)) as proxy, tls_connect(proxy.port, pki, timeout=5) as s:
        for i in range(5):
            s.sendall(b"GET /a%d HTTP/1.1\r\nHost: localhost\r\n\r\n" % i)   # one record each
            s.sendall(b"GET /b%d HTTP/1.1\r\nHost: localhost\r\n\r\n" % i)   # before reading /a
            data = b""
            while data.count(b"HTTP/1.1 200 OK") < 2 or not data.endswith(b"}"):
                chunk = s.recv(65536)      # a lost request would end this with a timeout (5 s)
                assert chunk, data
                data += chunk
            paths = [json.loads(part.split(b"\r\n\r\n", 1)[1])["path"]
                     for part in data.split(b"HTTP/1.1 200 OK")[1:]]
            assert paths == [f"/a{i}", f"/b{i}"]


def test_upstream_connections_are_reused(pki, app):
    with running_proxy(settings_for(pki, app.port)) as proxy:
        for _ in range(5):
            r = curl("--cacert", str(pki.ca_file), f"{proxy.url}/x")
            assert r.returncode == 0
        ports = {s.header("X-Forwarded-Port") for s in app.seen}
        assert ports == {str(proxy.port)}
        # one pooled connection served all five requests (five separate client connections)
        assert proxy.call(lambda: None) is None


def test_hop_by_hop_headers_removed(pki, app):
    with running_proxy(settings_for(pki, app.port)) as proxy:
        req = (b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: keep-alive, X-Secret\r\n"
               b"X-Secret: drop-me\r\nKeep-Alive: timeout=5\r\nTE: gzip\r\nX-Keep: yes\r\n"
               b"X-Forwarded-Client-Cert: Hash=spoofed\r\nClient-Cert: :AAAA:\r\n"
               b"Proxy-Authorization: Basic eA==\r\nConnection: close\r\n\r\n")
        data = raw_exchange(proxy.port, pki, req)
        assert b"200 OK" in data
        seen = app.seen[-1]
        names = {k.lower() for k, _ in seen.headers}
        for gone in ("x-secret", "keep-alive", "te", "x-forwarded-client-cert", "client-cert",
                     "proxy-authorization"):
            assert gone not in names
        assert seen.header("X-Keep") == "yes"
        # and the response's hop-by-hop headers are not passed to the client
        head = data.split(b"\r\n\r\n")[0].lower()
        assert b"keep-alive: timeout" not in head


def test_head_and_bodyless_statuses(pki, app):
    with running_proxy(settings_for(pki, app.port)) as proxy:
        r = curl("--cacert", str(pki.ca_file), "-I", f"{proxy.url}/bytes/1000")
        assert r.returncode == 0
        assert b"content-length: 1000" in r.stdout.lower()
        for code in (204, 304):
            r = curl("--cacert", str(pki.ca_file), "-o", "/dev/null", "-w", "%{http_code}",
                     f"{proxy.url}/status/{code}")
            assert r.stdout.decode() == str(code)


def test_expect_100_continue(pki, app):
    with running_proxy(settings_for(pki, app.port)) as proxy:
        body = b"a" * 200_000
        p = subprocess.run(["curl", "-sS", "-v", "--http1.1", "--cacert", str(pki.ca_file),
                            "-H", "Expect: 100-continue", "--expect100-timeout", "10",
                            "--data-binary", "@-", f"{proxy.url}/upload"],
                           input=body, capture_output=True, timeout=30)
        assert p.returncode == 0, p.stderr
        assert b"HTTP/1.1 100 Continue" in p.stderr
        assert json.loads(p.stdout)["body_len"] == len(body)
        # the expectation is the app's to answer (issue 15): its own 100 came back through the proxy
        assert app.seen[-1].header("Expect") == "100-continue"


def test_chunked_upload_is_streamed(pki, app):
    with running_proxy(settings_for(pki, app.port)) as proxy:
        body = b"z" * 3_000_000
        p = subprocess.run(["curl", "-sS", "--cacert", str(pki.ca_file), "-H", "Transfer-Encoding: chunked",
                            "--data-binary", "@-", f"{proxy.url}/chunked"], input=body, capture_output=True,
                           timeout=30)
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["body_len"] == len(body)


def test_large_download(pki, app):
    with running_proxy(settings_for(pki, app.port)) as proxy:
        r = curl("--cacert", str(pki.ca_file), "-o", "/dev/null", "-w", "%{size_download}",
                 f"{proxy.url}/bytes/{64 << 20}", timeout=60)
        assert r.returncode == 0, r.stderr
        assert int(r.stdout) == 64 << 20


def test_ipv6_listener_and_upstream(pki, app):
    import http.server
    import threading

    from tlsproxy.config import HostPort, Upstream

    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"v6")

        def log_message(self, *a):
            pass

    class V6(http.server.HTTPServer):
        address_family = socket.AF_INET6

    srv = V6(("::1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        s = settings_for(pki, app.port, listen=HostPort("::1", 0),
                         upstream=Upstream("http", "::1", srv.server_address[1]))
        with running_proxy(s) as proxy:
            r = curl("--cacert", str(pki.ca_file), f"https://[::1]:{proxy.port}/")
            assert r.returncode == 0, r.stderr
            assert r.stdout == b"v6"
    finally:
        srv.shutdown()
        srv.server_close()


def test_python_ssl_client_with_session_tickets_off(pki, app):
    with running_proxy(settings_for(pki, app.port, tls_session_tickets=0)) as proxy:
        s = tls_connect(proxy.port, pki)
        s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        s.close()
        assert data.startswith(b"HTTP/1.1 200")
