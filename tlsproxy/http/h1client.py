"""A lean HTTP/1.1 client state machine for the upstream leg, with h11's surface.

Theory of operation
-------------------
The client side of every proxied request (tlsproxy → app, tlsproxy → peer) used a full
``h11.Connection(h11.CLIENT)``: a second state machine per request that re-validates what the
proxy itself just built and runs a dozen generic transitions per exchange. The profile put h11 at
about a third of the CPU per small request. This class does the same job for the one pattern the
proxy uses — one request, then its response, then maybe the next — with the same methods and
event types, so the forwarding engine does not know which it holds:

* ``send(Request | Data | EndOfMessage)`` → bytes. The request head is written as given (the
  proxy built it from a head h11 already validated on the client side); the body is framed by the
  request's own ``Content-Length`` or ``Transfer-Encoding: chunked``.
* ``receive_data(bytes)`` / ``next_event()`` → ``InformationalResponse``, ``Response``, ``Data``,
  ``EndOfMessage``, ``NEED_DATA``, ``PAUSED`` or ``ConnectionClosed``. The response is parsed
  strictly (RFC 9112): a bad status line, header line, obs-fold, bare LF, conflicting or invalid
  Content-Length, or a body cut short raises ``h11.RemoteProtocolError``, like h11.
* ``our_state``/``their_state`` use h11's state objects; ``start_next_cycle`` resets after a
  clean exchange; ``trailing_data`` gives what arrived beyond the response (a 101 switch, or bytes
  nobody asked for, which the engine refuses to hand to the next request).

Body framing of a response follows RFC 9112 §6.3: no body for HEAD, 1xx, 204 and 304; chunked when
Transfer-Encoding ends in chunked; else Content-Length; else read until the connection closes
(and then the connection is not reused).
"""

from __future__ import annotations

import re

import h11
from h11._headers import Headers

from .headers import FIELD_LINE_RE, FIELD_LINES_RE, split_tokens

MAX_RESPONSE_HEAD = 64 * 1024      # an app's response head larger than this is not HTTP we forward
MAX_CHUNK_LINE = 4 * 1024          # chunk-size line with extensions

_STATUS_RE = re.compile(rb"HTTP/(1\.[01]) ([0-9]{3})(?: ([\t \x21-\x7e\x80-\xff]*))?")
_HEX_RE = re.compile(rb"[0-9A-Fa-f]{1,16}")
_END = h11.EndOfMessage()    # events are frozen: one instance serves every response (no Headers([]) each)

_NO_BODY, _LENGTH, _CHUNKED, _UNTIL_CLOSE = range(4)
# chunked sub-states
_SIZE, _DATA, _DATA_CRLF, _TRAILERS = range(4)


def _first_bad_line(head: bytes, pos: int) -> bytes:
    while True:
        m = FIELD_LINE_RE.match(head, pos)
        if m is None:
            return head[pos:head.find(b"\r\n", pos)]
        pos = m.end()


def _error(msg: str) -> h11.RemoteProtocolError:
    return h11.RemoteProtocolError(msg, 502)


