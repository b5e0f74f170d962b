"""The client side of an exchange's response: a *sink* with the shape head / data / end(trailers).

An exchange never writes a wire format itself: ``Forwarder.read_response_head`` and
``Forwarder.stream_response`` read the upstream and hand the response to a sink, whose methods are

* ``await informational(status, reason, items)`` — a 1xx (103 Early Hints…) before the final head;
* ``await head(status, reason, items, close=…)`` — the final head, hop-by-hop fields already gone;
* ``await data(chunk)`` — body bytes (``FramingError`` when they break the head's framing);
* ``await flush()`` — what is buffered goes out now (the engine is about to wait for the upstream);
* ``await end(trailers)`` — the end of the body; the sink decides which trailers its client gets;

plus ``flushed`` (the head reached the client: an upstream failure is then a cut, no longer a
502), ``sent`` (body bytes), ``keep_alive`` and ``m_out`` (the bytes-sent counter it feeds).

:class:`H1Sink` is an HTTP/1.1 client connection (``response.ResponseWriter`` framing, the head
coalesced with the first body bytes, large chunks sent without a copy); the HTTP/2 stream's sink
is ``h2exchange.H2Sink``. One exchange logic, two wire formats.
"""

from __future__ import annotations

from .deadlines import Watch
from .framing import relayable_trailers
from .h1server import RequestHead
from .response import ResponseWriter, informational_head
from .shell import client_send

FLUSH_BYTES = 256 * 1024          # coalesce body writes up to this before sending
DIRECT_BYTES = 16 * 1024          # a body chunk this large goes out as it is (no copy into a buffer)


class H1Sink:
    """The response to one request on an HTTP/1.1 client connection."""

    __slots__ = ("stream", "request", "watch", "timeout_s", "writer", "out", "flushed", "sent", "m_out")

    def __init__(self, stream, request: RequestHead, watch: Watch, timeout_s: float, m_out) -> None:
        self.stream = stream
        self.request = request
        self.watch = watch
        self.timeout_s = timeout_s
        self.writer = ResponseWriter()
        self.out = bytearray()
        self.flushed = False
        self.sent = 0
        self.m_out = m_out

    async def informational(self, status: int, reason: bytes, items) -> None:
        await client_send(self.stream, informational_head(status, reason, items), self.watch, self.timeout_s)

    async def head(self, status: int, reason: bytes, items, *, close: bool = False) -> None:
        req = self.request
        self.out = bytearray(self.writer.head(status, reason, items, request_method=req.method,
                                              client_http11=req.http_version == b"1.1",
                                              client_keep_alive=req.keep_alive, close=close))

    async def data(self, chunk) -> None:
        self.sent += len(chunk)
        parts = self.writer.data(chunk)
        if not self.out and len(chunk) >= DIRECT_BYTES and len(parts) == 1:
            await client_send(self.stream, chunk, self.watch, self.timeout_s)   # no copy
            self.flushed = True
            return
        out = self.out
        for part in parts:   # no join: one copy
            out += part
        if len(out) >= FLUSH_BYTES:
            await self.flush()

    async def flush(self) -> None:
        if self.out:
            await client_send(self.stream, self.out, self.watch, self.timeout_s)
            self.out = bytearray()
            self.flushed = True

    async def end(self, trailers) -> None:
        # trailers reach a client that asked for them (TE: trailers), never another (RFC 9110 §6.5)
        self.out += self.writer.end(relayable_trailers(trailers) if self.request.te_trailers else ())
        await self.flush()

    @property
    def keep_alive(self) -> bool:
        return self.writer.keep_alive
