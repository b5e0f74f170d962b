"""Pure parsing and matching: routes, allow-list, proxy targets, verify-failure reasons."""

from __future__ import annotations

from pathlib import Path

import pytest

from tlsproxy.config import HostPort, parse_mapping
from tlsproxy.errors import ConfigError, HTTPError
from tlsproxy.outbound import routes
from tlsproxy.outbound.peers import describe_verify_failure


@pytest.mark.parametrize("raw, listen, host, port, authority", [
    ("127.0.0.1:15001=https://core-interceptors.tekton-pipelines.svc:8443", HostPort("127.0.0.1", 15001),
     "core-interceptors.tekton-pipelines.svc", 8443, "core-interceptors.tekton-pipelines.svc:8443"),
    ("15001=https://peer.ns.svc", HostPort("127.0.0.1", 15001), "peer.ns.svc", 443, "peer.ns.svc"),
    (":15001=https://peer.ns.svc:443/", HostPort("127.0.0.1", 15001), "peer.ns.svc", 443, "peer.ns.svc"),
    ("0.0.0.0:15001=https://10.0.0.1:8443", HostPort("0.0.0.0", 15001), "10.0.0.1", 8443, "10.0.0.1:8443"),
    ("[::1]:15001=https://[fd00::1]:8443", HostPort("::1", 15001), "fd00::1", 8443, "[fd00::1]:8443"),
    ("15003=tls://db.ns.svc:5432", HostPort("127.0.0.1", 15003), "db.ns.svc", 5432, "db.ns.svc:5432"),
])
def test_outbound_flag(raw, listen, host, port, authority):
    r = routes.parse_outbound_flag(raw)
    assert (r.listen, r.host, r.port, r.authority) == (listen, host, port, authority)
    assert r.name_checked == host and r.pin.empty


@pytest.mark.parametrize("raw, error", [
    ("15001", "expected LISTEN=URL"),
    ("=https://p:1", "expected LISTEN=URL"),
    ("15001=", "expected LISTEN=URL"),
    ("15001=http://p:80", "scheme must be https:// or tls://"),
    ("15001=tls://p", "needs a port"),
    ("15001=https://p:1/path", "only scheme://host:port"),
    ("nope=https://p:1", "not HOST:PORT"),
    ("15001=https://:1", "has no host"),
])
def test_outbound_flag_errors(raw, error):
    with pytest.raises(ConfigError, match=error):
        routes.parse_outbound_flag(raw)


def test_route_mapping_all_keys():
    m = parse_mapping({"listen": 15002, "url": "https://127.0.0.1:9443", "server_name": "peer.ns.svc",
                       "ca": "/etc/peer/ca.crt", "cert_dir": "/var/run/client", "allow_uri":
                       ["spiffe://cluster.local/ns/b/*"], "allow_dns": "peer.ns.svc"})
    r = routes.parse_route_mapping(m, 0)
    assert r.listen == HostPort("127.0.0.1", 15002)
    assert (r.host, r.port, r.server_name) == ("127.0.0.1", 9443, "peer.ns.svc")
    assert r.name_checked == "peer.ns.svc"
    assert r.ca == Path("/etc/peer/ca.crt") and r.cert_dir == Path("/var/run/client")
    assert r.pin.uri == ("spiffe://cluster.local/ns/b/*",) and r.pin.dns == ("peer.ns.svc",)


@pytest.mark.parametrize("mapping, error", [
    ({"url": "https://p:1"}, "listen is required"),
    ({"listen": 1}, "url is required"),
    ({"listen": 1, "url": "https://p:1", "sever_name": "x"}, "unknown key 'sever_name'"),
    ({"listen": 1, "url": "https://p:1", "server_name": "a b"}, "not a DNS name"),
    ({"listen": 1, "url": "https://p:1", "server_name": ["a", "b"]}, "one value"),
    ({"listen": 1, "url": "https://p:1", "allow_dns": "*.svc"}, "no wildcards"),
    ({"listen": 1, "url": "https://p:1", "allow_uri": "spiffe://*/x"}, "only allowed at the end"),
])
def test_route_mapping_errors(mapping, error):
    with pytest.raises(ConfigError, match=error) as info:
        routes.parse_route_mapping(parse_mapping(mapping), 3)
    assert "outbound_routes[3]" in str(info.value)


def test_routes_flags_then_yaml_and_no_shared_port():
    rs = routes.parse_routes(["15001=https://a.ns.svc:8443"],
                             [parse_mapping({"listen": 15002, "url": "https://b.ns.svc:8443"})])
    assert [r.authority for r in rs] == ["a.ns.svc:8443", "b.ns.svc:8443"]
    with pytest.raises(ConfigError, match="two routes listen on 127.0.0.1:15001"):
        routes.parse_routes(["15001=https://a:1", "127.0.0.1:15001=https://b:1"], [])
    assert len(routes.parse_routes(["0=https://a:1", "0=https://b:1"], [])) == 2


