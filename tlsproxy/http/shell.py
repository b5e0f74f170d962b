"""The engine's I/O helpers: the waits a connection makes, their phases, and the access-log line.

Every send and receive of the engine goes through here, each armed on the connection's (or the
body pump's) :class:`~.deadlines.Watch` under a *phase* that says what an expiry means
(``forward.Forwarder.expiry``). Streams are tlsproxy's own (``net.PlainStream``,
``tls.stream.TLSStream``): both have ``close_now()`` and ``linger_close()``.
"""

from __future__ import annotations

from typing import Any

import trio

from ..errors import UpstreamError
from ..log import get_logger
from .deadlines import Watch
from .exchange import ConnFacts

access = get_logger("access")

# What a wait is for (Watch.phase): an expired deadline is answered by phase.
HEAD = "head"                      # the rest of a request head: 408
BODY_IN = "request_body"           # the client's next request body bytes: close
BODY_RATE = "request_body_rate"    # the request body fell below the minimum rate: 408 or close
EXPECT = "expect"                  # the app's 100 Continue (or final answer): we send 100 ourselves
UPSTREAM_SEND = "upstream_send"    # the upstream taking our request: 504
UPSTREAM_WAIT = "upstream_response"  # the upstream's response head: 504
UPSTREAM_BODY = "upstream_body"    # the upstream's next response body bytes: close
CLIENT_SEND = "client_send"        # the client taking what we send: close
DISCARD = "discard"                # the rest of a request body after an early answer: close

UPSTREAM_WRITE_TIMEOUT_S = 30.0   # an upstream that stops reading our request for this long is dead


class Close(Exception):
    """End the client connection quietly (EOF, idle timeout, client gone, stalled body)."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


async def receive(stream) -> bytes:
    try:
        return await stream.receive_some()
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise Close(f"client connection broke: {exc}") from None


async def client_send(stream, data: bytes | bytearray, watch: Watch, timeout_s: float) -> None:
    """Send to the client; one that stops reading for ``timeout_s`` (a slow-read attack, or a
    client gone without a FIN) is cut, so it cannot hold its connection and an upstream forever."""
    watch.arm(CLIENT_SEND, timeout_s)
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise Close(f"client went away: {exc}") from None


async def upstream_send(up, data: bytes | bytearray, sent_before: bool, watch: Watch) -> None:
    watch.arm(UPSTREAM_SEND, UPSTREAM_WRITE_TIMEOUT_S)
    try:
        await up.stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise UpstreamError("reset", f"connection lost while sending: {_short(exc)}",
                            sent_nothing=not sent_before) from None


async def upstream_receive(up, first: bool) -> Any:
    """What the leg's stream gives its codec: bytes from an HTTP/1.1 leg, a list of h2 events from
    an h2c one (``h2pool.H2Channel``)."""
    try:
        return await up.stream.receive_some()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise UpstreamError("reset", f"connection lost: {_short(exc)}", sent_nothing=first) from None


def _short(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    return str(cause) or type(cause).__name__


def close_stream(stream) -> None:
    stream.close_now()


async def linger(stream) -> None:
    """Close after an answer while the client may still be sending: read and drop for a moment
    (a close with unread bytes would reset the connection and could destroy the answer)."""
    try:
        with trio.CancelScope(shield=True):
            await stream.linger_close()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


_CODE_CLASSES = ("1xx", "1xx", "2xx", "3xx", "4xx", "5xx")


def code_class(status: int) -> str:
    """The metrics' status class: 1xx … 5xx (anything out of range is clamped into it)."""
    return _CODE_CLASSES[min(max(status // 100, 1), 5)]


class AccessEntry:
    """One exchange's access-log line, filled in as the exchange goes."""

    __slots__ = ("method", "target", "facts", "status", "bytes_in", "bytes_out", "request_id", "note",
                 "responded", "request_done")

    def __init__(self, method: bytes, target: bytes, facts: ConnFacts) -> None:
        self.method = method
        self.target = target
        self.facts = facts
        self.status = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.request_id = b""
        self.note = ""
        self.responded = False     # a response head (not a 1xx) was queued for the client
        self.request_done = False  # the request was read to its end (its body included)

    def emit(self, listener: str, duration: float) -> None:
        f = self.facts
        fields = {
            "listener": listener, "client": f.client, "method": self.method.decode("ascii", "replace"),
            "path": self.target.decode("ascii", "replace")[:2048], "status": self.status,
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
            "duration_ms": round(duration * 1000, 3), "tls": f.tls_version,
            "request_id": self.request_id.decode("ascii", "replace"),
        }
        if f.identity:
            fields["identity"] = f.identity
        if self.note:
            fields["note"] = self.note
        if f.extra_log:
            fields.update(f.extra_log)
        access.info("request", **fields)
