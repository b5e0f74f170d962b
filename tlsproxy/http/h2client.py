"""The client side of an upstream HTTP/2 connection (``h2c://``, prior knowledge), sans-IO.

Theory of operation
-------------------
One upstream connection carries many exchanges at once, one per HTTP/2 stream. The ``h2`` library
(python-hyper, sans-IO like h11) owns the connection's state: HPACK tables, stream states, flow
control windows. This module adds the two translations the engine needs and nothing else:

* :class:`H2Core` wraps one ``h2.connection.H2Connection``: ``start()`` gives the preface and our
  settings, ``receive(bytes)`` gives the events sorted by stream (and the connection's own:
  settings, GOAWAY, ping acks), ``open_stream``/``send_body``/``finish`` turn an exchange's request
  events into frames, ``outgoing()`` is what to write next. It never waits: the I/O shell
  (``h2pool.py``) decides when to write and when a stream must wait for window.
* :class:`StreamCodec` is the per-stream view the engine drives, with the surface of
  :class:`~.h1client.H1Client` (``send_head``/``send_data``/``send_end``, ``receive_data``/
  ``next_event``): the send calls *record* the head and the end (they go out when the shell
  flushes, so a bodiless request is one HEADERS frame with END_STREAM, and a body's DATA frames
  always precede its end); ``receive_data`` takes the h2 events the connection's reader delivered
  for this stream, and ``next_event`` turns them into the exchange's events:
  :class:`~.exchange.ResponseHead` (1xx included), body ``bytes``, :class:`~.exchange.End` with the
  app's trailers.

Header mapping, both ways (RFC 9113 §8.2.2, §8.3): the request line and ``Host`` become
``:method``, ``:scheme`` (``http``: the leg is cleartext), ``:authority``, ``:path``; connection-
specific fields (``Connection``, ``Keep-Alive``, ``Proxy-Connection``, ``Transfer-Encoding``,
``Upgrade``, ``TE`` other than ``trailers``) never go out. Nor does ``Expect: 100-continue``: the
proxy answers it itself (the codec says its app never sends ``100``), and the stream's window bounds
what an app that does not want the body receives. A response's ``:status`` becomes the
status and its standard reason phrase (HTTP/2 has none). An HTTP/1.1 upgrade (WebSocket) cannot be
carried: a bodiless one (a WebSocket handshake) is refused with an
:class:`~tlsproxy.errors.UpstreamError` (502, said plainly); on a request with a body the Upgrade
is ignored, as RFC 9110 §7.8 allows.
"""

from __future__ import annotations

from collections import deque
from http import HTTPStatus

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import h11

from ..errors import UpstreamError
from .exchange import End, ResponseHead, Triple
from .h1client import NEED_DATA, PAUSED  # the same sentinels: the engine compares by identity

# Our receive windows. Per stream: what an app may send ahead of a slow client (the memory one
# stream may hold); 256 KiB keeps a 64 MiB transfer at loopback speed (the window is reopened as the
# engine takes the data). The connection's window is large: a slow stream must not hold the window
# of the others (a stream's own window bounds it), as Go and grpc-go size theirs.
STREAM_WINDOW = 256 * 1024
CONNECTION_WINDOW = 64 * 1024 * 1024
MAX_STREAMS = 100                   # per connection, even when the app allows more (nginx, Envoy: 100)
MAX_RESPONSE_HEAD = 64 * 1024       # the decoded response header list, as h1client.MAX_RESPONSE_HEAD

_CONNECTION_SPECIFIC = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                                  b"upgrade", b"host", b"http2-settings", b"expect"})


class H2ConnectionError(Exception):
    """The upstream broke the HTTP/2 protocol: the connection is unusable."""