DEFAULT = routes.parse_allow(["*.svc", "*.svc.cluster.local"])


@pytest.mark.parametrize("host, allowed", [
    ("peer.ns.svc", True), ("PEER.NS.SVC.", True), ("a.b.ns.svc.cluster.local", True),
    ("svc", False), (".svc", False), ("peer.ns.svc.evil.com", False), ("evilsvc", False),
    ("example.com", False), ("127.0.0.1", False), ("::1", False), ("localhost", False),
])
def test_allow_list_default(host, allowed):
    assert routes.host_allowed(host, DEFAULT) is allowed


def test_allow_list_exact_names_and_ips():
    allow = routes.parse_allow(["localhost", "10.0.0.7", "*.internal"])
    assert routes.host_allowed("LOCALHOST", allow)
    assert routes.host_allowed("10.0.0.7", allow)
    assert not routes.host_allowed("10.0.0.8", allow)
    assert routes.host_allowed("db.internal", allow)


@pytest.mark.parametrize("bad", ["*", "*.", "", "a*.svc", "*.*.svc", "bad name"])
def test_allow_list_refuses_open_or_odd_patterns(bad):
    with pytest.raises(ConfigError, match="--outbound-allow"):
        routes.parse_allow([bad])


@pytest.mark.parametrize("target, host, port, path", [
    (b"http://peer.ns.svc:8443/path?q=1", "peer.ns.svc", 8443, b"/path?q=1"),
    (b"http://peer.ns.svc/", "peer.ns.svc", 443, b"/"),
    (b"http://peer.ns.svc", "peer.ns.svc", 443, b"/"),
    (b"http://peer.ns.svc?x=1", "peer.ns.svc", 443, b"/?x=1"),
    (b"HTTP://Peer.ns.svc:1/a#frag", "Peer.ns.svc", 1, b"/a"),
    (b"https://peer.ns.svc:8443/a", "peer.ns.svc", 8443, b"/a"),
    (b"http://[fd00::1]:8443/a", "fd00::1", 8443, b"/a"),
])
def test_proxy_target(target, host, port, path):
    t = routes.parse_proxy_target(target)
    assert (t.host, t.port, t.path) == (host, port, path)


@pytest.mark.parametrize("target, error", [
    (b"/just/a/path", "this is a forward proxy"),
    (b"http://user:pw@peer.ns.svc/", "user information"),
    (b"http://peer.ns.svc:99999/", "not a port"),
    (b"http://peer.ns.svc:x/", "not a port"),
    (b"http://bad_host!/", "not a host name"),
    (b"http://[nope]:1/", "authority"),
])
def test_proxy_target_errors(target, error):
    with pytest.raises(HTTPError, match=error) as info:
        routes.parse_proxy_target(target)
    assert info.value.status == 400


def test_connect_target_and_line():
    assert routes.parse_connect_target(b"peer.ns.svc:8443") == routes.Target("peer.ns.svc", 8443, b"")
    with pytest.raises(HTTPError, match="port is required"):
        routes.parse_connect_target(b"peer.ns.svc")
    assert routes.connect_request(b"CONNECT a.svc:443 HTTP/1.1\r\nHost: a\r\n\r\n") == b"a.svc:443"
    assert routes.connect_request(b"CONNECT a.svc:443 HTTP/2\r\n\r\n") is None
    assert routes.connect_request(b"CONNECT  a HTTP/1.1\r\n\r\n") is None


@pytest.mark.parametrize("code, message, kind, words", [
    (20, "unable to get local issuer certificate", "unknown_ca", "unknown CA"),
    (19, "self-signed certificate in certificate chain", "unknown_ca", "not signed by the CA bundle /ca"),
    (10, "certificate has expired", "expired", "expired (certificate has expired)"),
    (62, "Hostname mismatch, certificate is not valid for 'x'.", "name_mismatch",
     "the name checked was 'peer.ns.svc'"),
    (9, "certificate is not yet valid", "not_yet_valid", "not yet valid"),
    (99, "", "cert_rejected", "verify error 99"),
])
def test_verify_failures_are_named(code, message, kind, words):
    k, reason = describe_verify_failure(code, message, "peer.ns.svc:8443", "peer.ns.svc", "the CA bundle /ca")
    assert k == kind
    assert words in reason and reason.startswith("peer peer.ns.svc:8443: certificate rejected: ")
