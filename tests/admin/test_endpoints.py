"""/certs and POST /shutdown over real sockets; the pure policy pieces table-driven."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl

import pytest

from tests.admin.scrape import get, get_json
from tests.support import ProxyThread, running_proxy, settings_for, wait_for
from tlsproxy.admin.endpoints import is_loopback, readyz_exclusions, shutdown_handler
from tlsproxy.admin.health import ca_problem, certificate_problem, expiring
from tlsproxy.admin.server import AdminRequest
from tlsproxy.app import App
from tlsproxy.certs import generate
from tlsproxy.certs.bundle import CertInfo


def test_certs_lists_metadata_and_never_key_material(pki, app):
    with running_proxy(settings_for(pki, app.port)) as proxy:
        status, raw, headers = get(proxy.admin_port, "/certs")
        assert status == 200 and headers["Content-Type"] == "application/json"
        assert b"PRIVATE KEY" not in raw and b"BEGIN" not in raw
        _, doc = get_json(proxy.admin_port, "/certs")
        info = proxy.app.store.generation.bundles[0].info
        (cert,) = doc["certificates"]
        assert cert["subject"] == "CN=localhost"
        assert cert["serial"] == info.serial
        assert cert["dns_names"] == ["localhost"]
        assert set(cert["ip_addresses"]) == {"127.0.0.1", "::1"}
        assert cert["not_after"] == info.not_after.isoformat()
        assert cert["expires_in_s"] > 300 * 86400
        assert doc["generation"] == 1
        assert doc["last_reload"] == {"ok": True, "at": doc["loaded_at"], "error": None}


def test_certs_reports_a_failed_reload_and_keeps_the_old_certificate(pki, app):
    import trio

    with running_proxy(settings_for(pki, app.port)) as proxy:
        serial = proxy.app.store.generation.bundles[0].info.serial
        (pki.cert_dir / "tls.key").write_bytes(b"garbage\n")
        trio.from_thread.run(proxy.app.on_sighup, trio_token=proxy.token)
        _, doc = get_json(proxy.admin_port, "/certs")
        assert doc["last_reload"]["ok"] is False
        assert "tls.key" in doc["last_reload"]["error"]
        assert [c["serial"] for c in doc["certificates"]] == [serial]


def test_post_shutdown_from_loopback_drains_and_run_ends(pki, app):
    proxy = ProxyThread(App(settings_for(pki, app.port, drain_delay_s=0.2))).start()
    try:
        assert get(proxy.admin_port, "/shutdown")[0] == 405          # GET is not enough
        status, body = get_json(proxy.admin_port, "/shutdown", method="POST")
        assert (status, body) == (202, {"draining": True})
        assert proxy.app.drain_started_at is not None
        assert wait_for(lambda: not proxy._thread.is_alive(), timeout=15)
    finally:
        proxy.stop()


@pytest.mark.parametrize("ip, allowed", [
    ("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("10.0.0.7", False), ("192.168.1.1", False), ("::ffff:10.0.0.7", False), ("fe80::1%eth0", False),
    ("", False), ("localhost", False),
])
def test_shutdown_is_loopback_only(ip, allowed):
    assert is_loopback(ip) is allowed
    drained: list[str] = []
    reply = asyncio.run(shutdown_handler(drained.append)(AdminRequest("POST", "/shutdown", "", ip)))
    assert reply.status == (202 if allowed else 403)
    assert bool(drained) is allowed


def _info(not_before: dt.datetime, not_after: dt.datetime) -> CertInfo:
    ca = generate.make_ca("t")
    return CertInfo.of(generate.issue(ca, "x", dns=("x",), not_before=not_before, not_after=not_after).cert)


NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)


def test_certificate_problem():
    good = _info(NOW - DAY, NOW + 30 * DAY)
    assert certificate_problem([good], NOW) is None
    assert certificate_problem(None, NOW) == "no valid certificate loaded"
    assert certificate_problem([], NOW) == "no valid certificate loaded"
    assert "expired" in certificate_problem([good, _info(NOW - 2 * DAY, NOW - DAY)], NOW)
    assert "not valid before" in certificate_problem([_info(NOW + DAY, NOW + 2 * DAY)], NOW)


def test_expiring_window():
    soon, later = _info(NOW - DAY, NOW + 3 * DAY), _info(NOW - DAY, NOW + 30 * DAY)
    assert expiring([soon, later], NOW, 14 * 86400) == [soon]
    assert expiring([soon, later], NOW, 0) == []
    assert expiring([soon, later], NOW, 60 * 86400) == [soon, later]


def test_ca_problem_reads_the_real_context():
    real_now = dt.datetime.now(dt.UTC)
    ca = generate.make_ca("client CA")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    assert ca_problem(ctx, real_now) == "client CA bundle configured but not loaded"
    ctx.load_verify_locations(cadata=ca.cert_pem.decode())
    assert ca_problem(ctx, real_now) is None
    old = generate.make_ca("old CA", now=real_now - 40 * DAY, validity=10 * DAY)
    ctx2 = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx2.load_verify_locations(cadata=old.cert_pem.decode())
    assert "expired" in ca_problem(ctx2, real_now)
    assert ca_problem(None, real_now) == "no TLS context loaded"


@pytest.mark.parametrize("query, result", [
    ("", frozenset()),
    ("exclude=upstream", frozenset({"upstream"})),
    ("exclude=upstream&exclude=drain", frozenset({"upstream", "drain"})),
    ("exclude=upstream%2Cdrain", frozenset({"upstream", "drain"})),
    ("exclude=nosuch", "unknown check 'nosuch' (checks: drain, certificate, upstream)"),
    ("verbose", "unknown parameter 'verbose' (only exclude=CHECK)"),
])
def test_readyz_exclusions(query, result):
    assert readyz_exclusions(query, ("drain", "certificate", "upstream")) == result


def _raw(port: int, data: bytes, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        return out


def test_admin_speaks_the_engines_http(pki, app):
    """The admin listener is a local handler of the engine: keep-alive, pipelining, HEAD without a
    body, and the engine's 400 for a malformed head (nothing of it reaches a handler)."""
    with running_proxy(settings_for(pki, app.port)) as proxy:
        data = _raw(proxy.admin_port, b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
                                      b"HEAD /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
                                      b"GET /nosuch HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert data.count(b"HTTP/1.1 200 OK\r\n") == 2, data
        assert data.count(b"HTTP/1.1 404 Not Found\r\n") == 1, data
        assert b"cache-control: no-store" in data.lower()
        bad = _raw(proxy.admin_port, b"GET /healthz HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n")
        assert bad.startswith(b"HTTP/1.1 400 "), bad
        big = _raw(proxy.admin_port, b"POST /shutdown HTTP/1.1\r\nHost: a\r\nContent-Length: 9999999\r\n"
                                     b"\r\n")
        assert big.startswith(b"HTTP/1.1 413 "), big
