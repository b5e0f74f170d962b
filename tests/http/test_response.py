"""The response writer against h11's own server side: same bytes, same keep-alive (differential)."""

from __future__ import annotations

import h11
import pytest
from h11._headers import Headers
from hypothesis import given, settings
from hypothesis import strategies as st

from tlsproxy.http.response import FramingError, ResponseWriter, informational_head


def _h11_side(method: bytes, version: bytes, req_connection: bytes | None):
    conn = h11.Connection(h11.SERVER)
    head = b"%s /p HTTP/%s\r\nHost: app\r\n" % (method, version)
    if req_connection is not None:
        head += b"Connection: %s\r\n" % req_connection
    conn.receive_data(head + b"\r\n")
    req = conn.next_event()
    assert type(req) is h11.Request
    assert type(conn.next_event()) is h11.EndOfMessage
    return conn


def _items(headers):
    return [(name, name.lower(), value) for name, value in headers]


@settings(max_examples=400, deadline=None)
@given(method=st.sampled_from([b"GET", b"HEAD", b"POST", b"DELETE"]),
       version=st.sampled_from([b"1.1", b"1.0"]),
       req_connection=st.sampled_from([None, b"close", b"keep-alive", b"Keep-Alive, foo"]),
       status=st.sampled_from([200, 201, 204, 301, 304, 404, 500, 503]),
       body=st.lists(st.binary(min_size=1, max_size=40), max_size=4),
       length=st.booleans(), chunked=st.booleans(),
       resp_connection=st.sampled_from([None, b"close", b"keep-alive", b"upgrade, close"]),
       engine_close=st.booleans())
def test_bytes_and_keep_alive_match_h11(method, version, req_connection, status, body, length, chunked,
                                        resp_connection, engine_close):
    bodiless = method == b"HEAD" or status in (204, 304)
    if bodiless:
        body = []
    headers = [(b"Server", b"app"), (b"Content-Type", b"text/plain")]
    if length:
        headers.append((b"Content-Length", str(sum(map(len, body))).encode()))
    if chunked:
        headers.append((b"Transfer-Encoding", b"chunked"))
    if resp_connection is not None:
        headers.append((b"Connection", resp_connection))
    if engine_close:      # what the engine appends when draining
        headers.append((b"Connection", b"close"))
    items = _items(headers)

    conn = _h11_side(method, version, req_connection)
    want = bytearray(conn.send(h11.Response(status_code=status, headers=Headers(items), reason=b"R",
                                            _parsed=True)))
    for chunk in body:
        want += conn.send(h11.Data(data=chunk))
    want += conn.send(h11.EndOfMessage())
    h11_keep = conn.our_state is h11.DONE and conn.their_state is h11.DONE

    w = ResponseWriter()
    got = bytearray(w.head(status, b"R", list(items), request_method=method, client_http11=version == b"1.1",
                           client_keep_alive=conn.their_http_version == b"1.1" and (
                               req_connection is None or b"close" not in req_connection.lower())))
    for chunk in body:
        for part in w.data(chunk):
            got += part
    got += w.end()
    assert bytes(got) == bytes(want)
    assert w.keep_alive == h11_keep


def test_informational_head_matches_h11():
    conn = _h11_side(b"GET", b"1.1", None)
    items = _items([(b"Link", b"</a.css>; rel=preload"), (b"Host", b"x")])
    want = conn.send(h11.InformationalResponse(status_code=103, headers=Headers(items), reason=b"Early Hints",
                                               _parsed=True))
    assert informational_head(103, b"Early Hints", items) == want


def test_a_body_that_breaks_its_content_length_is_refused_not_written():
    w = ResponseWriter()
    w.head(200, b"OK", _items([(b"Content-Length", b"5")]), request_method=b"GET", client_http11=True,
           client_keep_alive=True)
    list(w.data(b"abc"))
    with pytest.raises(FramingError):
        list(w.data(b"def"))
    w = ResponseWriter()
    w.head(200, b"OK", _items([(b"Content-Length", b"5")]), request_method=b"GET", client_http11=True,
           client_keep_alive=True)
    list(w.data(b"abc"))
    with pytest.raises(FramingError):
        w.end()
    w = ResponseWriter()
    w.head(204, b"No Content", [], request_method=b"GET", client_http11=True, client_keep_alive=True)
    with pytest.raises(FramingError):
        list(w.data(b"x"))