def request_headers(method: bytes, target: bytes, items) -> tuple[list[tuple[bytes, bytes]], bool]:
    """The HTTP/2 header list of a request head (pseudo-headers first); True when it asks to upgrade."""
    authority = b""
    fields: list[tuple[bytes, bytes]] = []
    upgrade = False
    for _raw, name, value in items:
        if name == b"host":
            authority = value
        elif name == b"upgrade":
            upgrade = True
        elif name == b"te":
            if value.strip().lower() == b"trailers":
                fields.append((b"te", b"trailers"))
        elif name not in _CONNECTION_SPECIFIC:
            fields.append((name, value))
    head = [(b":method", method), (b":scheme", b"http"), (b":authority", authority), (b":path", target)]
    if method == b"CONNECT":
        head = [(b":method", method), (b":authority", authority or target)]
    return head + fields, upgrade


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


def response_head(headers) -> ResponseHead:
    status = 0
    items: list[Triple] = []
    for name, value in headers:
        if name == b":status":
            status = int(value)
        elif not name.startswith(b":"):
            items.append((name, name, value))
    return ResponseHead(status, _reason(status), items, b"2")


def _trailers(headers) -> tuple[Triple, ...]:
    return tuple((n, n, v) for n, v in headers if not n.startswith(b":"))


class StreamCodec:
    """One exchange on an HTTP/2 connection, with :class:`~.h1client.H1Client`'s surface. See the
    module docstring."""

    __slots__ = ("our_state", "their_state", "head", "end", "events", "trailers", "http10", "upgrade")

    def __init__(self) -> None:
        self.our_state = h11.IDLE
        self.their_state = h11.IDLE
        self.head: list[tuple[bytes, bytes]] | None = None   # recorded, not yet given to h2
        self.end: tuple[Triple, ...] | None = None           # the request's end, recorded
        self.events: deque = deque()
        self.trailers: tuple[Triple, ...] = ()
        # "The app never sends 100 Continue": Expect is not passed on, so the engine answers a
        # client's Expect: 100-continue itself at once; the stream's flow-control window is what
        # bounds how much of an unwanted body the app receives (as Envoy does by default).
        self.http10 = True
        self.upgrade = False

    # ------------------------------------------------------------------ sending (recorded)
    def send_head(self, method: bytes, target: bytes, items) -> bytes:
        if self.our_state is not h11.IDLE:
            raise h11.LocalProtocolError("a request is already in progress")
        self.head, self.upgrade = request_headers(method, target, items)
        # A bodiless upgrade (a WebSocket handshake) is refused plainly; on a request with a body
        # the Upgrade is ignored (RFC 9110 §7.8 allows it) and the request goes as it is.
        if self.upgrade and not any(n in (b"content-length", b"transfer-encoding") for _r, n, _v in items):
            raise UpstreamError("protocol", "an HTTP/1.1 upgrade (WebSocket) cannot be forwarded to an "
                                "h2c:// upstream")
        self.our_state = h11.SEND_BODY
        self.their_state = h11.SEND_RESPONSE
        return b""

    def send_data(self, data: bytes | bytearray) -> bytes | bytearray:
        if self.our_state is not h11.SEND_BODY:
            raise h11.LocalProtocolError("not sending a body")
        return data                  # the shell sends it as DATA frames, within the windows

    def send_end(self, trailers: tuple[Triple, ...] = ()) -> bytes:
        if self.our_state is not h11.SEND_BODY:
            raise h11.LocalProtocolError("not sending a body")
        self.end = trailers
        self.our_state = h11.DONE
        return b""

    # ------------------------------------------------------------------ receiving
    def receive_data(self, events) -> None:
        """What the connection's reader delivered for this stream (h2 events)."""
        self.events.extend(events)

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        return b"", False            # a stream has no bytes beyond its response

    def next_event(self):
        events = self.events
        while events:
            ev = events.popleft()
            if isinstance(ev, h2.events.DataReceived):
                if ev.data:
                    return ev.data
            elif isinstance(ev, h2.events.ResponseReceived):
                self.their_state = h11.SEND_BODY
                return response_head(ev.headers)
            elif isinstance(ev, h2.events.InformationalResponseReceived):
                return response_head(ev.headers)
            elif isinstance(ev, h2.events.TrailersReceived):
                self.trailers = _trailers(ev.headers)
            elif isinstance(ev, h2.events.StreamEnded):
                self.their_state = h11.DONE
                return End(self.trailers)
        return PAUSED if self.their_state is h11.DONE else NEED_DATA

    def start_next_cycle(self) -> None:
        raise h11.LocalProtocolError("an HTTP/2 stream carries one exchange")


