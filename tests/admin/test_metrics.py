"""/metrics scraped for real and parsed with prometheus-client's parser: the numbers move with traffic."""

from __future__ import annotations

import socket
import ssl
import time

import httpx
import trio

from tests.admin.scrape import label_values, scrape, value
from tests.support import running_proxy, settings_for, wait_for


def _client(pki) -> httpx.Client:
    return httpx.Client(verify=ssl.create_default_context(cafile=str(pki.ca_file)), timeout=10)


def test_traffic_moves_request_byte_handshake_and_connection_metrics(pki, app):
    with running_proxy(settings_for(pki, app.port)) as proxy:
        before = scrape(proxy.admin_port)
        assert value(before, "tlsproxy_connections_active", listener="inbound") == 0
        with _client(pki) as c:
            for _ in range(3):
                assert c.get(f"{proxy.url}/hello").status_code == 200
            assert c.post(f"{proxy.url}/upload", content=b"x" * 1000).status_code == 200
            assert c.get(f"{proxy.url}/bytes/5000").status_code == 200
            assert c.get(f"{proxy.url}/status/404").status_code == 404
            during = scrape(proxy.admin_port)
            # the keep-alive connection is still open while we scrape
            assert value(during, "tlsproxy_connections_active", listener="inbound", protocol="http") == 1
        # a client that speaks plain HTTP to the TLS port fails the handshake
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            s.settimeout(10)
            try:
                while s.recv(4096):
                    pass
            except ConnectionResetError:
                pass

        def settled():
            m = scrape(proxy.admin_port)
            return (value(m, "tlsproxy_connections_active", listener="inbound") == 0
                    and value(m, "tlsproxy_handshake_failures_total") == 1)

        assert wait_for(settled)
        after = scrape(proxy.admin_port)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("tlsproxy_requests_total", listener="inbound", code_class="2xx") == 5
    assert delta("tlsproxy_requests_total", listener="inbound", code_class="4xx") == 1
    assert delta("tlsproxy_request_duration_seconds_count", listener="inbound") == 6
    assert delta("tlsproxy_request_duration_seconds_sum", listener="inbound") > 0
    assert delta("tlsproxy_received_bytes_total", listener="inbound") == 1000
    assert delta("tlsproxy_sent_bytes_total", listener="inbound") >= 5000
    assert delta("tlsproxy_handshakes_total", listener="inbound", version="TLSv1.3") == 1
    assert delta("tlsproxy_connections_total", listener="inbound") == 2
    assert delta("tlsproxy_handshake_failures_total", listener="inbound") == 1
    assert len(label_values(after, "tlsproxy_handshake_failures_total", "reason")) == 1


def test_certificate_gauges_and_reload_counters(pki, app, tmp_path):
    with running_proxy(settings_for(pki, app.port)) as proxy:
        m = scrape(proxy.admin_port)
        first = proxy.app.store.generation.bundles[0].info
        assert value(m, "tlsproxy_certificate_not_after_seconds", serial=first.serial) == \
            first.not_after.timestamp()
        loaded_at = value(m, "tlsproxy_certificate_last_reload_timestamp_seconds", role="server")
        successes = value(m, "tlsproxy_certificate_reloads_total", result="success")   # startup: 0 or 1
        assert abs(loaded_at - time.time()) < 60

        # a good rotation (SIGHUP, or the certificate watcher if it sees the files first): success
        # counted, the gauge follows the new serial, the old series is gone
        pki.write_pair(pki.cert_dir, pki.issue("localhost", dns=("localhost",), ips=("127.0.0.1",)))
        trio.from_thread.run(proxy.app.on_sighup, trio_token=proxy.token)
        second = proxy.app.store.generation.bundles[0].info
        assert second.serial != first.serial
        m = scrape(proxy.admin_port)
        assert value(m, "tlsproxy_certificate_reloads_total", result="success") >= successes + 1
        assert value(m, "tlsproxy_certificate_reloads_total", result="failure") == 0
        assert label_values(m, "tlsproxy_certificate_not_after_seconds", "serial") == {second.serial}
        assert value(m, "tlsproxy_certificate_not_after_seconds", serial=second.serial) == \
            second.not_after.timestamp()
        assert value(m, "tlsproxy_certificate_last_reload_timestamp_seconds", role="server") > loaded_at

        # a broken rotation: failure counted, the old certificate stays
        (pki.cert_dir / "tls.crt").write_bytes(b"not a certificate\n")
        trio.from_thread.run(proxy.app.on_sighup, trio_token=proxy.token)
        m = scrape(proxy.admin_port)
        assert value(m, "tlsproxy_certificate_reloads_total", result="failure") >= 1
        assert label_values(m, "tlsproxy_certificate_not_after_seconds", "serial") == {second.serial}
        assert proxy.app.store.generation.bundles[0].info.serial == second.serial


def test_metric_names_follow_prometheus_conventions(pki, app):
    with running_proxy(settings_for(pki, app.port)) as proxy:
        with _client(pki) as c:
            c.get(f"{proxy.url}/")
        m = scrape(proxy.admin_port)
    names = {n for n, _ in m}
    for name in names:
        assert name.startswith("tlsproxy_"), name
    for required in ("tlsproxy_requests_total", "tlsproxy_request_duration_seconds_bucket",
                     "tlsproxy_connections_active", "tlsproxy_handshakes_total",
                     "tlsproxy_certificate_not_after_seconds",
                     "tlsproxy_certificate_last_reload_timestamp_seconds"):
        assert required in names, required
