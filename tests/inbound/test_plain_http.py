"""The plain-HTTP listener: redirect (followed by curl -L onto HTTPS), forward (through the engine), off."""

from __future__ import annotations

import json
import socket

import pytest

from tests.admin.scrape import get_json, scrape, value
from tests.support import captured_logs, curl, running_proxy, settings_for, wait_for
from tests.support import free_port as _free_port
from tlsproxy.config import HostPort
from tlsproxy.errors import HTTPError
from tlsproxy.http.redirect import redirect_location

LOCAL0 = HostPort("127.0.0.1", 0)


@pytest.mark.parametrize("host, target, port, location", [
    (b"example.com", b"/", 443, b"https://example.com/"),
    (b"example.com:80", b"/a/b?c=d&e", 443, b"https://example.com/a/b?c=d&e"),
    (b"example.com:8080", b"/x", 8443, b"https://example.com:8443/x"),
    (b"Example.COM", b"/Path", 443, b"https://example.com/Path"),
    (b"10.0.0.7:80", b"/", 443, b"https://10.0.0.7/"),
    (b"[::1]:80", b"/v6", 443, b"https://[::1]/v6"),
    (b"[fe80::1]", b"/", 9443, b"https://[fe80::1]:9443/"),
    (b"svc.ns.svc.cluster.local.", b"/", 443, b"https://svc.ns.svc.cluster.local./"),
    (b"ignored", b"http://other.example:80/p?q", 443, b"https://other.example/p?q"),
    (None, b"http://other.example", 443, b"https://other.example/"),
    (b"h", b"//double/slash", 443, b"https://h//double/slash"),
])
def test_redirect_location(host, target, port, location):
    assert redirect_location(host, target, port) == location


@pytest.mark.parametrize("host, target, status", [
    (None, b"/", 400),                       # no Host
    (b"", b"/", 400),
    (b"evil.com/x", b"/", 400),              # a path in Host must not reach Location
    (b"user@evil.com", b"/", 400),
    (b"a b", b"/", 400),
    (b"example.com:http", b"/", 400),
    (b"[::1", b"/", 400),
    (b"[::1]x", b"/", 400),
    (b"example.com", b"*", 400),             # OPTIONS *
    (b"example.com", b"example.com:443", 400),   # CONNECT authority-form
    (b"h", b"http://user@evil.com/", 400),
    (b"h", b"/" + b"a" * 9000, 414),
])
def test_redirect_refusals(host, target, status):
    with pytest.raises(HTTPError) as err:
        redirect_location(host, target, 443)
    assert err.value.status == status


def test_curl_follows_the_redirect_onto_https(pki, app):
    tls_port = _free_port()
    settings = settings_for(pki, app.port, listen=HostPort("127.0.0.1", tls_port), http_listen=LOCAL0,
                            http_mode="redirect", redirect_port=tls_port)
    with running_proxy(settings) as proxy:
        http_port = proxy.app.bound.extra["http"].port
        r = curl("-L", "--cacert", str(pki.ca_file), "-w", "\n%{num_redirects} %{url_effective}",
                 f"http://localhost:{http_port}/some/path?x=1")
        assert r.returncode == 0, r.stderr
        body, _, info = r.stdout.decode().rpartition("\n")
        assert info == f"1 https://localhost:{tls_port}/some/path?x=1"
        assert json.loads(body)["path"] == "/some/path?x=1"
        assert app.seen[-1].header("X-Forwarded-Proto") == "https"
        # the redirect itself: 301, same host (port stripped), same path
        r = curl("-si", "-H", "Host: localhost:8080", f"http://127.0.0.1:{http_port}/p")
        head = r.stdout.decode().split("\r\n")
        assert head[0] == "HTTP/1.1 301 Moved Permanently"
        assert f"location: https://localhost:{tls_port}/p" in head
        # counted as soon as the answer is sent (a scrape may still overtake that by a hair)
        assert wait_for(lambda: value(scrape(proxy.admin_port), "tlsproxy_requests_total", listener="http",
                                      code_class="3xx") == 2)
        assert len(app.seen) == 1          # redirects never reach the app


def test_redirect_to_the_default_https_port_omits_it_and_refuses_bad_hosts(pki, app):
    settings = settings_for(pki, app.port, http_listen=LOCAL0)     # http_mode defaults to redirect
    with running_proxy(settings) as proxy:
        port = proxy.app.bound.extra["http"].port
        r = curl("-sI", "-H", "Host: svc.example", f"http://127.0.0.1:{port}/a?b")
        assert b"location: https://svc.example/a?b\r\n" in r.stdout
        r = curl("-si", "-H", "Host: evil.com/x", f"http://127.0.0.1:{port}/")
        assert r.stdout.startswith(b"HTTP/1.1 400 ")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")          # HTTP/1.0 without Host: nowhere to send it
            assert s.recv(4096).startswith(b"HTTP/1.1 400 ")
        assert app.seen == []


def test_forward_mode_proxies_plain_http_and_says_so(pki, app):
    settings = settings_for(pki, app.port, http_listen=LOCAL0, http_mode="forward")
    with captured_logs() as records, running_proxy(settings) as proxy:
        port = proxy.app.bound.extra["http"].port
        assert get_json(proxy.admin_port, "/readyz") == (200, {"ready": True})     # both listeners bound
        r = curl("-H", "Host: svc.example", f"http://127.0.0.1:{port}/plain?x=1")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["path"] == "/plain?x=1"
        seen = app.seen[-1]
        assert seen.header("X-Forwarded-Proto") == "http"
        assert seen.header("X-Forwarded-Port") == "80"
        assert seen.header("X-Forwarded-For") == "127.0.0.1"
        assert wait_for(lambda: value(scrape(proxy.admin_port), "tlsproxy_requests_total", listener="http",
                                      code_class="2xx") == 1)
        m = scrape(proxy.admin_port)
        assert value(m, "tlsproxy_requests_total", listener="inbound") == 0
    lines = [r.fields for r in records if r.name == "tlsproxy.access"]
    assert len(lines) == 1
    assert lines[0]["listener"] == "http" and lines[0]["scheme"] == "http" and lines[0]["status"] == 200


def test_off_mode_binds_nothing(pki, app):
    port = _free_port()
    settings = settings_for(pki, app.port, http_listen=HostPort("127.0.0.1", port), http_mode="off")
    with running_proxy(settings) as proxy:
        assert "http" not in proxy.app.bound.extra
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5)
        assert proxy.call(lambda: None) is None


@pytest.mark.parametrize("args, message", [
    (["--redirect-port", "0"], "tlsproxy: error: --redirect-port: 0 is not a port (1 to 65535)\n"),
    (["--redirect-port", "70000"], "tlsproxy: error: --redirect-port: 70000 is not a port (1 to 65535)\n"),
    (["--http-mode", "sideways"], "tlsproxy: error: --http-mode: 'sideways' is not one of redirect, "
                                  "forward, off\n"),
    (["--http-listen", ":0", "--http-mode", "forward", "--protocol", "tcp", "--upstream", "tcp://127.0.0.1:5"],
     "tlsproxy: error: --http-mode forward proxies HTTP requests: it needs --protocol http\n"),
])
def test_bad_plain_http_settings_are_one_line_errors(args, message):
    import subprocess

    from tests.support import TLSPROXY

    r = subprocess.run([TLSPROXY, "serve", *args], capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stderr) == (2, message)
