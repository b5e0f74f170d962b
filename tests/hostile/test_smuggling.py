"""Request smuggling and malformed heads (RFC 9112 §2.2, §3, §5, §6.1, §6.3, §7.1) over real TLS.

Every refused request: the expected status, ``connection: close``, the connection closed, and
*not one byte* reaching the app. The basic cases (CL+TE, two CLs, ``gzip, chunked``, obs-fold, bare LF
head, space before colon, HTTP/2.0, HTTP/0.9, no colon, bad chunk size) are in
tests/inbound/test_errors.py; this file covers the variants around them, the ones we accept on
purpose (and what the app then sees), and pipelines that mix good and bad requests.
"""

from __future__ import annotations

import time

import pytest

from tests.hostile.helpers import (
    keepalive_ok,
    parse_responses,
    read_all,
    scripted_upstream,
    status_of,
    tls_socket,
)
from tests.support import make_pki, running_proxy, settings_for

P = b"POST / HTTP/1.1\r\nHost: a\r\n"
TE = b"Transfer-Encoding: chunked\r\n"

REFUSED = [
    # --- CL + TE, the two classic desyncs with a smuggled request in the body
    ("cl_te_smuggle",
     P + b"Content-Length: 6\r\n" + TE + b"\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("te_cl_smuggle", P + TE + b"Content-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n", 400),
    # --- Transfer-Encoding other than a single final chunked (RFC 9112 §6.1)
    ("te_xchunked", P + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 400),
    ("te_chunked_then_identity", P + TE + b"Transfer-Encoding: identity\r\n\r\n0\r\n\r\n", 400),
    ("te_identity", P + b"Transfer-Encoding: identity\r\n\r\n", 400),
    ("te_chunked_twice", P + b"Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n", 400),
    ("te_space_before_colon", P + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400),
    ("te_tab_before_colon", P + b"Transfer-Encoding\t: chunked\r\n\r\n0\r\n\r\n", 400),
    ("te_folded_first_line", P + b" Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("te_in_http10", b"POST / HTTP/1.0\r\nHost: a\r\n" + TE + b"\r\n0\r\n\r\n", 400),
    # --- Content-Length that is not one decimal number (RFC 9110 §8.6)
    ("cl_plus", P + b"Content-Length: +5\r\n\r\nhello", 400),
    ("cl_hex", P + b"Content-Length: 0x5\r\n\r\nhello", 400),
    ("cl_list_differs", P + b"Content-Length: 5, 6\r\n\r\nhello", 400),
    ("cl_negative", P + b"Content-Length: -1\r\n\r\nhello", 400),
    ("cl_overflow", P + b"Content-Length: 99999999999999999999999\r\n\r\nhello", 400),
    ("cl_underscore", P + b"Content-Length: 1_0\r\n\r\nhello", 400),
    # --- chunk sizes and chunk framing (RFC 9112 §7.1)
    ("chunk_plus", P + TE + b"\r\n+5\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk_0x", P + TE + b"\r\n0x5\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk_negative", P + TE + b"\r\n-1\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk_overflow", P + TE + b"\r\nfffffffffffffffffffffff\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk_leading_space", P + TE + b"\r\n 5\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk_data_too_long", P + TE + b"\r\n5\r\nhelloXX\r\n0\r\n\r\n", 400),
    ("chunk_bare_lf_after_data", P + TE + b"\r\n5\r\nhello\n0\r\n\r\n", 400),
    ("chunk_bare_lf_size_lines", P + TE + b"\r\n5\nhello\n0\n\n", 400),
    ("chunk_ext_bare_lf", P + TE + b"\r\n5;a=b\nhello\r\n0\r\n\r\n", 400),
    ("chunk_ext_nul", P + TE + b"\r\n5;a=b\x00c\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk_ext_control", P + TE + b"\r\n5;a\x01=b\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk_ext_nul_unquoted_end", P + TE + b"\r\n5;\x00\r\nhello\r\n0\r\n\r\n", 400),
    # --- line endings and control characters (RFC 9112 §2.2, RFC 9110 §5.5)
    ("bare_cr_line_endings", b"GET / HTTP/1.1\rHost: a\r\r", 400),
    ("bare_lf_request_line_only", b"GET / HTTP/1.1\nHost: a\r\n\r\n", 400),
    ("leading_bare_lf", b"\n\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("nul_in_value", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", 400),
    ("cr_in_value", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n", 400),
    ("ctl_in_name", b"GET / HTTP/1.1\r\nHost: a\r\nX\x01Y: b\r\n\r\n", 400),
    # --- request lines (RFC 9112 §3)
    ("double_space", b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("tab_separator", b"GET\t/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("lowercase_version", b"GET / http/1.1\r\nHost: a\r\n\r\n", 400),
    ("trailing_space", b"GET / HTTP/1.1 \r\nHost: a\r\n\r\n", 400),
    ("version_1_10", b"GET / HTTP/1.10\r\nHost: a\r\n\r\n", 400),
    ("version_3", b"GET / HTTP/3\r\nHost: a\r\n\r\n", 400),
    ("space_in_target", b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("del_in_target", b"GET /\x7f HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("utf8_method", b"G\xc3\x89T / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("relative_target", b"GET a HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("http_1_2", b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", 505),
    ("h2_preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    # --- Host (RFC 9112 §3.2: invalid value → 400)
    ("host_with_space", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
    ("host_with_slash", b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", 400),
    ("host_with_userinfo", b"GET / HTTP/1.1\r\nHost: user@a\r\n\r\n", 400),
    ("host_bad_port", b"GET / HTTP/1.1\r\nHost: a:b\r\n\r\n", 400),
    ("host_missing_in_pipeline", b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", 400),
]


@pytest.fixture(scope="module")
def proxy_and_app(tmp_path_factory):
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    with scripted_upstream(keepalive_ok) as up, running_proxy(settings_for(pki, up.port)) as proxy:
        yield pki, proxy, up


def _exchange(pki, proxy, data: bytes, timeout: float = 5) -> tuple[bytes, str]:
    with tls_socket(proxy.port, pki, timeout) as s:
        s.sendall(data)
        return read_all(s, timeout)


@pytest.mark.parametrize("raw,expected", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_refused_with_close_and_nothing_reaches_the_app(proxy_and_app, raw, expected):
    pki, proxy, up = proxy_and_app
    before = len(up.raw)
    t0 = time.monotonic()
    data, how = _exchange(pki, proxy, raw)
    assert status_of(data) == expected, data[:300]
    assert how == "eof", how
    assert time.monotonic() - t0 < 3          # answered at once, not at a timeout
    head = data.split(b"\r\n\r\n", 1)[0].lower()
    assert b"connection: close" in head
    assert len(up.raw) == before, bytes(up.raw[before:])   # not one byte reached the app


ACCEPTED = [
    # tolerated by RFC 9112 and re-framed by the proxy: the app sees one clean request
    ("te_uppercase", P + b"Transfer-Encoding: CHUNKED\r\n\r\n5\r\nhello\r\n0\r\n\r\n", b"hello"),
    ("te_tab_ows", P + b"Transfer-Encoding:\tchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", b"hello"),
    ("cl_list_same", P + b"Content-Length: 5, 5\r\n\r\nhello", b"hello"),
    ("chunk_ext", P + TE + b"\r\n5;name=value\r\nhello\r\n0\r\n\r\n", b"hello"),
    ("trailer_dropped", P + TE + b"\r\n5\r\nhello\r\n0\r\nContent-Length: 99\r\n\r\n", b"hello"),
    ("cl_body_looks_like_request", P + b"Content-Length: 35\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
     b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"),
]


@pytest.mark.parametrize("raw,body", [c[1:] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_tolerated_variants_reach_the_app_as_one_clean_request(proxy_and_app, raw, body):
    pki, proxy, up = proxy_and_app
    n = len(up.seen)
    data, _ = _exchange(pki, proxy, raw.replace(b"Host: a\r\n", b"Host: a\r\nConnection: close\r\n", 1))
    assert parse_responses(data) == [(200, b"/")], data[:300]
    assert len(up.seen) == n + 1
    req, got = up.seen[-1]
    assert req.target == b"/" and got == body
    names = [name for name, _ in req.headers]
    # one framing header, and it is ours
    assert names.count(b"content-length") + names.count(b"transfer-encoding") == 1
    assert b"/smuggled" not in up.requests


def test_http10_without_host_is_forwarded_with_an_empty_host(proxy_and_app):
    """HTTP/1.0 may omit Host; the upstream leg is HTTP/1.1 and needs one (this used to kill the
    connection without an answer: h11 refused to send the upstream request)."""
    pki, proxy, up = proxy_and_app
    data, how = _exchange(pki, proxy, b"GET /old HTTP/1.0\r\n\r\n")
    assert status_of(data) == 200 and data.endswith(b"/old")
    req, _ = up.seen[-1]
    assert req.target == b"/old" and dict(req.headers)[b"host"] == b""


def test_smuggling_behind_a_good_request_in_one_pipeline(proxy_and_app):
    """A good request, then a smuggling attempt, then another good one, in one write: the first
    is answered, the second refused, the connection closed — the third never runs."""
    pki, proxy, up = proxy_and_app
    n = len(up.seen)
    pipeline = (b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n"
                + P + b"Content-Length: 6\r\n" + TE + b"\r\n0\r\n\r\nX"
                + b"GET /third HTTP/1.1\r\nHost: a\r\n\r\n")
    data, how = _exchange(pki, proxy, pipeline)
    assert how == "eof"
    responses = parse_responses(data)
    assert [r[0] for r in responses] == [200, 400], data
    assert [r.target for r, _ in up.seen[n:]] == [b"/first"]


def test_refusals_are_counted_and_the_proxy_stays_up(proxy_and_app):
    pki, proxy, up = proxy_and_app
    counted = proxy.app.metrics.client_errors.labels("inbound", "400")._value.get()
    assert counted >= 1
    data, _ = _exchange(pki, proxy, b"GET /alive HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert parse_responses(data) == [(200, b"/alive")]


def test_absolute_form_target_wins_over_a_disagreeing_host(proxy_and_app):
    """RFC 9112 §3.2.2: with an absolute-form target the origin uses the target's authority and
    ignores Host. The app gets origin-form and a Host that agrees with it (it used to get the
    absolute URI and the other Host: a routing / cache-key confusion)."""
    pki, proxy, up = proxy_and_app
    data, _ = _exchange(pki, proxy, b"GET http://Other.example:8080/x?y HTTP/1.1\r\nHost: a\r\n"
                                    b"Connection: close\r\n\r\n")
    assert parse_responses(data) == [(200, b"/x?y")], data
    req, _ = up.seen[-1]
    headers = dict(req.headers)
    assert req.target == b"/x?y"
    assert headers[b"host"] == b"Other.example:8080" and headers[b"x-forwarded-host"] == b"Other.example:8080"
    assert [n for n, _ in req.headers].count(b"host") == 1


@pytest.mark.parametrize("target", [b"http://user@a/", b"http:///x", b"https://a b/"])
def test_absolute_form_with_a_bad_authority_is_refused(proxy_and_app, target):
    pki, proxy, up = proxy_and_app
    before = len(up.raw)
    data, how = _exchange(pki, proxy, b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % target)
    assert status_of(data) == 400 and how == "eof", data
    assert len(up.raw) == before
