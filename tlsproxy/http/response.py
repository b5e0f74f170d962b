"""Writing a response to the client: h11's server-side framing rules, without its state machine.

Theory of operation
-------------------
The client side keeps h11 for what it is good at, reading untrusted requests. For *writing* the
response, an ``h11.Connection.send`` per head, per body chunk and per end-of-message ran about a
hundred Python calls per small request (state transitions, writer lookups, header re-cleaning) —
a sixth of the whole request (docs/performance.md). :class:`ResponseWriter` makes the same bytes
h11 would (a differential test holds it to that) from what the engine already knows:

* framing (RFC 9112 §6.3, as h11 decides it): no body for HEAD, 204, 304 and a 2xx to CONNECT;
  else ``Transfer-Encoding: chunked`` if the headers say so, else ``Content-Length``; else the
  body runs to the close — which an HTTP/1.1 client gets re-framed as chunked (Content-Length
  dropped, ``Transfer-Encoding: chunked`` set) and an HTTP/1.0 client as close-delimited;
* ``Connection: close`` is added (``keep-alive`` removed) when the client's request did not allow
  keep-alive, when the body is close-delimited, or when the engine asks (draining, or the app
  answered before the request body ended);
* the body is checked against its Content-Length: more or less than promised is an error
  (:class:`FramingError`), never a response that desynchronises the client's connection.

Informational heads (1xx) are written as given, like h11 does.
"""

from __future__ import annotations

from collections.abc import Iterable

from .framing import last_chunk
from .headers import Triple
from .headers import split_tokens as _split

NONE, LENGTH, CHUNKED, CLOSE = "none", "length", "chunked", "close"


class FramingError(Exception):
    """The body does not match the framing its head announced."""


def informational_head(status: int, reason: bytes, items: Iterable[Triple]) -> bytes:
    """A 1xx head (101 included), headers as given."""
    return _head(status, reason, items)


def _head(status: int, reason: bytes, items: Iterable[Triple]) -> bytes:
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
    later = []
    for raw, name, value in items:     # Host first, as h11 writes it
        if name == b"host":
            lines.append(b"%s: %s\r\n" % (raw, value))
        else:
            later.append(b"%s: %s\r\n" % (raw, value))
    lines += later
    lines.append(b"\r\n")
    return b"".join(lines)


class ResponseWriter:
    """One response's framing. ``head()`` first, then ``data()`` for each body chunk, then ``end()``.
    ``keep_alive`` tells afterwards whether the connection may carry another request."""

    __slots__ = ("framing", "keep_alive", "_remaining")

    def __init__(self) -> None:
        self.framing = NONE
        self.keep_alive = False
        self._remaining = 0

    def head(self, status: int, reason: bytes, items: list[Triple], *, request_method: bytes,
             client_http11: bool, client_keep_alive: bool, close: bool = False) -> bytes:
        # One pass over the fields for what the framing depends on.
        length = -1
        te = False
        connection: list[bytes] = []
        for _, name, value in items:
            if name == b"content-length":
                if length < 0:
                    length = int(value)
            elif name == b"transfer-encoding":
                te = te or bool(_split(value))
            elif name == b"connection":
                connection += _split(value)
        # The framing the headers describe (for HEAD, the one a GET would get: h11 keeps the
        # headers of the body the client did not ask for) ...
        if status in (204, 304) or (request_method == b"CONNECT" and 200 <= status < 300):
            framing, length = LENGTH, 0
        elif te:
            framing = CHUNKED
        elif length >= 0:
            framing = LENGTH
        else:
            framing = CLOSE
        # ... and the body actually written: none for HEAD.
        if request_method == b"HEAD":
            self.framing, self._remaining = LENGTH, 0
        else:
            self.framing = framing
            self._remaining = length if framing == LENGTH else 0
        need_close = close or not client_keep_alive
        if framing in (CHUNKED, CLOSE):
            items = [t for t in items if t[1] != b"content-length"]
            if client_http11:
                items = [t for t in items if t[1] != b"transfer-encoding"]
                items.append((b"Transfer-Encoding", b"transfer-encoding", b"chunked"))
                if self.framing == CLOSE:
                    self.framing = CHUNKED
            else:
                items = [t for t in items if t[1] != b"transfer-encoding"]
                if request_method != b"HEAD":
                    need_close = True
                if self.framing == CHUNKED:
                    self.framing = CLOSE
        if need_close:     # one field per token, at the end, as h11's set_comma_header does
            kept = sorted({t for t in connection if t != b"keep-alive"} | {b"close"})
            items = [t for t in items if t[1] != b"connection"]
            items += [(b"Connection", b"connection", t) for t in kept]
        self.keep_alive = not need_close and b"close" not in connection
        return _head(status, reason, items)

    def data(self, chunk: bytes | bytearray | memoryview) -> tuple[bytes | bytearray | memoryview, ...]:
        """The wire form of a body chunk (parts to concatenate; the chunk itself is not copied)."""
        n = len(chunk)
        if not n:
            return ()
        framing = self.framing
        if framing == LENGTH:
            if n > self._remaining:
                raise FramingError(f"body longer than its Content-Length ({n} > {self._remaining} left)")
            self._remaining -= n
            return (chunk,)
        if framing == CHUNKED:
            return (b"%x\r\n" % n, chunk, b"\r\n")
        if framing == CLOSE:
            return (chunk,)
        raise FramingError("a body for a response that has none")

    def end(self, trailers: Iterable[Triple] = ()) -> bytes:
        """The end of the body; ``trailers`` (already filtered) go out only on a chunked body."""
        if self.framing == LENGTH and self._remaining:
            raise FramingError(f"body shorter than its Content-Length ({self._remaining} bytes missing)")
        if self.framing == CHUNKED:
            return last_chunk(trailers) if trailers else b"0\r\n\r\n"
        return b""
