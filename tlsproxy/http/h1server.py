"""The server side of an HTTP/1.1 connection, sans-IO: request heads in, exchange facts out.

Theory of operation
-------------------
The engine (``forward.py``) finds where a head ends (:func:`~.headers.find_head_end`) and hands
the head's bytes here. :func:`parse_request_head` turns them into a :class:`RequestHead` — method,
target, version, field triples, and what the connection needs to know about the body (its framing
and length), ``Expect: 100-continue``, ``TE: trailers``, keep-alive — or raises
:class:`~tlsproxy.errors.HTTPError` (400/414/431/505...).

Two parsers sit behind that one function. The common head (HTTP/1.1, no body, no upgrade) takes
:func:`~.headers.parse_simple_request`: two regex calls. Any other head goes to a fresh
``h11.Connection`` fed exactly the head's bytes; its ``Request`` event is read through h11's public
API (iterating ``headers`` and ``headers.raw_items()``), and h11 is dropped: the body is decoded by
:class:`~.framing.BodyReader`, never by h11. A differential test (tests/http) holds the fast parser
to h11. Nothing here touches a socket, a clock or trio.
"""

from __future__ import annotations

import h11

from ..errors import HTTPError
from . import framing
from . import headers as hdr
from .exchange import Triple


class RequestHead:
    """One request head, checked; ``framing``/``length`` say how its body is delimited."""

    __slots__ = ("method", "target", "http_version", "items", "framing", "length", "expect_continue",
                 "te_trailers", "keep_alive", "upgrade")

    def __init__(self, method: bytes, target: bytes, http_version: bytes, items: list[Triple]) -> None:
        self.method = method
        self.target = target
        self.http_version = http_version
        self.items = items
        self.framing = framing.NONE
        self.length = 0
        self.expect_continue = False
        self.te_trailers = False
        self.keep_alive = http_version == b"1.1"
        self.upgrade = False

    @property
    def has_body(self) -> bool:
        return self.framing == framing.CHUNKED or (self.framing == framing.LENGTH and self.length > 0)

    def body_reader(self) -> framing.BodyReader:
        return framing.BodyReader(self.framing, self.length)


def parse_request_head(buf: bytes | bytearray, end: int, max_head_bytes: int) -> RequestHead:
    """The request head ``buf[:end]`` (``end`` from ``find_head_end``), or HTTPError."""
    problem = hdr.check_head_size(buf, end, max_head_bytes) or hdr.check_raw_head(buf[:end])
    if problem is not None:
        raise problem
    simple = hdr.parse_simple_request(buf, end)
    if simple is not None:        # HTTP/1.1, no body, no Expect/Upgrade/Connection subtleties
        head = RequestHead(simple[0], simple[1], b"1.1", simple[2])
        for _, name, value in head.items:
            if name == b"connection" and b"close" in hdr.split_tokens(value):
                head.keep_alive = False
            elif name == b"te" and b"trailers" in hdr.split_tokens(value):
                head.te_trailers = True
        return head
    return _parse_with_h11(bytes(buf[:end]), max_head_bytes)


def _parse_with_h11(data: bytes, max_head_bytes: int) -> RequestHead:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head_bytes)
    conn.receive_data(data)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        raise hdr.map_h11_error(exc.error_status_hint, str(exc), data) from None
    if type(event) is not h11.Request:
        raise HTTPError(400, "bad request: no request line", kind="malformed")
    pairs = zip(event.headers.raw_items(), event.headers, strict=True)
    items = [(raw, name, value) for (raw, _), (name, value) in pairs]
    head = RequestHead(event.method, event.target, event.http_version, items)
    connection: list[bytes] = []
    for _, name, value in items:
        if name == b"content-length":
            head.framing, head.length = framing.LENGTH, int(value)
        elif name == b"transfer-encoding":
            head.framing = framing.CHUNKED        # h11 accepts nothing but a final "chunked"
        elif name == b"expect":
            head.expect_continue = value.lower() == b"100-continue" and head.http_version == b"1.1"
        elif name == b"te":
            head.te_trailers = b"trailers" in hdr.split_tokens(value)
        elif name == b"connection":
            connection += hdr.split_tokens(value)
    if head.framing == framing.LENGTH and head.length == 0:
        head.framing = framing.NONE
    # an HTTP/1.0 client's connection is never kept (as before: its keep-alive is rare and fragile)
    head.keep_alive = head.http_version == b"1.1" and b"close" not in connection
    head.upgrade = b"upgrade" in connection
    return head