class H2Core:
    """One upstream HTTP/2 connection's state, sans-IO. See the module docstring."""

    def __init__(self) -> None:
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None))
        self.goaway_last_id: int | None = None      # the app's GOAWAY: streams above it were not served
        self.goaway_error: str = ""
        self._first: bytes | None = b""             # the server preface, until it is seen

    def start(self) -> None:
        conn = self.conn
        conn.initiate_connection()
        conn.update_settings({
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_RESPONSE_HEAD,
        })
        conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)

    def outgoing(self) -> bytes:
        return self.conn.data_to_send()

    @property
    def max_streams(self) -> int:
        return max(1, min(MAX_STREAMS, self.conn.remote_settings.max_concurrent_streams))

    @property
    def open(self) -> bool:
        return self.goaway_last_id is None

    def receive(self, data: bytes) -> tuple[dict[int, list], list]:
        """Feed bytes; returns (events by stream id, connection events). Raises H2ConnectionError."""
        if self._first is not None:
            # RFC 9113 §3.4: the server's preface is a SETTINGS frame. Anything else (an HTTP/1.1
            # server's "HTTP/1.1 400") is refused at once, not after a frame length of megabytes.
            self._first += data
            if len(self._first) < 4:
                return {}, []
            if self._first[3] != 0x4:
                raise H2ConnectionError("its first bytes are not an HTTP/2 SETTINGS frame: "
                                        f"{self._first[:16]!r}")
            data, self._first = self._first, None
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            raise H2ConnectionError(f"HTTP/2 protocol error from the upstream: {exc}") from None
        streams: dict[int, list] = {}
        conn_events = []
        for ev in events:
            sid = getattr(ev, "stream_id", 0)
            if isinstance(ev, h2.events.ConnectionTerminated):
                self.goaway_last_id = ev.last_stream_id if ev.last_stream_id is not None else 0
                self.goaway_error = _error_name(ev.error_code)
                conn_events.append(ev)
            elif sid:
                streams.setdefault(sid, []).append(ev)
            else:
                conn_events.append(ev)
        return streams, conn_events

    def open_stream(self, codec: StreamCodec, body_follows: bool) -> int:
        """Send the recorded head (with END_STREAM when the end is recorded, without trailers, and
        no body data follows)."""
        sid = self.conn.get_next_available_stream_id()
        end_now = not body_follows and codec.end is not None and not codec.end
        self.conn.send_headers(sid, codec.head, end_stream=end_now)
        codec.head = None
        if end_now:
            codec.end = None
        return sid

    def window(self, sid: int) -> int:
        return min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)

    def send_body(self, sid: int, data) -> None:
        self.conn.send_data(sid, data)

    def finish(self, sid: int, trailers: tuple[Triple, ...]) -> None:
        if trailers:
            self.conn.send_headers(sid, [(n, v) for _raw, n, v in trailers], end_stream=True)
        else:
            self.conn.end_stream(sid)

    def consumed(self, sid: int, n: int) -> None:
        """The engine took ``n`` flow-controlled bytes of ``sid``: reopen the windows."""
        if n:
            try:
                self.conn.acknowledge_received_data(n, sid)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                pass

    def reset(self, sid: int) -> None:
        try:
            self.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass

    def ping(self, opaque: bytes) -> None:
        self.conn.ping(opaque)

    def close(self) -> None:
        try:
            self.conn.close_connection()
        except h2.exceptions.ProtocolError:
            pass


def _error_name(code) -> str:
    try:
        return h2.errors.ErrorCodes(code).name
    except ValueError:
        return str(code)
