"""The lean upstream client against h11 itself: same bytes out, same events in (differential).

H1Client speaks the engine's vocabulary (ResponseHead, bytes, End); :class:`Ours` shows it
through h11's event surface, so each comparison below is made on the same events as before."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tlsproxy.http.exchange import End, ResponseHead
from tlsproxy.http.h1client import CLOSED, NEED_DATA, PAUSED, H1Client, UpstreamProtocolError


class Ours:
    """H1Client behind h11's surface (public h11 constructors only)."""

    def __init__(self) -> None:
        self.c = H1Client()

    def __getattr__(self, name):          # our_state, their_state, trailing_data, start_next_cycle
        return getattr(self.c, name)

    def send(self, event) -> bytes:
        if type(event) is h11.Request:
            pairs = zip(event.headers.raw_items(), event.headers, strict=True)
            return self.c.send_head(event.method, event.target, [(r, n, v) for (r, _), (n, v) in pairs])
        if type(event) is h11.Data:
            return bytes(self.c.send_data(event.data))
        return self.c.send_end()

    def receive_data(self, data: bytes) -> None:
        self.c.receive_data(data)

    def next_event(self):
        try:
            ev = self.c.next_event()
        except UpstreamProtocolError as exc:
            raise h11.RemoteProtocolError(str(exc), 502) from None
        if ev is NEED_DATA:
            return h11.NEED_DATA
        if ev is PAUSED:
            return h11.PAUSED
        if ev is CLOSED:
            return h11.ConnectionClosed()
        if type(ev) is End:
            return h11.EndOfMessage(headers=[(n, v) for _, n, v in ev.trailers])
        if type(ev) is ResponseHead:
            cls = h11.InformationalResponse if ev.status < 200 else h11.Response
            return cls(status_code=ev.status, headers=[(r, v) for r, _, v in ev.items], reason=ev.reason,
                       http_version=ev.http_version)
        return h11.Data(data=bytes(ev))


def _request(method=b"GET", body: bytes | None = None, chunked=False, upgrade=False, close=False):
    headers = [(b"Host", b"app"), (b"X-A", b"1")]
    if body is not None and not chunked:
        headers.append((b"Content-Length", str(len(body)).encode()))
    if chunked:
        headers.append((b"Transfer-Encoding", b"chunked"))
    if upgrade:
        headers += [(b"Connection", b"upgrade"), (b"Upgrade", b"websocket")]
    if close:
        headers.append((b"Connection", b"close"))
    return h11.Request(method=method, target=b"/p?q=1", headers=headers)


def _drive(conn, req, body, response: bytes, splits: list[int]):
    out = conn.send(req)
    if body:
        out += conn.send(h11.Data(data=body))
    out += conn.send(h11.EndOfMessage())
    events = []
    pos = 0
    cuts = sorted({min(s, len(response)) for s in splits}) + [len(response)]
    for cut in cuts:
        if cut <= pos:
            continue      # an empty slice would mean EOF
        conn.receive_data(response[pos:cut])
        pos = cut
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA or ev is h11.PAUSED:
                break
            events.append(ev)
            if type(ev) is h11.EndOfMessage or type(ev) is h11.ConnectionClosed:
                break
    if pos >= len(response) and (not events or type(events[-1]) is not h11.EndOfMessage):
        conn.receive_data(b"")
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA or ev is h11.PAUSED:
                break
            events.append(ev)
            if type(ev) in (h11.EndOfMessage, h11.ConnectionClosed):
                break
    return out, events


def _summary(events):
    out = []
    data = b""
    for ev in events:
        if type(ev) is h11.Data:
            data += bytes(ev.data)
            continue
        if data:
            out.append(("data", data))
            data = b""
        if type(ev) in (h11.Response, h11.InformationalResponse):
            out.append((type(ev).__name__, ev.status_code, list(ev.headers)))
        else:
            out.append((type(ev).__name__,))
    if data:
        out.append(("data", data))
    return out


def _response(status, framing, body, extra=()):
    head = [b"HTTP/1.1 %d OK" % status, b"Server: t"] + list(extra)
    if framing == "length":
        head.append(b"Content-Length: %d" % len(body))
        payload = body
    elif framing == "chunked":
        head.append(b"Transfer-Encoding: chunked")
        payload = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (body[:3], body[3:]) if c) + b"0\r\n\r\n"
    else:
        payload = body
    return b"\r\n".join(head) + b"\r\n\r\n" + payload


@settings(max_examples=300, deadline=None)
@given(status=st.sampled_from([200, 201, 204, 304, 404, 500]),
       framing=st.sampled_from(["length", "chunked", "close"]),
       body=st.binary(max_size=200), method=st.sampled_from([b"GET", b"HEAD", b"POST"]),
       req_body=st.one_of(st.none(), st.binary(min_size=1, max_size=50)), chunked_req=st.booleans(),
       splits=st.lists(st.integers(min_value=0, max_value=400), max_size=6), interim=st.booleans())
