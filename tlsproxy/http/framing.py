"""HTTP/1.1 message bodies, sans-IO: Content-Length and chunked decoding, trailers, encoding.

Theory of operation
-------------------
:class:`BodyReader` turns the bytes of one message body into events: body data (``bytes``), then
one :class:`~.exchange.End` carrying the trailer fields, or :data:`NEED_DATA`. It is used for both
legs — the client's request body (``tlsproxy/http/forward.py``) and the app's response body
(``h1client.py``) — and owns every framing check, so neither leg reads another library's state:

* a chunk-size line is ``1*16HEXDIG [chunk-ext] CRLF``; a bare LF, a control character (NUL
  included) or anything that is not a token / quoted-string extension is a :class:`FramingError`
  (RFC 9112 §7.1.1: extensions are discarded here, so a strange one can only be an attack);
* chunk data must be followed by CRLF; the trailer section is field lines (the same strict regex
  as heads) ending with an empty line, bounded by ``max_trailer_bytes``;
* framing overhead (size lines, extensions, CRLFs) beyond ``MAX_CHUNK_OVERHEAD_BYTES`` and larger
  than the data it frames is refused (Go's net/http does the same since CVE-2023-39326);
* a Content-Length body hands out the received buffer itself when it fits (no copy).

What follows the body (a pipelined request, bytes after a response) stays in the buffer:
:meth:`BodyReader.rest`. Encoding the other way (a chunked request or response with trailers) is
:func:`chunk` and :func:`last_chunk`; which trailer fields may travel is :func:`relayable_trailers`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .exchange import END, End, Triple
from .headers import FIELD_LINE_RE, HOP_BY_HOP

NEED_DATA = "need_data"     # the sentinel next() returns when the buffer holds no next event

NONE, LENGTH, CHUNKED, UNTIL_CLOSE = range(4)
MAX_CHUNK_LINE_BYTES = 4 * 1024        # a chunk-size line with extensions
MAX_TRAILER_BYTES = 32 * 1024          # the whole trailer section (h11 bounds it like a head)
MAX_CHUNK_OVERHEAD_BYTES = 64 * 1024   # framing bytes allowed beyond the data they frame

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
# RFC 9112 §7.1: chunk-size [ chunk-ext ], chunk-ext = *( BWS ";" BWS name [ BWS "=" BWS value ] )
_CHUNK_LINE_RE = re.compile(rb"([0-9A-Fa-f]{1,16})((?:[ \t]*;[ \t]*%s(?:[ \t]*=[ \t]*(?:%s|%s))?)*)[ \t]*"
                            % (_TOKEN, _TOKEN, _QUOTED))
_CTL_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

# RFC 9110 §6.5.1: fields a trailer must not carry (framing, routing, request modifiers,
# authentication, response control) — never relayed, whatever the receiver accepts.
FORBIDDEN_TRAILERS = HOP_BY_HOP | frozenset({
    b"content-length", b"content-type", b"content-encoding", b"content-range", b"host",
    b"authorization", b"cookie", b"set-cookie", b"expect", b"range", b"if-match",
    b"if-none-match", b"if-modified-since", b"if-unmodified-since", b"if-range",
    b"max-forwards", b"cache-control", b"age", b"expires", b"date", b"location",
    b"retry-after", b"vary", b"www-authenticate", b"x-forwarded-for", b"x-forwarded-proto",
    b"x-forwarded-host", b"x-forwarded-port", b"x-request-id", b"x-forwarded-client-cert",
    b"client-cert", b"client-cert-chain",
})

_DATA, _DATA_CRLF, _SIZE, _TRAILERS = range(4)


class FramingError(Exception):
    """The bytes do not frame a body as RFC 9112 says. ``kind`` names the problem for logs."""

    def __init__(self, message: str, kind: str = "body_malformed") -> None:
        super().__init__(message)
        self.kind = kind


class BodyReader:
    """One body's decoder. ``feed()`` bytes (``b""`` at EOF), then call ``next()`` until it says
    :data:`NEED_DATA`; it returns body data and finally one :class:`End`."""

    __slots__ = ("framing", "_buf", "_eof", "_left", "_state", "_trailer_lines", "_trailer_bytes",
                 "data_bytes", "wire_bytes", "done")

    def __init__(self, framing: int, length: int = 0) -> None:
        self.framing = framing
        self._buf: bytes | bytearray = b""
        self._eof = False
        self._left = length                # LENGTH: body bytes to come; CHUNKED: of this chunk
        self._state = _SIZE
        self._trailer_lines: list[Triple] = []
        self._trailer_bytes = 0
        self.data_bytes = 0                # body bytes handed out
        self.wire_bytes = 0                # bytes consumed (framing included)
        self.done = False

    def feed(self, data: bytes | bytearray) -> None:
        if not data:
            self._eof = True
            return
        buf = self._buf
        if not buf:
            self._buf = data               # kept as given: a whole-buffer chunk is not copied
        elif type(buf) is bytearray:
            buf += data
        else:
            self._buf = bytearray(buf) + data

    def rest(self) -> bytes:
        """What the buffer holds beyond the body (after :class:`End`)."""
        return bytes(self._buf)

    @property
    def eof(self) -> bool:
        return self._eof

    def _take(self, n: int) -> bytes | bytearray:
        buf = self._buf
        self.data_bytes += n
        self.wire_bytes += n
        if n == len(buf):
            self._buf = b""
            return buf
        data = bytes(buf[:n])
        self._buf = buf[n:] if isinstance(buf, bytes) else _drop(buf, n)
        return data

    def _end(self) -> End:
        self.done = True
        return End(tuple(self._trailer_lines)) if self._trailer_lines else END

    def next(self) -> bytes | bytearray | End | str:
        if self.done:
            return NEED_DATA
        framing = self.framing
        if framing == LENGTH:
            if not self._left:
                return self._end()
            if not self._buf:
                if self._eof:
                    raise FramingError("connection closed before the full body was received",
                                       "body_truncated")
                return NEED_DATA
            n = min(len(self._buf), self._left)
            self._left -= n
            return self._take(n)
        if framing == CHUNKED:
            return self._chunked()
        if framing == UNTIL_CLOSE:
            if self._buf:
                return self._take(len(self._buf))
            return self._end() if self._eof else NEED_DATA
        return self._end()

    def _chunked(self) -> bytes | bytearray | End | str:
        while True:
            state = self._state
            buf = self._buf
            if state == _DATA:
                if not buf:
                    return self._need()
                n = min(len(buf), self._left)
                self._left -= n
                if not self._left:
                    self._state = _DATA_CRLF
                return self._take(n)
            if state == _DATA_CRLF:
                if len(buf) < 2:
                    if buf and buf[:1] != b"\r":
                        raise FramingError("chunk data not followed by CRLF (RFC 9112 section 7.1)")
                    return self._need()
                if buf[:2] != b"\r\n":
                    raise FramingError("chunk data not followed by CRLF (RFC 9112 section 7.1)")
                self._consume(2)
                self._state = _SIZE
                continue
            lf = buf.find(b"\n")
            if lf < 0:
                limit = MAX_CHUNK_LINE_BYTES if state == _SIZE else MAX_TRAILER_BYTES - self._trailer_bytes
                if len(buf) > limit:
                    raise FramingError("chunk size line too long" if state == _SIZE else "trailers too large",
                                       "chunk_line")
                if _CTL_RE.search(buf.replace(b"\r", b"")) is not None:   # refuse a NUL at once
                    raise FramingError("control character in chunked framing (RFC 9112 section 7.1)",
                                       "chunk_line")
                return self._need()
            if lf == 0 or buf[lf - 1] != 0x0D:
                raise FramingError("bare LF in chunked framing (RFC 9112 section 7.1)", "bare_lf")
            line = bytes(buf[:lf - 1])
            self._consume(lf + 1)
            if state == _SIZE:
                self._size_line(line)
            elif self._trailer_line(line):
                return self._end()
            self._check_overhead()

    def _size_line(self, line: bytes) -> None:
        m = _CHUNK_LINE_RE.fullmatch(line)
        if m is None:
            if _CTL_RE.search(line) is not None:
                raise FramingError("control character in a chunk extension (RFC 9112 section 7.1.1)",
                                   "chunk_line")
            raise FramingError(f"invalid chunk size line {line[:40]!r}", "chunk_line")
        self._left = int(m.group(1), 16)
        self._state = _DATA if self._left else _TRAILERS

    def _trailer_line(self, line: bytes) -> bool:
        """One trailer line; True at the empty line that ends the message."""
        if not line:
            return True
        self._trailer_bytes += len(line) + 2
        if self._trailer_bytes > MAX_TRAILER_BYTES:
            raise FramingError("trailers too large", "chunk_line")
        m = FIELD_LINE_RE.fullmatch(line + b"\r\n")
        if m is None:
            raise FramingError(f"invalid trailer field {line[:40]!r}", "chunk_line")
        name = m.group(1)
        self._trailer_lines.append((name, name.lower(), m.group(2)))
        return False

    def _consume(self, n: int) -> None:
        buf = self._buf
        self.wire_bytes += n
        self._buf = buf[n:] if isinstance(buf, bytes) else _drop(buf, n)

    def _check_overhead(self) -> None:
        overhead = self.wire_bytes - self.data_bytes
        if overhead > MAX_CHUNK_OVERHEAD_BYTES and overhead > self.data_bytes:
            raise FramingError("chunked framing overhead too large (chunk extensions)", "chunk_overhead")

    def _need(self) -> str:
        if self._eof:
            raise FramingError("connection closed in the middle of a chunked body", "body_truncated")
        return NEED_DATA


def _drop(buf: bytearray, n: int) -> bytearray:
    del buf[:n]
    return buf


def chunk(data: bytes | bytearray | memoryview) -> tuple[bytes | bytearray | memoryview, ...]:
    """The wire form of one chunk (parts to concatenate; the data is not copied)."""
    return (b"%x\r\n" % len(data), data, b"\r\n") if data else ()


def last_chunk(trailers: Iterable[Triple] = ()) -> bytes:
    """The last chunk and the trailer section."""
    lines = [b"0\r\n"]
    lines += [b"%s: %s\r\n" % (raw, value) for raw, _, value in trailers]
    lines.append(b"\r\n")
    return b"".join(lines)


def relayable_trailers(trailers: Iterable[Triple]) -> tuple[Triple, ...]:
    """The trailer fields that may be relayed: never framing, routing or hop-by-hop ones."""
    return tuple(t for t in trailers if t[1] not in FORBIDDEN_TRAILERS)
