"""The fast path for common request heads against h11 (differential): whatever
``parse_simple_request`` accepts, h11 parses to the same request; the rest goes to h11."""

from __future__ import annotations

import h11
from hypothesis import given, settings
from hypothesis import strategies as st

from tlsproxy.http.headers import find_head_end, parse_simple_request

_BYTES = st.sampled_from([b"a", b"Z", b"0", b"-", b"/", b"!", b" ", b"\t", b":", b"\x00", b"\x7f", b"\x80",
                          b"\xff", b"\x0b", b"(", b"\r", b";", b"%"])
_text = st.lists(_BYTES, max_size=8).map(b"".join)


def _h11(buf: bytes):
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(buf)
    try:
        req = conn.next_event()
        if type(req) is not h11.Request:
            return None
        end = conn.next_event()
    except h11.RemoteProtocolError:
        return None
    return req, end, conn.trailing_data[0]


@settings(max_examples=800, deadline=None)
@given(method=st.sampled_from([b"GET", b"HEAD", b"DELETE", b"get", b"CONNECT", b"G T", b""]),
       target=st.one_of(st.sampled_from([b"/", b"/a?b=c", b"*", b"http://h/x", b"/\x80", b"/a b", b""]),
                        _text),
       version=st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"http/1.1"]),
       hosts=st.integers(0, 2),
       fields=st.lists(st.tuples(_text, _text), max_size=3),
       special=st.sampled_from([None, b"Content-Length: 0", b"Content-Length: 5",
                                b"Transfer-Encoding: chunked", b"Expect: 100-continue", b"Upgrade: websocket",
                                b"Connection: close"]),
       rest=st.sampled_from([b"", b"GET / HTTP/1.1\r\n", b"xyz"]))
def test_what_the_fast_path_accepts_h11_parses_the_same(method, target, version, hosts, fields, special,
                                                         rest):
    lines = [method + b" " + target + b" " + version]
    lines += [b"Host: example.test:8443"] * hosts
    lines += [name + b":" + value for name, value in fields]
    if special is not None:
        lines.append(special)
    head = b"\r\n".join(lines) + b"\r\n\r\n"
    buf = bytearray(head + rest)
    end = find_head_end(buf)
    assert end == len(head) or b"\n\n" in head or b"\n\r\n" in head[:-3]
    got = parse_simple_request(buf, end)
    if got is None:
        return
    parsed = _h11(bytes(buf))
    assert parsed is not None, "fast path accepted what h11 refuses"
    req, eom, trailing = parsed
    assert (req.method, req.target, req.http_version) == (got[0], got[1], b"1.1")
    pairs = zip(req.headers.raw_items(), req.headers, strict=True)
    assert [(raw, name, value) for (raw, _), (name, value) in pairs] == got[2]
    assert type(eom) is h11.EndOfMessage            # no body: the head is the whole request
    assert trailing == bytes(buf[end:])


def test_the_requests_load_generators_and_apps_send_take_the_fast_path():
    for head in (b"GET /small HTTP/1.1\r\nHost: 127.0.0.1:9443\r\n\r\n",
                 b"GET /x?y=1 HTTP/1.1\r\nHost: a\r\nUser-Agent: curl/7.88\r\nAccept: */*\r\n\r\n",
                 b"DELETE /item/7 HTTP/1.1\r\nhost: a\r\nConnection: close\r\nX-Request-Id: abc\r\n\r\n"):
        got = parse_simple_request(head, find_head_end(head))
        assert got is not None and any(name == b"host" for _, name, _ in got[2]), head


def test_anything_with_a_body_a_switch_or_an_odd_line_goes_to_h11():
    for head in (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\n",
                 b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
                 b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
                 b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n",
                 b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
                 b"GET / HTTP/1.0\r\nHost: a\r\n\r\n",
                 b"GET / HTTP/1.1\r\n\r\n",
                 b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                 b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n folded\r\n\r\n",
                 b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
                 b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n"):
        assert parse_simple_request(head, find_head_end(head)) is None, head
