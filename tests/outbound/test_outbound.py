"""Outbound end to end: plain HTTP in, verified TLS 1.3 out, through real proxies and real certificates.

app A (a plain HTTP client) → tlsproxy A (outbound) → tlsproxy B (inbound, mTLS) → app B.
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import socket
import time

import pytest

from tests.outbound.peer import tls_peer
from tests.support import running_proxy, settings_for, wait_for
from tlsproxy.certs import generate
from tlsproxy.config import HostPort, Settings, parse_mapping


def get(port: int, path: str = "/", *, method: str = "GET", body: bytes | None = None,
        headers: dict | None = None, timeout: float = 15) -> tuple[int, bytes, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read(), dict(resp.getheaders())
    finally:
        conn.close()


def outbound_only(tmp_path, **changes) -> Settings:
    """Proxy A: its own inbound side is irrelevant here (a throwaway certificate, any port)."""
    ca = generate.make_ca("A's own CA")
    leaf = generate.issue(ca, "a.local", dns=("a.local",))
    d = tmp_path / "a-server"
    d.mkdir(parents=True, exist_ok=True)
    (d / "tls.crt").write_bytes(leaf.cert_pem)
    (d / "tls.key").write_bytes(leaf.key_pem)
    base = Settings(listen=HostPort("127.0.0.1", 0), admin=HostPort("127.0.0.1", 0), cert_dir=d,
                    log_format="text", drain_delay_s=0.0)
    return base.replace(**changes)


def route(**kw) -> tuple:
    return parse_mapping({"listen": "127.0.0.1:0", **kw})


def client_dir(pki, tmp_path, name: str = "app-a", uri: str = "spiffe://cluster.local/ns/a/sa/app-a"):
    issued = pki.issue(name, uris=(uri,), server=False, client=True)
    return pki.write_pair(tmp_path / f"client-{name}", issued)


# ---------------------------------------------------------------------------- the chain

def test_chain_app_a_to_app_b_with_client_certificate(pki, app, tmp_path):
    cdir = client_dir(pki, tmp_path)
    b_settings = settings_for(pki, app.port, client_ca=pki.ca_file, drain_delay_s=0.0)
    with running_proxy(b_settings) as b:
        a_settings = outbound_only(tmp_path, outbound=(f"127.0.0.1:0=https://localhost:{b.port}",),
                                   outbound_ca=pki.ca_file, outbound_cert_dir=cdir)
        with running_proxy(a_settings) as a:
            port = a.app.bound.extra["outbound/0"].port
            status, body, _ = get(port, "/hello?x=1", headers={"Host": "whatever.local"})
            assert status == 200, body
            seen = json.loads(body)
            assert seen["path"] == "/hello?x=1"
            # Host was rewritten to the peer's authority (B then passed it on to app B)
            assert seen["headers"]["Host"] == f"localhost:{b.port}"
            xfcc = seen["headers"].get("X-Forwarded-Client-Cert", "")
            assert "URI=spiffe://cluster.local/ns/a/sa/app-a" in xfcc, seen["headers"]
            # keep-alive pool to the peer: ten requests, one TLS connection
            for _ in range(10):
                assert get(port, "/again")[0] == 200
            assert a.app.outbound._pools[0].opened == 1
            # a streamed (chunked) request body of 3 MiB arrives whole
            def chunks():
                for _ in range(3):
                    yield b"z" * (1 << 20)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("POST", "/upload", body=chunks(), encode_chunked=True)
            resp = conn.getresponse()
            assert resp.status == 200
            assert json.loads(resp.read())["body_len"] == 3 << 20
            conn.close()
            # and a 5 MiB response streams back
            status, body, _ = get(port, f"/bytes/{5 << 20}")
            assert status == 200 and len(body) == 5 << 20


def test_without_client_certificate_the_mtls_peer_refuses(pki, app, tmp_path):
    b_settings = settings_for(pki, app.port, client_ca=pki.ca_file, drain_delay_s=0.0)
    with running_proxy(b_settings) as b:
        a_settings = outbound_only(tmp_path, outbound=(f"127.0.0.1:0=https://localhost:{b.port}",),
                                   outbound_ca=pki.ca_file)
        with running_proxy(a_settings) as a:
            status, body, _ = get(a.app.bound.extra["outbound/0"].port)
            # TLS 1.3: the peer refuses after our handshake finished, so the refusal surfaces on
            # the first write or read of the request; either way a 502 and nothing reaches app B.
            assert status == 502, body
            assert b"refused the connection after the handshake: it requires a client certificate" \
                b" (none is presented" in body, body
            assert not app.seen


def test_client_certificate_alpn_and_tls13_seen_by_peer(pki, tmp_path):
    cdir = client_dir(pki, tmp_path, "caller")
    leaf = pki.issue("localhost", dns=("localhost",))
    with tls_peer(tmp_path / "peer", leaf, client_ca=pki.ca.cert_pem) as peer:
        a_settings = outbound_only(tmp_path, outbound_ca=pki.ca_file, outbound_cert_dir=cdir,
                                   outbound_routes=(route(url=f"https://127.0.0.1:{peer.port}",
                                                          server_name="localhost"),))
        with running_proxy(a_settings) as a:
            status, body, _ = get(a.app.bound.extra["outbound/0"].port, "/x")
            assert status == 200, body
            info = json.loads(body)
            assert info["client_subject"] == "commonName=caller"
            assert info["alpn"] == "http/1.1"
            assert info["tls"] == "TLSv1.3"
            assert info["headers"]["Host"] == f"127.0.0.1:{peer.port}"


def test_upgrade_is_relayed_through_the_same_engine(pki, tmp_path):
    from tests.outbound.peer import upgrade_peer

    leaf = pki.issue("localhost", dns=("localhost",))
    with upgrade_peer(tmp_path / "peer", leaf) as peer:
        a_settings = outbound_only(tmp_path, outbound_ca=pki.ca_file,
                                   outbound=(f"127.0.0.1:0=https://localhost:{peer.port}",))
        with running_proxy(a_settings) as a:
            port = a.app.bound.extra["outbound/0"].port
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"GET /ws HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = s.recv(4096)
                    assert chunk, head
                    head += chunk
                assert head.startswith(b"HTTP/1.1 101 "), head
                for i in range(20):
                    msg = f"ping {i} ".encode() * 100
                    s.sendall(msg)
                    got = b""
                    while len(got) < len(msg):
                        got += s.recv(65536)
                    assert got == msg
            assert f"Host: localhost:{peer.port}" in peer.seen[0]["head"]
            assert "Upgrade: echo" in peer.seen[0]["head"]


def test_yaml_config_file_with_routes(pki, tmp_path):
    from tlsproxy.config import build_settings

    leaf = pki.issue("localhost", dns=("localhost",), uris=("spiffe://cluster.local/ns/b/sa/b",))
    with tls_peer(tmp_path / "peer", leaf) as peer:
        config = tmp_path / "tlsproxy.yaml"
        config.write_text(f"""
