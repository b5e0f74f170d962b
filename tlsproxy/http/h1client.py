"""The client side of an upstream HTTP/1.1 connection, sans-IO.

Theory of operation
-------------------
The upstream leg (tlsproxy → app, tlsproxy → peer) needs one pattern only — one request, then its
response, then maybe the next — so instead of a second ``h11.Connection`` per request (about a
third of a small request's CPU in the profile) this class does exactly that:

* ``send_head(method, target, items)``, ``send_data(bytes)``, ``send_end(trailers)`` → bytes. The
  head is written as given (the proxy built it from a head it already validated); the body is framed
  by the request's own ``Content-Length`` or ``Transfer-Encoding: chunked`` (trailers need chunked).
* ``receive_data(bytes)`` (``b""`` at EOF) / ``next_event()`` → :class:`~.exchange.ResponseHead`
  (1xx included), body data (``bytes``), :class:`~.exchange.End` (with the response's trailers),
  :data:`NEED_DATA`, :data:`PAUSED` or :data:`CLOSED`. The response is parsed strictly (RFC 9112):
  a bad status line, header line, obs-fold, bare LF, conflicting or invalid Content-Length, or a
  body cut short raises :class:`UpstreamProtocolError`. The body is decoded by
  :class:`~.framing.BodyReader`, as the request body is on the other leg.
* ``our_state``/``their_state`` use h11's public state constants; ``start_next_cycle`` resets after
  a clean exchange; ``trailing_data`` gives what arrived beyond the response (a 101 switch, or bytes
  nobody asked for, which the engine refuses to hand to the next request).

Body framing of a response follows RFC 9112 §6.3: no body for HEAD, 1xx, 204 and 304; chunked when
Transfer-Encoding ends in chunked; else Content-Length; else read until the connection closes
(and then the connection is not reused).
"""

from __future__ import annotations

import re

import h11

from . import framing
from .exchange import End, ResponseHead, Triple
from .headers import FIELD_LINE_RE, split_field_lines, split_tokens

MAX_RESPONSE_HEAD = 64 * 1024      # an app's response head larger than this is not HTTP we forward

_STATUS_RE = re.compile(rb"HTTP/(1\.[01]) ([0-9]{3})(?: ([\t \x21-\x7e\x80-\xff]*))?")

NEED_DATA = framing.NEED_DATA      # no complete event buffered yet
PAUSED = "paused"                  # the response is complete: nothing more until start_next_cycle
CLOSED = "closed"                  # the upstream closed the connection before a response began


class UpstreamProtocolError(Exception):
    """The upstream's bytes are not a valid HTTP/1.1 response."""


def _first_bad_line(head: bytes, pos: int) -> bytes:
    while True:
        m = FIELD_LINE_RE.match(head, pos)
        if m is None:
            return head[pos:head.find(b"\r\n", pos)]
        pos = m.end()


