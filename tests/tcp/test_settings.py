"""tcp-mode settings: flags, one-line errors, YAML tls:// routes with alpn. (The injection annotation
tlsproxy.io/protocol: tcp is tested in tests/webhook/test_injector.py.)"""

from __future__ import annotations

import subprocess

import pytest

from tests.support import TLSPROXY
from tlsproxy.config import build_settings, parse_mapping
from tlsproxy.errors import ConfigError
from tlsproxy.outbound.routes import parse_routes

TCP = {"protocol": "tcp", "upstream": "tcp://127.0.0.1:8001"}


def test_tcp_settings_and_defaults():
    s = build_settings({**TCP, "alpn": "h2,http/1.1", "proxy-protocol": "v2", "tcp-idle-timeout": "10m",
                        "tcp-close-timeout": "2s", "tcp-max-lifetime": "24h"}, {})
    assert s.alpn == ("h2", "http/1.1") and s.proxy_protocol == "v2"
    assert (s.tcp_idle_timeout_s, s.tcp_close_timeout_s, s.tcp_max_lifetime_s) == (600, 2, 86400)
    d = build_settings(TCP, {})
    assert d.alpn == () and d.proxy_protocol == "off"
    assert (d.tcp_idle_timeout_s, d.tcp_close_timeout_s, d.tcp_max_lifetime_s) == (3600, 5, None)
    assert build_settings({**TCP, "tcp-idle-timeout": "0"}, {}).tcp_idle_timeout_s is None
    env = build_settings({}, {"TLSPROXY_PROTOCOL": "tcp", "TLSPROXY_UPSTREAM": "tcp://127.0.0.1:1",
                              "TLSPROXY_ALPN": "h2"})
    assert env.alpn == ("h2",)


@pytest.mark.parametrize("flags, message", [
    ({"alpn": "spdy/3"}, "--alpn in HTTP mode: h2 and/or http/1.1"),
    ({"protocol": "tcp"}, "--protocol tcp relays bytes: give --upstream tcp://HOST:PORT"),
    ({"upstream": "tcp://127.0.0.1:1"}, "is a byte relay: it needs --protocol tcp"),
    ({"proxy-protocol": "v2"}, "--proxy-protocol is for --protocol tcp"),
    ({**TCP, "proxy-protocol": "v1"}, "is not one of off, v2"),
    ({**TCP, "alpn": "h2,h2"}, "names a protocol twice"),
    ({**TCP, "alpn": "h 2"}, "is not an ALPN protocol ID"),
    ({**TCP, "tcp-close-timeout": "soon"}, "is not a duration"),
])
def test_bad_tcp_settings(flags, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        build_settings(flags, {})


def test_cli_error_is_one_line_exit_2():
    proc = subprocess.run([TLSPROXY, "serve", "--alpn", "spdy/3"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr == ("tlsproxy: error: --alpn in HTTP mode: h2 and/or http/1.1 (other protocols need "
                           "--protocol tcp)\n")


def test_yaml_tls_route_with_alpn():
    (r,) = parse_routes((), [parse_mapping({"listen": "15002", "url": "tls://contour.projectcontour.svc:8001",
                                            "alpn": ["h2"], "server_name": "contour",
                                            "allow_uri": "spiffe://cluster.local/ns/projectcontour/sa/contour"})])
    assert r.scheme == "tls" and r.alpn == ("h2",) and r.port == 8001 and str(r.listen) == "127.0.0.1:15002"
    (flag,) = parse_routes(("127.0.0.1:15002=tls://contour.projectcontour.svc:8001",), ())
    assert flag.scheme == "tls" and flag.alpn == ()
    with pytest.raises(ConfigError, match="alpn is for tls:// routes"):
        parse_routes((), [parse_mapping({"listen": "1", "url": "https://p:8443", "alpn": "h2"})])
    with pytest.raises(ConfigError, match="alpn: 'h2,h2' names a protocol twice"):
        parse_routes((), [parse_mapping({"listen": "1", "url": "tls://p:1", "alpn": ["h2", "h2"]})])



def test_injection_annotations_ask_for_tcp_mode_with_h2():
    from tests.webhook.test_injector import ON, injected, make_pod, proxy
    from tlsproxy.cli import parse_serve_settings
    from tlsproxy.webhook.injector import Denied, decide

    out, _ = injected(make_pod({**ON, "tlsproxy.io/protocol": "tcp", "tlsproxy.io/alpn": "h2",
                                "tlsproxy.io/upstream-port": "8001"}, ports=(8001,)))
    s = parse_serve_settings(proxy(out)["args"][1:], env={})
    assert s.protocol == "tcp" and s.alpn == ("h2",) and str(s.upstream) == "tcp://127.0.0.1:8001"
    for bad, message in (({"tlsproxy.io/alpn": "h2"}, "needs tlsproxy.io/protocol: tcp"),
                         ({"tlsproxy.io/protocol": "tcp", "tlsproxy.io/alpn": "h2,h2"},
                          "names a protocol twice")):
        d = decide(make_pod({**ON, **bad}), namespace_default=False)
        assert isinstance(d, Denied) and message in d.reason, d
