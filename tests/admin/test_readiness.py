"""/healthz and /readyz against a real proxy: upstream away and back, certificate expiry, drain."""

from __future__ import annotations

import datetime as dt
import logging
import socket
import ssl
import time

import httpx

from tests.admin.scrape import get, get_json, scrape, value
from tests.support import (
    app_server,
    captured_logs,
    curl,
    running_proxy,
    settings_for,
    wait_for,
)


def _ready(port: int) -> int:
    return get(port, "/readyz")[0]


def test_healthz_and_ready(pki, app):
    with running_proxy(settings_for(pki, app.port)) as proxy:
        status, body, _ = get(proxy.admin_port, "/healthz")
        assert (status, body) == (200, b"ok\n")
        assert get_json(proxy.admin_port, "/readyz") == (200, {"ready": True})


def test_readiness_follows_the_upstream_away_and_back(pki):
    with app_server(0) as first:
        port = first.port
        proxy_cm = running_proxy(settings_for(pki, port))
        proxy = proxy_cm.__enter__()
    try:
        # the app is gone: 503 naming the upstream, and requests get 502 (counted by kind)
        status, body = get_json(proxy.admin_port, "/readyz")
        assert status == 503
        assert body["ready"] is False
        assert set(body["not_ready"]) == {"upstream"}
        assert "refused" in body["not_ready"]["upstream"]
        # the proxy itself is ready (what a startup probe should wait for, before the app starts)
        assert get_json(proxy.admin_port, "/readyz?exclude=upstream") == (200, {"ready": True})
        assert get(proxy.admin_port, "/readyz?exclude=nosuch")[0] == 400
        assert get(proxy.admin_port, "/readyz?verbose=1")[0] == 400
        r = curl("--cacert", str(pki.ca_file), "-o", "/dev/null", "-w", "%{http_code}", f"{proxy.url}/")
        assert r.stdout == b"502"
        assert value(scrape(proxy.admin_port), "tlsproxy_upstream_errors_total", listener="inbound",
                     kind="connect") == 1
        # the app comes back on the same port: ready again, without restarting the proxy
        with app_server(port):
            assert wait_for(lambda: _ready(proxy.admin_port) == 200, timeout=10)
            r = curl("--cacert", str(pki.ca_file), f"{proxy.url}/")
            assert r.returncode == 0, r.stderr
        assert wait_for(lambda: _ready(proxy.admin_port) == 503, timeout=10)
    finally:
        proxy_cm.__exit__(None, None, None)


def test_certificate_that_expires_while_loaded_turns_readiness_off_and_is_warned(pki, app, tmp_path):
    now = dt.datetime.now(dt.UTC)
    short = pki.issue("localhost", dns=("localhost",), not_before=now - dt.timedelta(minutes=1),
                      not_after=now + dt.timedelta(seconds=4))
    secret = pki.write_pair(tmp_path / "short", short)
    with captured_logs() as records, running_proxy(settings_for(pki, app.port, cert_dir=secret)) as proxy:
        assert _ready(proxy.admin_port) == 200
        warned = [r for r in records if r.getMessage() == "certificate expires soon"]
        assert len(warned) == 1 and warned[0].levelno == logging.WARNING
        assert warned[0].fields["serial"] == format(short.cert.serial_number, "x")
        assert wait_for(lambda: _ready(proxy.admin_port) == 503, timeout=15)
        status, body = get_json(proxy.admin_port, "/readyz")
        assert "expired" in body["not_ready"]["certificate"]


def test_no_expiry_warning_for_a_long_lived_certificate(pki, app):
    with captured_logs() as records, running_proxy(settings_for(pki, app.port)):
        pass
    assert not [r for r in records if r.getMessage() == "certificate expires soon"]
    assert [r for r in records if r.getMessage() == "certificate loaded"]


def test_client_ca_configured_is_part_of_readiness(pki, app, tmp_path):
    """With --client-ca the readiness check looks at what the serving context actually trusts: a
    valid client CA is ready; a bundle whose every CA has expired is not, and says so."""
    from tlsproxy.certs.generate import make_ca

    with running_proxy(settings_for(pki, app.port, client_ca=pki.ca_file)) as proxy:
        assert proxy.app.store.generation.context.get_ca_certs(), "the client CA is in the context"
        assert get_json(proxy.admin_port, "/readyz") == (200, {"ready": True})
        # the check is registered under its name (an unknown name would be a 400)
        assert get(proxy.admin_port, "/readyz?exclude=client_ca")[0] == 200
    now = dt.datetime.now(dt.UTC)
    old = make_ca("expired client CA", now=now - dt.timedelta(days=30), validity=dt.timedelta(days=1))
    expired = tmp_path / "expired-ca.pem"
    expired.write_bytes(old.cert_pem)
    with running_proxy(settings_for(pki, app.port, client_ca=expired)) as proxy:
        status, body = get_json(proxy.admin_port, "/readyz")
        assert status == 503, body
        assert set(body["not_ready"]) == {"client_ca"}, body
        assert "expired" in body["not_ready"]["client_ca"]


def test_readiness_turns_503_when_the_drain_starts_and_listeners_close_only_after_the_delay(pki, app):
    delay = 1.5
    with running_proxy(settings_for(pki, app.port, drain_delay_s=delay)) as proxy:
        assert _ready(proxy.admin_port) == 200
        t0 = time.monotonic()
        proxy.call(proxy.app.request_drain)
        status, body = get_json(proxy.admin_port, "/readyz")
        assert status == 503 and "drain" in body["not_ready"]
        # still serving new connections during the delay
        ctx = ssl.create_default_context(cafile=str(pki.ca_file))
        with httpx.Client(verify=ctx, timeout=10) as c:
            assert c.get(f"{proxy.url}/during-delay").status_code == 200
        assert time.monotonic() - t0 < delay, "the check above ran too late to prove anything"

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", proxy.port), timeout=1).close()
                return False
            except ConnectionRefusedError:
                return True

        assert wait_for(refused, timeout=10, interval=0.02)
        assert time.monotonic() - t0 >= delay - 0.05
