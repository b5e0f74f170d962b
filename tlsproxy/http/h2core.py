"""The sans-IO core of an HTTP/2 client connection: bytes in, stream events and verdicts out.

Theory of operation
-------------------
The ``h2`` library (python-hyper, sans-IO like h11) speaks the protocol: frames, HPACK, stream
states, flow-control accounting. :class:`H2Core` wraps one ``h2.connection.H2Connection`` with what
a proxy adds, and does no I/O:

* **settings**: ``MAX_CONCURRENT_STREAMS``, ``INITIAL_WINDOW_SIZE`` (the per-stream receive window:
  what one stream may buffer here), ``MAX_HEADER_LIST_SIZE`` (``--max-head-size``, enforced by h2's
  HPACK decoder), never ``ENABLE_CONNECT_PROTOCOL`` (so browsers open an HTTP/1.1 connection for a
  WebSocket, docs/http2.md);
* **a frame scanner** (:class:`FrameScanner`) that reads the frame headers of every byte *before*
  h2 buffers them, so the defences h2 leaves to its user hold whatever h2 does: the size of one
  header block across CONTINUATION frames, and per-second budgets for RST_STREAM (rapid reset,
  CVE-2023-44487) and for frames that cost us work but carry nothing (SETTINGS, PING, PRIORITY,
  empty DATA). A budget exceeded is a :class:`Refusal`: the shell sends GOAWAY
  ``ENHANCE_YOUR_CALM`` and closes;
* **request heads** (:func:`request_head`): pseudo-headers → method, target and Host; cookies
  joined (RFC 9113 §8.2.3); connection-specific fields refused (h2 validates them too);
* **flow control**: the connection window is given back as data arrives (each stream's window
  already bounds what it may buffer); a stream's window only when the exchange passed its data on
  (:meth:`H2Core.consumed`), so a slow app slows that stream and no other.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import GoAwayFrame

from ..errors import HTTPError
from . import headers as hdr
from .exchange import End, Triple

PREFACE_LEN = 24              # b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PING, CONTINUATION = 0, 1, 2, 3, 4, 6, 9
FLAG_ACK, FLAG_END_STREAM, FLAG_END_HEADERS = 0x1, 0x1, 0x4
# Connection-specific fields (RFC 9113 §8.2.2): never sent over HTTP/2, never taken from it.
CONNECTION_SPECIFIC = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                                 b"upgrade"})
_REQUEST_PSEUDO = frozenset({b":method", b":path", b":scheme", b":authority"})
ENHANCE_YOUR_CALM = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


@dataclass(frozen=True)
class H2Limits:
    """The HTTP/2 settings and defences of one listener (flags ``--h2-*``, docs/http2.md)."""

    max_concurrent_streams: int = 100        # RFC 9113 §6.5.2 recommends ≥ 100; nginx, Go: 100-250
    stream_window_bytes: int = 256 * 1024    # per-stream receive window: what one stream may buffer here
    connection_window_bytes: int = 1024 * 1024   # given back as data arrives (streams bound the memory)
    max_header_list_bytes: int = 32 * 1024   # decoded header list: --max-head-size
    max_header_block_bytes: int = 64 * 1024  # encoded header block, HEADERS + CONTINUATION frames
    max_resets_per_s: int = 100              # RST_STREAM frames per second (rapid reset)
    max_control_frames_per_s: int = 100      # SETTINGS, PING, PRIORITY and empty DATA frames per second


class Refusal(Exception):
    """The client broke a defence: GOAWAY ``ENHANCE_YOUR_CALM`` (or ``code``) and close."""

    def __init__(self, defence: str, reason: str, code: int = ENHANCE_YOUR_CALM) -> None:
        super().__init__(reason)
        self.defence = defence       # metric label
        self.reason = reason
        self.code = code


class _Budget:
    """Events per one-second window."""

    __slots__ = ("limit", "count", "window")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self.window = 0.0

    def spend(self, now: float) -> bool:
        if now - self.window >= 1.0:
            self.window, self.count = now, 0
        self.count += 1
        return self.count <= self.limit


class FrameScanner:
    """Reads frame headers off the byte stream (after the preface) without buffering frames."""

    __slots__ = ("limits", "_skip", "_hdr", "_block", "_resets", "_control", "clock")

    def __init__(self, limits: H2Limits, clock=time.monotonic) -> None:
        self.limits = limits
        self._skip = PREFACE_LEN     # payload bytes (or the preface) still to pass over
        self._hdr = b""              # a frame header split across reads
        self._block = -1             # bytes of the header block in progress (-1: none)
        self._resets = _Budget(limits.max_resets_per_s)
        self._control = _Budget(limits.max_control_frames_per_s)
        self.clock = clock

    def scan(self, data: bytes) -> None:
        """Account for ``data``; raise :class:`Refusal` when a defence trips."""
        i, n = 0, len(data)
        while i < n:
            if self._skip:
                step = min(self._skip, n - i)
                self._skip -= step
                i += step
                continue
            need = 9 - len(self._hdr)
            self._hdr += data[i:i + need]
            i += need
            if len(self._hdr) < 9:
                return
            h, self._hdr = self._hdr, b""
            self._frame(int.from_bytes(h[0:3], "big"), h[3], h[4])

    def _frame(self, length: int, ftype: int, flags: int) -> None:
        self._skip = length
        lim = self.limits
        if ftype == HEADERS or (ftype == CONTINUATION and self._block >= 0):
            self._block = (0 if ftype == HEADERS else self._block) + length
            if self._block > lim.max_header_block_bytes:
                raise Refusal("header_block", f"header block over {lim.max_header_block_bytes} bytes "
                              "(HEADERS + CONTINUATION)")
            if flags & FLAG_END_HEADERS:
                self._block = -1
            return
        if ftype == RST_STREAM:
            if not self._resets.spend(self.clock()):
                raise Refusal("rapid_reset", f"more than {lim.max_resets_per_s} stream resets in a second")
            return
        control = ((ftype in (SETTINGS, PING) and not flags & FLAG_ACK) or ftype == PRIORITY
                   or (ftype == DATA and length == 0 and not flags & FLAG_END_STREAM))
        if control and not self._control.spend(self.clock()):
            kind = {SETTINGS: "settings_flood", PING: "ping_flood", PRIORITY: "priority_flood"}.get(
                ftype, "empty_data_flood")
            raise Refusal(kind, f"more than {lim.max_control_frames_per_s} SETTINGS/PING/PRIORITY/"
                          "empty DATA frames in a second")


# ---------------------------------------------------------------------------- events out

class Request:
    __slots__ = ("stream_id", "method", "target", "items", "ended", "grpc", "te_trailers")

    def __init__(self, stream_id: int, method: bytes, target: bytes, items: list[Triple], ended: bool,
                 grpc: bool, te_trailers: bool) -> None:
        self.stream_id = stream_id
        self.method = method
        self.target = target
        self.items = items
        self.ended = ended
        self.grpc = grpc
        self.te_trailers = te_trailers


class Data:
    __slots__ = ("stream_id", "data", "flow_len")

    def __init__(self, stream_id: int, data: bytes, flow_len: int) -> None:
        self.stream_id = stream_id
        self.data = data
        self.flow_len = flow_len


class Ended:
    __slots__ = ("stream_id", "end")

    def __init__(self, stream_id: int, end: End) -> None:
        self.stream_id = stream_id
        self.end = end


class Reset:
    __slots__ = ("stream_id", "code")

    def __init__(self, stream_id: int, code: int) -> None:
        self.stream_id = stream_id
        self.code = code


class Window:
    """The client opened a send window (``stream_id`` 0: the connection's, or a settings change)."""

    __slots__ = ("stream_id",)

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class GoneAway:
    __slots__ = ("code",)

    def __init__(self, code: int) -> None:
        self.code = code


class BadRequest:
    """A malformed request head: the stream is answered with ``error`` (a 4xx), the connection lives."""

    __slots__ = ("stream_id", "error", "method", "target")

    def __init__(self, stream_id: int, error: HTTPError, method: bytes, target: bytes) -> None:
        self.stream_id = stream_id
        self.error = error
        self.method = method
        self.target = target


def request_head(headers: list[tuple[bytes, bytes]]) -> tuple[bytes, bytes, list[Triple], bool]:
    """``(method, target, fields with Host first, te_trailers)`` from a decoded HTTP/2 header list.
    Raises HTTPError (400) for a malformed one (RFC 9113 §8.3)."""
    pseudo: dict[bytes, bytes] = {}
    items: list[Triple] = []
    cookies: list[bytes] = []
    te_trailers = False
    host = None
    for name, value in headers:
        if name.startswith(b":"):
            if items or cookies or name in pseudo:
                raise HTTPError(400, "bad request: misplaced or repeated pseudo-header", kind="h2_pseudo")
            pseudo[name] = value
            continue
        if name in CONNECTION_SPECIFIC:
            raise HTTPError(400, f"bad request: connection-specific field {name.decode()} in HTTP/2",
                            kind="h2_connection_field")
        if name == b"te":
            if value.strip().lower() != b"trailers":
                raise HTTPError(400, "bad request: TE other than trailers in HTTP/2", kind="h2_te")
            te_trailers = True
            continue
        if name == b"cookie":
            cookies.append(value)
            continue
        if name == b"host":
            host = value
            continue
        items.append((name, name, value))
    method = pseudo.get(b":method")
    if method is None:
        raise HTTPError(400, "bad request: no :method", kind="h2_pseudo")
    if method == b"CONNECT":
        raise HTTPError(405, "CONNECT is not supported on this listener", kind="method")
    target = pseudo.get(b":path")
    if not target or b":scheme" not in pseudo or set(pseudo) - _REQUEST_PSEUDO:
        raise HTTPError(400, "bad request: :path, :scheme required; no other pseudo-headers",
                        kind="h2_pseudo")
    authority = pseudo.get(b":authority", host)
    if authority is None:
        raise HTTPError(400, "bad request: missing :authority", kind="host")
    if cookies:      # RFC 9113 §8.2.3: crumbs are joined with "; " for an HTTP/1.1 hop
        items.append((b"cookie", b"cookie", b"; ".join(cookies)))
    items.insert(0, (b"host", b"host", authority))
    return method, target, items, te_trailers


class H2Core:
    """One client connection's HTTP/2 state. See the module docstring."""

    def __init__(self, limits: H2Limits, clock=time.monotonic) -> None:
        self.limits = limits
        config = h2.config.H2Configuration(client_side=False, header_encoding=None,
                                           validate_inbound_headers=True, normalize_inbound_headers=True)
        self.h2 = h2.connection.H2Connection(config=config)
        self.h2.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: limits.stream_window_bytes,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_list_bytes,
        })
        self.h2.initiate_connection()
        extra = limits.connection_window_bytes - 65535
        if extra > 0:
            self.h2.increment_flow_control_window(extra)
        self.scanner = FrameScanner(limits, clock)
        self._conn_unacked = 0
        self._stream_unacked: dict[int, int] = {}
        self.closing = False
        self._out = b""           # frames written here, before what h2 queues next

    # ------------------------------------------------------------------ in
    def receive(self, data: bytes) -> list:
        """Feed bytes from the client; the events they make. Raises :class:`Refusal` (GOAWAY and close)."""
        self.scanner.scan(data)
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.TooManyStreamsError:
            raise Refusal("concurrent_streams", f"more than {self.limits.max_concurrent_streams} "
                          "streams at once, ignoring SETTINGS_MAX_CONCURRENT_STREAMS",
                          h2.errors.ErrorCodes.PROTOCOL_ERROR) from None
        except h2.exceptions.DenialOfServiceError as exc:
            raise Refusal("header_list", f"header list too large: {exc}") from None
        except h2.exceptions.ProtocolError as exc:
            code = getattr(exc, "error_code", h2.errors.ErrorCodes.PROTOCOL_ERROR)
            raise Refusal("protocol", f"protocol error: {exc}", code) from None
        out: list = []
        trailers: dict[int, tuple[Triple, ...]] = {}
        for ev in events:
            t = type(ev)
            if t is h2.events.RequestReceived:
                try:
                    method, target, items, te = request_head(ev.headers)
                except HTTPError as err:
                    out.append(BadRequest(ev.stream_id, err, _pseudo(ev.headers, b":method"),
                                          _pseudo(ev.headers, b":path")))
                    continue
                ctype = hdr.header_value(items, b"content-type") or b""
                out.append(Request(ev.stream_id, method, target, items, ev.stream_ended is not None,
                                   ctype.startswith(b"application/grpc"), te))
            elif t is h2.events.DataReceived:
                self._received(ev.stream_id, ev.flow_controlled_length, len(ev.data))
                out.append(Data(ev.stream_id, ev.data, ev.flow_controlled_length))
            elif t is h2.events.StreamEnded:
                out.append(Ended(ev.stream_id, End(trailers.pop(ev.stream_id, ()))))
            elif t is h2.events.TrailersReceived:    # h2 follows it with StreamEnded
                trailers[ev.stream_id] = tuple((n, n, v) for n, v in ev.headers if not n.startswith(b":"))
            elif t is h2.events.StreamReset:
                self._stream_unacked.pop(ev.stream_id, None)
                out.append(Reset(ev.stream_id, ev.error_code))
            elif t is h2.events.WindowUpdated:
                out.append(Window(ev.stream_id))
            elif t is h2.events.RemoteSettingsChanged:
                out.append(Window(0))       # INITIAL_WINDOW_SIZE or frame size may have changed
            elif t is h2.events.ConnectionTerminated:
                out.append(GoneAway(ev.error_code))
        return out

    def _received(self, stream_id: int, flow_len: int, data_len: int) -> None:
        self._conn_unacked += flow_len
        if self._conn_unacked >= self.limits.connection_window_bytes // 2:
            self.h2.increment_flow_control_window(self._conn_unacked)
            self._conn_unacked = 0
        padding = flow_len - data_len
        if padding:
            self.consumed(stream_id, padding)

    def consumed(self, stream_id: int, n: int) -> None:
        """The exchange passed ``n`` bytes of this stream's body on: its window may reopen."""
        left = self._stream_unacked.get(stream_id, 0) + n
        if left >= self.limits.stream_window_bytes // 4:
            try:
                self.h2.increment_flow_control_window(left, stream_id=stream_id)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                pass              # the stream ended meanwhile: no window to give back
            left = 0
        self._stream_unacked[stream_id] = left

    def forget(self, stream_id: int) -> None:
        self._stream_unacked.pop(stream_id, None)

    # ------------------------------------------------------------------ out
    def send_window(self, stream_id: int) -> int:
        """How many body bytes may go to the client on this stream now (0: wait for a window)."""
        try:
            return min(self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return -1             # the stream is gone (reset by the client)

    def reset(self, stream_id: int, code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        try:
            self.h2.reset_stream(stream_id, code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass
        self.forget(stream_id)

    def goaway(self, code: int = h2.errors.ErrorCodes.NO_ERROR, reason: str = "") -> None:
        """GOAWAY with the last stream id processed: streams above it go elsewhere (RFC 9113 §6.8).

        An error (``code`` not NO_ERROR) ends the connection: h2's ``close_connection``. A graceful
        GOAWAY (drain, idle) must let the streams in flight finish, which h2's ``close_connection``
        forbids (it closes its state machine), so that frame is written here and h2 goes on."""
        if self.closing:
            return
        self.closing = True
        if code != h2.errors.ErrorCodes.NO_ERROR:
            self.h2.close_connection(error_code=code, additional_data=reason.encode()[:256] or None)
            return
        frame = GoAwayFrame(0, last_stream_id=self.h2.highest_inbound_stream_id, error_code=0)
        self._out += self.h2.data_to_send() + frame.serialize()

    def data_to_send(self) -> bytes:
        """Every byte queued for the client, in order."""
        out = self.h2.data_to_send()
        if self._out:
            out, self._out = self._out + out, b""
        return out


def _pseudo(headers, name: bytes) -> bytes:
    for n, v in headers:
        if n == name:
            return v
    return b"-"