class H1Client:
    """One upstream connection's HTTP/1.1 client side. See the module docstring."""

    __slots__ = ("our_state", "their_state", "_buf", "_eof", "_head_method", "_upgrade", "_req_close",
                 "_send_framing", "_send_left", "_recv_framing", "_recv_left", "_chunk_state",
                 "_keep_alive")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._eof = False
        self._reset()

    def _reset(self) -> None:
        self.our_state = h11.IDLE
        self.their_state = h11.IDLE
        self._head_method = False
        self._upgrade = False
        self._req_close = False
        self._send_framing = _NO_BODY
        self._send_left = 0
        self._recv_framing = _NO_BODY
        self._recv_left = 0
        self._chunk_state = _SIZE
        self._keep_alive = True

    # ------------------------------------------------------------------ sending
    def send(self, event) -> bytes:
        etype = type(event)
        if etype is h11.Data:
            return self._send_data(event.data)
        if etype is h11.EndOfMessage:
            return self._send_end()
        if etype is h11.Request:
            return self.send_head(event.method, event.target, event.headers._full_items)
        raise h11.LocalProtocolError(f"cannot send {etype.__name__} on the upstream leg")

    def send_head(self, method: bytes, target: bytes, items) -> bytes:
        """``send(Request(...))`` without building the event (h11's Request re-checks its headers)."""
        if self.our_state is not h11.IDLE:
            raise h11.LocalProtocolError("a request is already in progress")
        lines = [b"%s %s HTTP/1.1" % (method, target)]
        for raw, name, value in items:
            lines.append(raw + b": " + value)
            if name == b"content-length":
                self._send_framing, self._send_left = _LENGTH, int(value)
            elif name == b"transfer-encoding":
                self._send_framing = _CHUNKED
            elif name == b"connection":
                tokens = split_tokens(value)
                self._upgrade = self._upgrade or b"upgrade" in tokens
                self._req_close = self._req_close or b"close" in tokens
        self._head_method = method == b"HEAD"
        self.our_state = h11.SEND_BODY
        self.their_state = h11.SEND_RESPONSE
        lines.append(b"\r\n")
        return b"\r\n".join(lines)

    def _send_data(self, data: bytes) -> bytes:
        if self.our_state is not h11.SEND_BODY:
            raise h11.LocalProtocolError("not sending a body")
        if self._send_framing == _LENGTH:
            if len(data) > self._send_left:
                raise h11.LocalProtocolError("too much data for the declared Content-Length")
            self._send_left -= len(data)
            return bytes(data)
        if self._send_framing == _CHUNKED:
            return b"%x\r\n%s\r\n" % (len(data), data) if data else b""
        if data:
            raise h11.LocalProtocolError("a request without framing headers has no body")
        return b""

    def _send_end(self) -> bytes:
        if self.our_state is not h11.SEND_BODY:
            raise h11.LocalProtocolError("not sending a body")
        if self._send_framing == _LENGTH and self._send_left:
            raise h11.LocalProtocolError("body shorter than the declared Content-Length")
        self.our_state = h11.MIGHT_SWITCH_PROTOCOL if self._upgrade else h11.DONE
        return b"0\r\n\r\n" if self._send_framing == _CHUNKED else b""

    # ------------------------------------------------------------------ receiving
    def receive_data(self, data: bytes) -> None:
        if data:
            buf = self._buf
            if not buf:
                self._buf = data          # kept as received: a whole-buffer body chunk is not copied
            elif type(buf) is bytes:
                self._buf = bytearray(buf) + data
            else:
                buf += data
        else:
            self._eof = True

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        return bytes(self._buf), self._eof

    def next_event(self):
        state = self.their_state
        if state is h11.SEND_RESPONSE:
            return self._read_head()
        if state is h11.SEND_BODY:
            return self._read_body()
        if state is h11.DONE or state is h11.MUST_CLOSE or state is h11.SWITCHED_PROTOCOL:
            return h11.PAUSED
        raise h11.LocalProtocolError("no request was sent")

    def _mutable(self) -> bytearray:
        buf = self._buf
        if type(buf) is not bytearray:
            buf = self._buf = bytearray(buf)
        return buf

    def _read_head(self):
        buf = self._mutable()
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_RESPONSE_HEAD:
                raise _error("response head too large")
            if b"\n\n" in buf or b"\n\r\n" in buf:
                raise _error("bare LF line ending in the response head")
            if self._eof:
                if not buf:
                    self.their_state = h11.CLOSED
                    return h11.ConnectionClosed()
                raise _error("connection closed in the middle of a response head")
            return h11.NEED_DATA
        if end > MAX_RESPONSE_HEAD:
            raise _error("response head too large")
        head = bytes(buf[:end + 2])      # the status line and every field line, each with its CRLF
        del buf[:end + 4]
        eol = head.find(b"\r\n")
        m = _STATUS_RE.fullmatch(head, 0, eol)
        if m is None:
            raise _error(f"invalid status line {head[:min(eol, 80)]!r}")
        version, status, reason = m.group(1), int(m.group(2)), m.group(3) or b""
        if FIELD_LINES_RE.fullmatch(head, eol + 2) is None:
            bad = _first_bad_line(head, eol + 2)
            raise _error(f"invalid header line {bad[:80]!r}")
        items = []
        cl = None
        te = None
        close = version == b"1.0"
        for name, value in FIELD_LINE_RE.findall(head, eol + 2):
            lname = name.lower()
            if lname == b"content-length":
                values = {v.strip() for v in value.split(b",")}
                if len(values) != 1 or not next(iter(values)).isdigit() or len(value) > 20:
                    raise _error("invalid Content-Length")
                value = values.pop()
                if cl is not None and cl != int(value):
                    raise _error("conflicting Content-Length headers")
                if cl is not None:
                    continue
                cl = int(value)
            elif lname == b"transfer-encoding":
                te = value.lower() if te is None else te + b"," + value.lower()
            elif lname == b"connection":
                tokens = split_tokens(value)
                if b"close" in tokens:
                    close = True
                elif b"keep-alive" in tokens and version == b"1.0":
                    close = False
            items.append((name, lname, value))
        headers = Headers(items)
        if status < 200:
            if status == 101:
                if not self._upgrade:
                    raise _error("101 without an upgrade request")
                self.their_state = h11.SWITCHED_PROTOCOL
                self.our_state = h11.SWITCHED_PROTOCOL
            return h11.InformationalResponse(status_code=status, headers=headers, reason=reason,
                                             http_version=version, _parsed=True)
        if self._head_method or status in (204, 304):
            self._recv_framing = _NO_BODY
        elif te is not None:
            if te.rsplit(b",", 1)[-1].strip() == b"chunked":
                self._recv_framing, self._chunk_state = _CHUNKED, _SIZE
            else:
                self._recv_framing, close = _UNTIL_CLOSE, True
            if cl is not None:
                close = True   # RFC 9112 §6.3: TE overrides CL, and the connection must close
        elif cl is not None:
            self._recv_framing, self._recv_left = _LENGTH, cl
        else:
            self._recv_framing, close = _UNTIL_CLOSE, True
        if self._upgrade and self.our_state is h11.MIGHT_SWITCH_PROTOCOL:
            self.our_state = h11.DONE     # the upgrade was declined: an ordinary exchange
        self._keep_alive = not close and not self._req_close
        self.their_state = h11.SEND_BODY
        return h11.Response(status_code=status, headers=headers, reason=reason, http_version=version,
                            _parsed=True)

    def _finish(self):
        self.their_state = h11.DONE if self._keep_alive else h11.MUST_CLOSE
        if not self._keep_alive and self.our_state is h11.DONE:
            self.our_state = h11.MUST_CLOSE
        return _END

    def _read_body(self):
        framing = self._recv_framing
        buf = self._buf
        if framing == _NO_BODY:
            return self._finish()
        if framing == _LENGTH:
            if self._recv_left == 0:
                return self._finish()
            if not buf:
                if self._eof:
                    raise _error("connection closed before the full body was received")
                return h11.NEED_DATA
            n = min(len(buf), self._recv_left)
            self._recv_left -= n
            return h11.Data(data=self._take(n))
        if framing == _UNTIL_CLOSE:
            if buf:
                return h11.Data(data=self._take(len(buf)))
            if self._eof:
                self._keep_alive = False
                return self._finish()
            return h11.NEED_DATA
        return self._read_chunked()

    def _take(self, n: int) -> bytes | bytearray:
        """The first ``n`` buffered bytes. All of them: the buffer itself is handed out and a new
        one started (no copy of a 256 KiB body read; the caller only reads it)."""
        buf = self._buf
        if n == len(buf):
            self._buf = bytearray()
            return buf
        buf = self._mutable()
        data = bytes(buf[:n])
        del buf[:n]
        return data

    def _read_chunked(self):
        buf = self._mutable()
        while True:
            st = self._chunk_state
            if st == _SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > MAX_CHUNK_LINE:
                        raise _error("chunk size line too long")
                    return self._need()
                line = bytes(buf[:end])
                del buf[:end + 2]
                size_text = line.split(b";", 1)[0].strip(b" \t")
                if not _HEX_RE.fullmatch(size_text):
                    raise _error(f"invalid chunk size {line[:40]!r}")
                self._recv_left = int(size_text, 16)
                self._chunk_state = _DATA if self._recv_left else _TRAILERS
            elif st == _DATA:
                if not buf:
                    return self._need()
                n = min(len(buf), self._recv_left)
                data = bytes(buf) if n == len(buf) else bytes(buf[:n])
                del buf[:n]
                self._recv_left -= n
                if not self._recv_left:
                    self._chunk_state = _DATA_CRLF
                return h11.Data(data=data)
            elif st == _DATA_CRLF:
                if len(buf) < 2:
                    return self._need()
                if buf[:2] != b"\r\n":
                    raise _error("chunk data not followed by CRLF")
                del buf[:2]
                self._chunk_state = _SIZE
            else:   # trailers: lines until an empty one; dropped (hop-by-hop framing detail)
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > MAX_RESPONSE_HEAD:
                        raise _error("trailers too large")
                    return self._need()
                del buf[:end + 2]
                if end == 0:
                    return self._finish()

    def _need(self):
        if self._eof:
            raise _error("connection closed in the middle of a chunked body")
        return h11.NEED_DATA

    # ------------------------------------------------------------------ cycles
    def start_next_cycle(self) -> None:
        if self.our_state is not h11.DONE or self.their_state is not h11.DONE:
            raise h11.LocalProtocolError("not in a reusable state")
        self._reset()