outbound_ca: {pki.ca_file}
outbound_routes:
  - listen: 127.0.0.1:0
    url: https://127.0.0.1:{peer.port}
    server_name: localhost
    allow_uri: [spiffe://cluster.local/ns/b/*]
  - listen: 127.0.0.1:0
    url: https://127.0.0.1:{peer.port}
    server_name: localhost
    allow_dns: [someone-else.svc]
""")
        settings = build_settings({"config": str(config)}, {})
        a_settings = outbound_only(tmp_path, outbound_ca=settings.outbound_ca,
                                   outbound_routes=settings.outbound_routes)
        with running_proxy(a_settings) as a:
            assert get(a.app.bound.extra["outbound/0"].port)[0] == 200
            status, body, _ = get(a.app.bound.extra["outbound/1"].port)
            assert status == 502 and b"identity not allowed" in body and b"dns=someone-else.svc" in body


def test_drain_closes_outbound_listeners(pki, tmp_path):
    leaf = pki.issue("localhost", dns=("localhost",))
    with tls_peer(tmp_path / "peer", leaf) as peer:
        a_settings = outbound_only(tmp_path, outbound_ca=pki.ca_file, outbound_proxy=HostPort("127.0.0.1", 0),
                                   outbound=(f"127.0.0.1:0=https://localhost:{peer.port}",))
        with running_proxy(a_settings) as a:
            ports = [a.app.bound.extra["outbound/0"].port, a.app.bound.extra["outbound-proxy"].port]
            assert get(ports[0])[0] == 200
        for port in ports:
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_tls_route_relays_bytes_unchanged(pki, tmp_path):
    leaf = pki.issue("localhost", dns=("localhost",))
    with tls_peer(tmp_path / "peer", leaf) as peer:
        a_settings = outbound_only(tmp_path, outbound_ca=pki.ca_file,
                                   outbound=(f"127.0.0.1:0=tls://localhost:{peer.port}",))
        with running_proxy(a_settings) as a:
            port = a.app.bound.extra["outbound/0"].port
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"GET /raw HTTP/1.1\r\nHost: original.local\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), data
            info = json.loads(body)
            assert info["path"] == "/raw"
            assert info["headers"]["Host"] == "original.local"     # not rewritten: bytes as sent
            assert "X-Forwarded-For" not in info["headers"]
            assert info["alpn"] is None and info["tls"] == "TLSv1.3"


# ---------------------------------------------------------------------------- failures, named

def _fails_with(tmp_path, peer_port: int, *, reason: str, kind: str, **route_kw):
    ca_file = route_kw.pop("ca_file")
    a_settings = outbound_only(tmp_path, outbound_ca=ca_file,
                               outbound_routes=(route(url=f"https://127.0.0.1:{peer_port}", **route_kw),))
    with running_proxy(a_settings) as a:
        status, body, _ = get(a.app.bound.extra["outbound/0"].port)
        assert status == 502, body
        assert reason.encode() in body, body
        text = a.app.metrics.registry.get_sample_value(
            "tlsproxy_outbound_errors_total", {"peer": f"127.0.0.1:{peer_port}", "kind": kind})
        assert text == 1.0


def test_wrong_ca_is_a_502_naming_unknown_ca(pki, tmp_path):
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("tlsproxy")
    logger.addHandler(handler)
    try:
        other = generate.make_ca("someone else's CA")
        leaf = generate.issue(other, "localhost", dns=("localhost",))
        with tls_peer(tmp_path / "peer", leaf) as peer:
            _fails_with(tmp_path, peer.port, reason="certificate rejected: unknown CA", kind="unknown_ca",
                        ca_file=pki.ca_file, server_name="localhost")
    finally:
        logger.removeHandler(handler)
    # and the log lines carry the same reason
    reasons = {r.getMessage(): r.fields.get("reason", "") for r in records if hasattr(r, "fields")}
    assert "certificate rejected: unknown CA" in reasons["peer connection failed"]
    assert "certificate rejected: unknown CA" in reasons["upstream error"]


def test_trust_order_explicit_ca_wins_then_cert_dir_then_system(pki, tmp_path):
    leaf = pki.issue("localhost", dns=("localhost",))
    other = generate.make_ca("unrelated CA")
    other_file = tmp_path / "other-ca.pem"
    other_file.write_bytes(other.cert_pem)
    cdir = client_dir(pki, tmp_path)                 # its ca.crt is the right CA
    with tls_peer(tmp_path / "peer", leaf) as peer:
        url = f"127.0.0.1:0=https://localhost:{peer.port}"
        cases = [
            ({"outbound_cert_dir": cdir}, 200, b""),
            ({"outbound_cert_dir": cdir, "outbound_ca": other_file}, 502,
             f"not signed by the CA bundle {other_file}".encode()),
            ({}, 502, b"not signed by the system trust store"),
        ]
        for changes, status, text in cases:
            with running_proxy(outbound_only(tmp_path, outbound=(url,), **changes)) as a:
                got, body, _ = get(a.app.bound.extra["outbound/0"].port)
                assert got == status, (changes, body)
                assert text in body, body


def test_name_mismatch_is_a_502_naming_it(pki, tmp_path):
    leaf = pki.issue("localhost", dns=("localhost",))
    with tls_peer(tmp_path / "peer", leaf) as peer:
        _fails_with(tmp_path, peer.port, reason="certificate rejected: name mismatch", kind="name_mismatch",
                    ca_file=pki.ca_file, server_name="interceptors.tekton-pipelines.svc")


def test_expired_peer_certificate_is_a_502_naming_it(pki, tmp_path):
    now = dt.datetime.now(dt.UTC)
    leaf = pki.issue("localhost", dns=("localhost",), not_before=now - dt.timedelta(days=30),
                     not_after=now - dt.timedelta(days=1))
    with tls_peer(tmp_path / "peer", leaf) as peer:
        _fails_with(tmp_path, peer.port, reason="certificate rejected: expired", kind="expired",
                    ca_file=pki.ca_file, server_name="localhost")


def test_pinned_identity(pki, tmp_path):
    leaf = pki.issue("localhost", dns=("localhost",), uris=("spiffe://cluster.local/ns/b/sa/other",))
    with tls_peer(tmp_path / "peer", leaf) as peer:
        _fails_with(tmp_path, peer.port, reason="identity not allowed", kind="identity",
                    ca_file=pki.ca_file, server_name="localhost",
                    allow_uri=["spiffe://cluster.local/ns/b/sa/app-b"])
        a_settings = outbound_only(tmp_path, outbound_ca=pki.ca_file, outbound_routes=(
            route(url=f"https://127.0.0.1:{peer.port}", server_name="localhost",
                  allow_uri=["spiffe://cluster.local/ns/b/*"]),
            route(url=f"https://127.0.0.1:{peer.port}", server_name="localhost", allow_dns="localhost"),
        ))
        with running_proxy(a_settings) as a:
            assert get(a.app.bound.extra["outbound/0"].port)[0] == 200
            assert get(a.app.bound.extra["outbound/1"].port)[0] == 200


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_unreachable_peer_is_502(pki, tmp_path):
    port = _closed_port()
    a_settings = outbound_only(tmp_path, outbound_ca=pki.ca_file,
                               outbound=(f"127.0.0.1:0=https://127.0.0.1:{port}",))
    with running_proxy(a_settings) as a:
        status, body, _ = get(a.app.bound.extra["outbound/0"].port)
        assert status == 502
        assert b"refused" in body


def test_plain_http_peer_is_a_502_saying_so(pki, app, tmp_path):
    a_settings = outbound_only(tmp_path, outbound_ca=pki.ca_file,
                               outbound=(f"127.0.0.1:0=https://127.0.0.1:{app.port}",))
    with running_proxy(a_settings) as a:
        status, body, _ = get(a.app.bound.extra["outbound/0"].port)
        assert status == 502
        assert b"does not speak TLS on this port" in body, body


def test_tls12_only_peer_is_refused(pki, tmp_path):
    import ssl

    leaf = pki.issue("localhost", dns=("localhost",))
    with tls_peer(tmp_path / "peer", leaf, max_version=ssl.TLSVersion.TLSv1_2) as peer:
        _fails_with(tmp_path, peer.port, reason="the peer does not offer TLS 1.3", kind="tls",
                    ca_file=pki.ca_file, server_name="localhost")


def test_slow_peer_is_504(pki, app, tmp_path):
    with running_proxy(settings_for(pki, app.port, drain_delay_s=0.0)) as b:
        a_settings = outbound_only(tmp_path, outbound_ca=pki.ca_file, upstream_response_timeout_s=0.5,
                                   outbound=(f"127.0.0.1:0=https://localhost:{b.port}",))
        with running_proxy(a_settings) as a:
            t0 = time.monotonic()
            status, body, _ = get(a.app.bound.extra["outbound/0"].port, "/sleep/3")
            assert status == 504, body
            assert time.monotonic() - t0 < 2.5


# ---------------------------------------------------------------------------- hot reload

def _reloads(proxy, result: str) -> float:
    value = proxy.app.metrics.registry.get_sample_value(
        "tlsproxy_certificate_reloads_total", {"role": "outbound", "result": result})
    return value or 0.0


def test_rotating_the_outbound_ca_file_is_picked_up(pki, tmp_path):
    new_ca = generate.make_ca("rotated CA")
    leaf = generate.issue(new_ca, "localhost", dns=("localhost",))
    trust = tmp_path / "trust.pem"
    trust.write_bytes(pki.ca.cert_pem)             # the old CA only: the peer is not trusted yet
    with tls_peer(tmp_path / "peer", leaf) as peer:
        a_settings = outbound_only(tmp_path, outbound_ca=trust, outbound_routes=(
            route(url=f"https://127.0.0.1:{peer.port}", server_name="localhost"),))
        with running_proxy(a_settings) as a:
            port = a.app.bound.extra["outbound/0"].port
            status, body, _ = get(port)
            assert status == 502 and b"unknown CA" in body
            trust.write_bytes(pki.ca.cert_pem + new_ca.cert_pem)   # a bundle: old + new
            assert wait_for(lambda: get(port)[0] == 200, timeout=10, interval=0.3)
            # a broken file keeps the last good context: wait until it was read and refused (the
            # failure counter moves), then the peer is still reached with the old trust
            failed, swapped = _reloads(a, "failure"), _reloads(a, "success")
            trust.write_bytes(b"not a certificate")
            assert wait_for(lambda: _reloads(a, "failure") == failed + 1, timeout=10, interval=0.1)
            assert _reloads(a, "success") == swapped
            assert get(port, "/still")[0] == 200


def test_rotating_the_client_certificate_is_picked_up(pki, app, tmp_path):
    cdir = client_dir(pki, tmp_path, "app-a", "spiffe://cluster.local/ns/a/sa/old")
    b_settings = settings_for(pki, app.port, client_ca=pki.ca_file, drain_delay_s=0.0)
    with running_proxy(b_settings) as b:
        a_settings = outbound_only(tmp_path, outbound=(f"127.0.0.1:0=https://localhost:{b.port}",),
                                   outbound_cert_dir=cdir)     # cdir's ca.crt is the trust bundle
        with running_proxy(a_settings) as a:
            port = a.app.bound.extra["outbound/0"].port

            def identity() -> str:
                status, body, _ = get(port)
                assert status == 200, body
                return json.loads(body)["headers"]["X-Forwarded-Client-Cert"]

            assert "URI=spiffe://cluster.local/ns/a/sa/old" in identity()
            new = pki.issue("app-a", uris=("spiffe://cluster.local/ns/a/sa/new",), server=False, client=True)
            pki.write_pair(cdir, new)
            assert wait_for(lambda: "URI=spiffe://cluster.local/ns/a/sa/new" in identity(), timeout=10,
                            interval=0.3)


# ---------------------------------------------------------------------------- configuration errors

def test_bad_outbound_settings_are_one_line_errors(tmp_path):
    import subprocess

    from tests.support import TLSPROXY

    cases = [
        (["--outbound", "15001"], "expected LISTEN=URL"),
        (["--outbound", "15001=http://peer:80"], "scheme must be https:// or tls://"),
        (["--outbound", "15001=https://peer:8443", "--outbound-ca", str(tmp_path / "nope.pem")],
         "CA bundle is missing"),
        (["--outbound-proxy", "15080", "--outbound-allow", "*"], "open proxy"),
        (["--outbound-routes", "{listen: 1, url: 'https://p:1', bogus: 1}"], "unknown key 'bogus'"),
    ]
    for args, text in cases:
        r = subprocess.run([TLSPROXY, "serve", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
                            "--state-dir", str(tmp_path / "state"), *args],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 2, (args, r.stderr)
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("tlsproxy: error:") and text in last, r.stderr
        assert "Traceback" not in r.stderr