def test_same_events_as_h11(status, framing, body, method, req_body, chunked_req, splits, interim):
    if status in (204, 304) or method == b"HEAD":
        framing = "length" if framing == "close" else framing
        body = b"" if framing != "length" else body
    resp = _response(status, framing, body)
    if interim:
        resp = b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + resp
    req = _request(method, req_body, chunked=chunked_req and req_body is not None)
    ref_out, ref_events = _drive(h11.Connection(h11.CLIENT), req, req_body, resp, splits)
    ours = Ours()
    out, events = _drive(ours, req, req_body, resp, splits)
    assert out == ref_out
    assert _summary(events) == _summary(ref_events)


def test_keep_alive_cycle_and_must_close():
    c = Ours()
    c.send(_request())
    c.send(h11.EndOfMessage())
    c.receive_data(_response(200, "length", b"hello"))
    assert type(c.next_event()) is h11.Response
    assert c.next_event().data == b"hello"
    assert type(c.next_event()) is h11.EndOfMessage
    assert c.our_state is h11.DONE and c.their_state is h11.DONE
    c.start_next_cycle()
    c.send(_request())
    c.send(h11.EndOfMessage())
    c.receive_data(_response(200, "close", b"x"))
    c.next_event()
    c.receive_data(b"")
    assert [type(c.next_event()), type(c.next_event())] == [h11.Data, h11.EndOfMessage]
    assert c.their_state is h11.MUST_CLOSE


def test_upgrade_switches_and_keeps_trailing_bytes():
    c = Ours()
    c.send(_request(upgrade=True))
    c.send(h11.EndOfMessage())
    assert c.our_state is h11.MIGHT_SWITCH_PROTOCOL
    c.receive_data(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
                   b"\x81\x00")
    ev = c.next_event()
    assert type(ev) is h11.InformationalResponse and ev.status_code == 101
    assert c.their_state is h11.SWITCHED_PROTOCOL
    assert c.trailing_data[0] == b"\x81\x00"


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: a\r\n folded\r\n\r\n",
    b"HTTP/1.1 200 OK\nX: a\n\n",
    b"HTTP/9.9 200 OK\r\n\r\n",
    b"garbage\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabX",
])
def test_malformed_responses_are_protocol_errors(raw):
    c = Ours()
    c.send(_request())
    c.send(h11.EndOfMessage())
    c.receive_data(raw)
    with pytest.raises(h11.RemoteProtocolError):
        for _ in range(10):
            if c.next_event() is h11.NEED_DATA:
                c.receive_data(b"")


def test_body_cut_short_is_an_error_and_eof_before_head_is_closed():
    c = Ours()
    c.send(_request())
    c.send(h11.EndOfMessage())
    c.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    c.next_event()
    c.next_event()
    c.receive_data(b"")
    with pytest.raises(h11.RemoteProtocolError):
        c.next_event()
    d = Ours()
    d.send(_request())
    d.send(h11.EndOfMessage())
    d.receive_data(b"")
    assert type(d.next_event()) is h11.ConnectionClosed


_FIELD_BYTES = st.sampled_from([b"a", b"Z", b"-", b"!", b" ", b"\t", b":", b"\x00", b"\x7f", b"\x80", b"\xff",
                                b"\x0b", b"(", b"\r"])   # bare LF: stricter than h11 on purpose (above)


@settings(max_examples=500, deadline=None)
@given(fields=st.lists(st.tuples(st.lists(_FIELD_BYTES, max_size=6).map(b"".join),
                                 st.lists(_FIELD_BYTES, max_size=8).map(b"".join)), max_size=4))
def test_header_lines_are_split_as_h11_does_and_control_characters_refused(fields):
    head = b"HTTP/1.1 200 OK\r\n" + b"".join(n + b":" + v + b"\r\n" for n, v in fields) + \
        b"Content-Length: 0\r\n\r\n"

    def parse(conn):
        conn.send(_request())
        conn.send(h11.EndOfMessage())
        conn.receive_data(head)
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            return "error"
        if type(event) is not h11.Response:
            return type(event).__name__
        return [(n, v) for n, v in event.headers]

    ours, theirs = parse(Ours()), parse(h11.Connection(h11.CLIENT))
    if any(c in n + v for n, v in fields for c in b"\x00\x0b\x7f\r"):
        assert ours == "error"    # control characters: RFC 9110 §5.5 says no; h11 lets some through
    elif any(n[:1] in (b" ", b"\t") for n, _ in fields):
        assert ours == "error"    # obs-fold: RFC 9112 §5.2 lets us refuse it; h11 unfolds
    else:
        assert ours == theirs
