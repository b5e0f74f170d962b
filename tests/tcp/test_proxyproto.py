"""PROXY protocol v2 builder, checked byte for byte against the layout in HAProxy's
proxy-protocol.txt (section 2.2) and with the spec-written parser of tests/tcp/helpers.py."""

from __future__ import annotations

import pytest

from tests.tcp.helpers import parse_proxy_v2, parse_tlvs
from tlsproxy import proxyproto as pp


def test_ipv4_header_bytes_without_tlvs():
    got = pp.v2_header(("10.1.2.3", 51000), ("192.168.0.9", 9443))
    assert got == (b"\r\n\r\n\x00\r\nQUIT\n"          # signature
                   b"\x21"                             # version 2, PROXY
                   b"\x11"                             # AF_INET, STREAM
                   b"\x00\x0c"                         # 12 bytes follow
                   b"\x0a\x01\x02\x03" b"\xc0\xa8\x00\x09"
                   b"\xc7\x38" b"\x24\xe3")            # 51000, 9443
    hd, rest = parse_proxy_v2(got + b"app bytes")
    assert (hd.command, hd.src, hd.dst, hd.tlvs, rest) == (1, ("10.1.2.3", 51000), ("192.168.0.9", 9443), [],
                                                           b"app bytes")


def test_ipv6_and_mixed_families():
    hd, _ = parse_proxy_v2(pp.v2_header(("2001:db8::1", 1), ("::1", 2)))
    assert hd.src == ("2001:db8::1", 1) and hd.dst == ("::1", 2)
    raw = pp.v2_header(("2001:db8::1", 1), ("::1", 2))
    assert raw[13] == 0x21 and int.from_bytes(raw[14:16], "big") == 36
    # a dual-stack listener reports an IPv4 client as ::ffff:a.b.c.d: unmapped to plain IPv4
    hd, _ = parse_proxy_v2(pp.v2_header(("::ffff:10.0.0.1", 5), ("10.0.0.2", 6)))
    assert hd.src == ("10.0.0.1", 5) and hd.dst == ("10.0.0.2", 6)
    # a true IPv6 client to an IPv4 address: both written as IPv6
    hd, _ = parse_proxy_v2(pp.v2_header(("2001:db8::1", 5), ("10.0.0.2", 6)))
    assert hd.src == ("2001:db8::1", 5) and hd.dst == ("::ffff:10.0.0.2", 6)


def test_tls_tlvs():
    facts = pp.TLSFacts(version="TLSv1.3", cipher="TLS_AES_128_GCM_SHA256", sni="contour.projectcontour.svc",
                        alpn="h2", cert_in_connection=True, cert_in_session=True, verified=True, cn="envoy",
                        uris=("spiffe://cluster.local/ns/projectcontour/sa/envoy", "spiffe://x/y"))
    hd, rest = parse_proxy_v2(pp.v2_header(("127.0.0.1", 40000), ("127.0.0.1", 9443), facts))
    assert rest == b""
    kinds = [k for k, _ in hd.tlvs]
    assert kinds == [0x01, 0x02, 0x20, 0xE0, 0xE0]
    assert hd.first(0x01) == b"h2"
    assert hd.first(0x02) == b"contour.projectcontour.svc"
    assert [v for k, v in hd.tlvs if k == 0xE0] == [b"spiffe://cluster.local/ns/projectcontour/sa/envoy",
                                                    b"spiffe://x/y"]
    ssl = hd.first(0x20)
    assert ssl[0] == 0x07 and ssl[1:5] == b"\x00\x00\x00\x00"
    assert parse_tlvs(ssl[5:]) == [(0x21, b"TLSv1.3"), (0x22, b"envoy"), (0x23, b"TLS_AES_128_GCM_SHA256")]


@pytest.mark.parametrize("facts, client, verify", [
    (pp.TLSFacts(version="TLSv1.3"), 0x01, 1),                                    # no client certificate
    (pp.TLSFacts(cert_in_session=True, verified=True), 0x05, 0),                  # resumed session with one
    (pp.TLSFacts(cert_in_connection=True, cert_in_session=True, verified=False), 0x07, 1),
])
def test_ssl_client_flags_and_verify(facts, client, verify):
    value = parse_tlvs(pp.ssl_tlv(facts))[0][1]
    assert value[0] == client and int.from_bytes(value[1:5], "big") == verify


def test_empty_tls_facts_and_the_local_header():
    hd, _ = parse_proxy_v2(pp.v2_header(("127.0.0.1", 1), ("127.0.0.1", 2), pp.TLSFacts()))
    assert [k for k, _ in hd.tlvs] == [0x20]       # the SSL TLV says "TLS, no client certificate"
    assert pp.local_header() == b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"
    hd, _ = parse_proxy_v2(pp.local_header())
    assert hd.command == 0 and hd.tlvs == []


def test_bad_input_raises_value_error():
    with pytest.raises(ValueError):
        pp.v2_header(("localhost", 1), ("127.0.0.1", 2))     # names are never resolved here
    with pytest.raises(ValueError):
        pp.tlv(0x100, b"")
    with pytest.raises(ValueError, match="too long"):
        pp.tlv(0xE0, b"x" * 70000)
    with pytest.raises(ValueError, match="does not fit"):
        pp.v2_header(("127.0.0.1", 1), ("127.0.0.1", 2), extra_tlvs=[pp.tlv(0xE1, b"x" * 65000)] * 2)