class H1Client:
    """One upstream connection's HTTP/1.1 client side. See the module docstring."""

    __slots__ = ("our_state", "their_state", "_buf", "_eof", "_head_method", "_upgrade", "_req_close",
                 "_send_framing", "_send_left", "_body", "_keep_alive", "http10")

    def __init__(self) -> None:
        self._buf: bytes | bytearray = b""
        self._eof = False
        self.http10 = False        # the upstream answered in HTTP/1.0 (it never sends 100 Continue)
        self._reset()

    def _reset(self) -> None:
        self.our_state: object = h11.IDLE       # one of h11's state sentinels (compared with ``is``)
        self.their_state: object = h11.IDLE
        self._head_method = False
        self._upgrade = False
        self._req_close = False
        self._send_framing = framing.NONE
        self._send_left = 0
        self._body: framing.BodyReader | None = None
        self._keep_alive = True

    # ------------------------------------------------------------------ sending
    def send_head(self, method: bytes, target: bytes, items) -> bytes:
        """The request head, written as given; its framing fields decide how the body is sent."""
        if self.our_state is not h11.IDLE:
            raise h11.LocalProtocolError("a request is already in progress")
        lines = [b"%s %s HTTP/1.1" % (method, target)]
        for raw, name, value in items:
            lines.append(raw + b": " + value)
            if name == b"content-length":
                self._send_framing, self._send_left = framing.LENGTH, int(value)
            elif name == b"transfer-encoding":
                self._send_framing = framing.CHUNKED
            elif name == b"connection":
                tokens = split_tokens(value)
                self._upgrade = self._upgrade or b"upgrade" in tokens
                self._req_close = self._req_close or b"close" in tokens
        self._head_method = method == b"HEAD"
        self.our_state = h11.SEND_BODY
        self.their_state = h11.SEND_RESPONSE
        lines.append(b"\r\n")
        return b"\r\n".join(lines)

    def send_data(self, data: bytes | bytearray) -> bytes | bytearray:
        if self.our_state is not h11.SEND_BODY:
            raise h11.LocalProtocolError("not sending a body")
        if self._send_framing == framing.LENGTH:
            if len(data) > self._send_left:
                raise h11.LocalProtocolError("too much data for the declared Content-Length")
            self._send_left -= len(data)
            return data
        if self._send_framing == framing.CHUNKED:
            return b"%x\r\n%s\r\n" % (len(data), data) if data else b""
        if data:
            raise h11.LocalProtocolError("a request without framing headers has no body")
        return b""

    def send_end(self, trailers: tuple[Triple, ...] = ()) -> bytes:
        """The end of the request body; ``trailers`` go out only on a chunked request."""
        if self.our_state is not h11.SEND_BODY:
            raise h11.LocalProtocolError("not sending a body")
        if self._send_framing == framing.LENGTH and self._send_left:
            raise h11.LocalProtocolError("body shorter than the declared Content-Length")
        self.our_state = h11.MIGHT_SWITCH_PROTOCOL if self._upgrade else h11.DONE
        return framing.last_chunk(trailers) if self._send_framing == framing.CHUNKED else b""

    # ------------------------------------------------------------------ receiving
    def receive_data(self, data: bytes | bytearray) -> None:
        body = self._body
        if body is not None and not body.done and not self._buf:
            body.feed(data)          # straight to the body decoder: no copy
            return
        if data:
            buf = self._buf
            if not buf:
                self._buf = data
            elif type(buf) is bytes:
                self._buf = bytearray(buf) + data
            else:
                buf += data
        else:
            self._eof = True
            if body is not None and not body.done:
                body.feed(b"")

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        body = self._body
        rest = body.rest() if body is not None else b""
        return bytes(self._buf) + rest, self._eof or (body is not None and body.eof)

    def next_event(self):
        state = self.their_state
        if state is h11.SEND_RESPONSE:
            return self._read_head()
        if state is h11.SEND_BODY:
            return self._read_body()
        if state is h11.DONE or state is h11.MUST_CLOSE or state is h11.SWITCHED_PROTOCOL:
            return PAUSED
        raise h11.LocalProtocolError("no request was sent")

    def _read_head(self):
        buf = self._buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_RESPONSE_HEAD:
                raise UpstreamProtocolError("response head too large")
            if b"\n\n" in buf or b"\n\r\n" in buf:
                raise UpstreamProtocolError("bare LF line ending in the response head")
            if self._eof:
                if not buf:
                    self.their_state = h11.CLOSED
                    return CLOSED
                raise UpstreamProtocolError("connection closed in the middle of a response head")
            return NEED_DATA
        if end > MAX_RESPONSE_HEAD:
            raise UpstreamProtocolError("response head too large")
        head = bytes(buf[:end + 2])      # the status line and every field line, each with its CRLF
        self._buf = buf[end + 4:]
        eol = head.find(b"\r\n")
        m = _STATUS_RE.fullmatch(head, 0, eol)
        if m is None:
            raise UpstreamProtocolError(f"invalid status line {head[:min(eol, 80)]!r}")
        version, status, reason = m.group(1), int(m.group(2)), m.group(3) or b""
        fields = split_field_lines(head, eol + 2, len(head))
        if fields is None:
            bad = _first_bad_line(head, eol + 2)
            raise UpstreamProtocolError(f"invalid header line {bad[:80]!r}")
        items = []
        cl = None
        te = None
        close = version == b"1.0"
        self.http10 = close
        for name, value in fields:
            lname = name.lower()
            if lname == b"content-length":
                if not (value.isdigit() and len(value) <= 20):   # else a list ("13, 13") or invalid
                    values = {v.strip() for v in value.split(b",")}
                    if len(values) != 1 or not next(iter(values)).isdigit() or len(value) > 20:
                        raise UpstreamProtocolError("invalid Content-Length")
                    value = values.pop()
                if cl is not None and cl != int(value):
                    raise UpstreamProtocolError("conflicting Content-Length headers")
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
        if status < 200:
            if status == 101:
                if not self._upgrade:
                    raise UpstreamProtocolError("101 without an upgrade request")
                self.their_state = h11.SWITCHED_PROTOCOL
                self.our_state = h11.SWITCHED_PROTOCOL
            return ResponseHead(status, reason, items, version)
        if self._head_method or status in (204, 304):
            body = framing.BodyReader(framing.NONE)
        elif te is not None:
            if te.rsplit(b",", 1)[-1].strip() == b"chunked":
                body = framing.BodyReader(framing.CHUNKED)
            else:
                body, close = framing.BodyReader(framing.UNTIL_CLOSE), True
            if cl is not None:
                close = True   # RFC 9112 §6.3: TE overrides CL, and the connection must close
        elif cl is not None:
            body = framing.BodyReader(framing.LENGTH, cl)
        else:
            body, close = framing.BodyReader(framing.UNTIL_CLOSE), True
        if self._buf:
            body.feed(self._buf)
            self._buf = b""
        if self._eof:
            body.feed(b"")
        self._body = body
        if self._upgrade and self.our_state is h11.MIGHT_SWITCH_PROTOCOL:
            self.our_state = h11.DONE     # the upgrade was declined: an ordinary exchange
        self._keep_alive = not close and not self._req_close
        self.their_state = h11.SEND_BODY
        return ResponseHead(status, reason, items, version)

    def _read_body(self):
        body = self._body
        try:
            event = body.next()
        except framing.FramingError as exc:
            raise UpstreamProtocolError(str(exc)) from None
        if type(event) is End:
            if body.framing == framing.UNTIL_CLOSE:
                self._keep_alive = False
            self.their_state = h11.DONE if self._keep_alive else h11.MUST_CLOSE
            if not self._keep_alive and self.our_state is h11.DONE:
                self.our_state = h11.MUST_CLOSE
            self._buf = body.rest()
            self._eof = self._eof or body.eof
            self._body = None
        return event

    # ------------------------------------------------------------------ cycles
    def start_next_cycle(self) -> None:
        if self.our_state is not h11.DONE or self.their_state is not h11.DONE:
            raise h11.LocalProtocolError("not in a reusable state")
        self._reset()
