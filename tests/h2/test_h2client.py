"""The sans-IO core of the h2c upstream leg, directly: header mapping both ways and the per-stream
codec's events, driven by a real h2 server connection (bytes in, bytes out; no sockets)."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import h11
import pytest

from tlsproxy.config import parse_upstream
from tlsproxy.errors import UpstreamError
from tlsproxy.http.exchange import End, ResponseHead
from tlsproxy.http.h2client import NEED_DATA, PAUSED, H2ConnectionError, H2Core, StreamCodec, request_headers


def _t(name: bytes, value: bytes) -> tuple[bytes, bytes, bytes]:
    return (name.title(), name, value)


@pytest.mark.parametrize(("items", "want"), [
    ([_t(b"host", b"a.example:8443"), _t(b"accept", b"*/*")], [(b"accept", b"*/*")]),
    ([_t(b"host", b"a"), _t(b"connection", b"keep-alive"), _t(b"keep-alive", b"5"),
      _t(b"transfer-encoding", b"chunked"), _t(b"proxy-connection", b"x"),
      _t(b"expect", b"100-continue")], []),
    ([_t(b"host", b"a"), _t(b"te", b"trailers")], [(b"te", b"trailers")]),
    ([_t(b"host", b"a"), _t(b"te", b"gzip")], []),
    ([_t(b"host", b"a"), _t(b"content-type", b"application/grpc"), _t(b"content-length", b"5")],
     [(b"content-type", b"application/grpc"), (b"content-length", b"5")]),
])
def test_request_headers(items, want):
    fields, upgrade = request_headers(b"POST", b"/p?q=1", items)
    assert not upgrade
    host = next(v for _r, n, v in items if n == b"host")
    assert fields[:4] == [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", host),
                          (b":path", b"/p?q=1")]
    assert fields[4:] == want


def test_upgrade_is_refused_with_a_clear_upstream_error():
    codec = StreamCodec()
    with pytest.raises(UpstreamError) as err:
        codec.send_head(b"GET", b"/ws", [_t(b"host", b"a"), _t(b"connection", b"upgrade"),
                                         _t(b"upgrade", b"websocket")])
    assert err.value.kind == "protocol" and "WebSocket" in err.value.reason


def _server() -> h2.connection.H2Connection:
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    server.initiate_connection()
    return server


def _pump(core: H2Core, server: h2.connection.H2Connection):
    """Client bytes → server events; server bytes → the core's (stream events, connection events)."""
    events = server.receive_data(core.outgoing())
    return events, core.receive(server.data_to_send())


def test_a_whole_exchange_through_the_codec():
    core, server = H2Core(), _server()
    core.start()
    _pump(core, server)
    codec = StreamCodec()
    assert codec.send_head(b"POST", b"/echo", [_t(b"host", b"app"), _t(b"te", b"trailers")]) == b""
    assert codec.send_data(b"hello") == b"hello"            # the shell sends it as DATA
    assert codec.send_end(((b"X-Sum", b"x-sum", b"5"),)) == b""
    assert codec.our_state is h11.DONE
    sid = core.open_stream(codec, body_follows=True)
    core.send_body(sid, b"hello")
    core.finish(sid, ((b"X-Sum", b"x-sum", b"5"),))
    events, _ = _pump(core, server)
    kinds = [type(e) for e in events if getattr(e, "stream_id", 0) == sid]
    assert kinds == [h2.events.RequestReceived, h2.events.DataReceived, h2.events.TrailersReceived,
                     h2.events.StreamEnded]
    req = next(e for e in events if isinstance(e, h2.events.RequestReceived))
    assert dict(req.headers)[b":authority"] == b"app" and dict(req.headers)[b"te"] == b"trailers"
    server.send_headers(sid, [(b":status", b"103"), (b"link", b"</a>")])
    server.send_headers(sid, [(b":status", b"200"), (b"content-type", b"text/plain")])
    server.send_data(sid, b"world")
    server.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)
    streams, _ = core.receive(server.data_to_send())
    assert codec.next_event() is NEED_DATA
    codec.receive_data(streams[sid])
    early = codec.next_event()
    assert isinstance(early, ResponseHead) and early.status == 103
    head = codec.next_event()
    assert isinstance(head, ResponseHead) and (head.status, head.reason) == (200, b"OK")
    assert head.items == [(b"content-type", b"content-type", b"text/plain")]
    assert codec.next_event() == b"world"
    end = codec.next_event()
    assert isinstance(end, End) and end.trailers == ((b"grpc-status", b"grpc-status", b"0"),)
    assert codec.next_event() is PAUSED and codec.their_state is h11.DONE
    assert codec.trailing_data == (b"", False)


def test_a_bodiless_request_is_one_headers_frame_with_end_stream():
    core, server = H2Core(), _server()
    core.start()
    _pump(core, server)
    codec = StreamCodec()
    codec.send_head(b"GET", b"/", [_t(b"host", b"app")])
    codec.send_end()
    sid = core.open_stream(codec, body_follows=False)
    events, _ = _pump(core, server)
    req = [e for e in events if getattr(e, "stream_id", 0) == sid]
    assert isinstance(req[0], h2.events.RequestReceived) and req[0].stream_ended is not None


def test_goaway_and_garbage():
    core, server = H2Core(), _server()
    core.start()
    _pump(core, server)
    server.close_connection(last_stream_id=0)
    _streams, conn_events = core.receive(server.data_to_send())
    assert not core.open and core.goaway_last_id == 0 and core.goaway_error == "NO_ERROR"
    assert any(isinstance(e, h2.events.ConnectionTerminated) for e in conn_events)
    other = H2Core()
    other.start()
    with pytest.raises(H2ConnectionError) as err:
        other.receive(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
    assert "not an HTTP/2 SETTINGS frame" in str(err.value)
    split = H2Core()                      # a preface split across reads is still a preface
    split.start()
    preface = _server().data_to_send()
    assert split.receive(preface[:2]) == ({}, [])
    _streams, conn_events = split.receive(preface[2:])
    assert any(isinstance(e, h2.events.RemoteSettingsChanged) for e in conn_events)


@pytest.mark.parametrize(("raw", "ok"), [("h2c://127.0.0.1:50051", True), ("h2c://[::1]:8080", True),
                                         ("h2c://app", False), ("h2://127.0.0.1:1", False)])
def test_upstream_h2c_scheme(raw, ok):
    if ok:
        up = parse_upstream(raw)
        assert up.scheme == "h2c" and str(up) == raw
    else:
        with pytest.raises(ValueError):
            parse_upstream(raw)
