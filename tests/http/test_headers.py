"""Pure header logic, table-driven: no sockets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tlsproxy.errors import HTTPError
from tlsproxy.http import headers as hdr

FACTS = hdr.ForwardFacts(b"10.0.0.9", b"https", b"443")


def triples(*pairs: tuple[str, str]) -> list[tuple[bytes, bytes, bytes]]:
    return [(k.encode(), k.lower().encode(), v.encode()) for k, v in pairs]


def as_dict(items) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for _raw, name, value in items:
        out.setdefault(name.decode(), []).append(value.decode())
    return out


def test_rewrite_adds_forwarded_and_drops_hop_by_hop():
    items = triples(("Host", "api.example:8443"), ("Connection", "keep-alive, X-Private"),
                    ("X-Private", "s"), ("Keep-Alive", "5"), ("TE", "trailers"), ("Upgrade", "h2c"),
                    ("X-Forwarded-For", "1.2.3.4"), ("X-Forwarded-Proto", "http"), ("Expect", "100-continue"),
                    ("Accept", "*/*"))
    out, rid, upgrade = hdr.rewrite_request(items, FACTS)
    d = as_dict(out)
    assert upgrade is None   # Upgrade without "upgrade" in Connection is not an upgrade request
    for gone in ("connection", "x-private", "keep-alive", "te", "upgrade", "expect"):
        assert gone not in d
    assert d["host"] == ["api.example:8443"]
    assert d["x-forwarded-for"] == ["1.2.3.4, 10.0.0.9"]
    assert d["x-forwarded-proto"] == ["https"]
    assert d["x-forwarded-host"] == ["api.example:8443"]
    assert d["x-forwarded-port"] == ["8443"]
    assert d["x-request-id"] == [rid.decode()] and len(rid) == 32
    assert d["accept"] == ["*/*"]


def test_rewrite_keeps_upgrade_for_websocket():
    items = triples(("Host", "h"), ("Connection", "Upgrade"), ("Upgrade", "websocket"),
                    ("Sec-WebSocket-Key", "k"))
    out, _rid, upgrade = hdr.rewrite_request(items, FACTS)
    d = as_dict(out)
    assert upgrade == b"websocket"
    assert d["connection"] == ["upgrade"] and d["upgrade"] == ["websocket"]
    assert d["sec-websocket-key"] == ["k"]


@pytest.mark.parametrize("rid,kept", [("abc-123", True), ("x" * 200, True), ("x" * 201, False),
                                      ("has space", False), ("", False)])
def test_request_id_kept_only_when_sane(rid, kept):
    _out, got, _ = hdr.rewrite_request(triples(("Host", "h"), ("X-Request-Id", rid)), FACTS)
    assert (got == rid.encode()) is kept


def test_client_identity_headers_always_stripped_and_ours_added():
    facts = hdr.ForwardFacts(b"1.1.1.1", client_cert_headers=((b"X-Forwarded-Client-Cert", b"Hash=ab"),))
    items = triples(("Host", "h"), ("X-Forwarded-Client-Cert", "Hash=evil"), ("Client-Cert", ":x:"),
                    ("Client-Cert-Chain", ":y:"))
    d = as_dict(hdr.rewrite_request(items, facts)[0])
    assert d["x-forwarded-client-cert"] == ["Hash=ab"]
    assert "client-cert" not in d and "client-cert-chain" not in d


def test_host_override_for_outbound():
    d = as_dict(hdr.rewrite_request(triples(("Host", "localhost:15001")), FACTS,
                                    host_override=b"peer.ns.svc:8443")[0])
    assert d["host"] == ["peer.ns.svc:8443"]


def test_port_from_host_forms():
    for host, port in (("a", "443"), ("a:81", "81"), ("[::1]:82", "82"), ("[::1]", "443")):
        d = as_dict(hdr.rewrite_request(triples(("Host", host)), FACTS)[0])
        assert d["x-forwarded-port"] == [port], host


def test_response_rewrite():
    items = triples(("Content-Type", "x"), ("Connection", "close, X-Y"), ("X-Y", "1"), ("Keep-Alive", "t"),
                    ("Transfer-Encoding", "chunked"))
    assert as_dict(hdr.rewrite_response(items)) == {"content-type": ["x"]}
    up = triples(("Connection", "Upgrade"), ("Upgrade", "websocket"), ("Sec-WebSocket-Accept", "a"))
    assert as_dict(hdr.rewrite_response(up, upgrade=True)) == {
        "connection": ["Upgrade"], "upgrade": ["websocket"], "sec-websocket-accept": ["a"]}


@pytest.mark.parametrize("head,ok", [
    (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", True),
    (b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", True),          # leading empty line is allowed
    (b"GET / HTTP/1.1\nHost: a\r\n\r\n", False),
    (b"GET / HTTP/1.1\r\nHost: a\n\n", False),
    (b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n", False),
    (b"GET / HTTP/1.1\r\nX: a\r\n\tb\r\n\r\n", False),
])
def test_raw_head_checks(head, ok):
    end = hdr.find_head_end(head)
    assert end == len(head)
    assert (hdr.check_raw_head(head[:end]) is None) is ok


@pytest.mark.parametrize("method,target,version,headers,status", [
    (b"GET", b"/", b"2.0", [(b"host", b"a")], 505),
    (b"GET", b"/", b"1.1", [], 400),
    (b"GET", b"/", b"1.1", [(b"host", b"a"), (b"host", b"a")], 400),
    (b"POST", b"/", b"1.1", [(b"host", b"a"), (b"content-length", b"1"), (b"transfer-encoding", b"chunked")],
     400),
    (b"CONNECT", b"a:443", b"1.1", [(b"host", b"a")], 405),
    (b"GET", b"relative", b"1.1", [(b"host", b"a")], 400),
])
def test_check_request_refusals(method, target, version, headers, status):
    with pytest.raises(HTTPError) as info:
        hdr.check_request(method, target, version, headers)
    assert info.value.status == status


def test_check_request_accepts_normal_forms():
    hdr.check_request(b"GET", b"/x?y", b"1.1", [(b"host", b"a")])
    hdr.check_request(b"GET", b"/", b"1.0", [])
    hdr.check_request(b"OPTIONS", b"*", b"1.1", [(b"host", b"a")])


def test_error_response_is_complete():
    raw = hdr.error_response(502, "upstream failed")
    head, body = raw.split(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 Bad Gateway")
    assert b"content-length: %d" % len(body) in head
    assert b"connection: close" in head
    assert body == b"upstream failed\n"


_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12)
_value = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e), min_size=0, max_size=30)


@given(st.lists(st.tuples(_token, _value), max_size=15))
def test_rewrite_never_leaks_hop_by_hop_or_identity(pairs):
    items = triples(("Host", "h"), *pairs)
    out, rid, upgrade = hdr.rewrite_request(items, FACTS)
    names = [name for _raw, name, _v in out]
    named = set()
    for _raw, name, value in items:
        if name == b"connection":
            named |= {t.strip().lower() for t in value.split(b",")}
    for name in names:
        if name in (b"connection", b"upgrade"):
            assert upgrade is not None
            continue
        assert name not in hdr.HOP_BY_HOP
        assert name not in named or name in (b"host", b"x-forwarded-for", b"x-forwarded-proto",
                                             b"x-forwarded-host", b"x-forwarded-port", b"x-request-id")
    assert names.count(b"x-forwarded-for") == 1 and names.count(b"x-request-id") == 1
    assert b"x-forwarded-client-cert" not in names
