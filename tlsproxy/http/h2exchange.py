"""One HTTP/2 stream as one exchange: the same header rules, upstream pool, errors and log line.

Theory of operation
-------------------
:func:`run_stream` is the task of one stream. The request head (already checked by
:func:`~.h2core.request_head`: pseudo-headers → method, target, Host) goes through the engine's
pure rules — ``headers.check_request``, the mTLS identity verdict, ``headers.rewrite_request``
(hop-by-hop out, X-Forwarded-*, X-Request-Id, XFCC / Client-Cert) — and becomes one HTTP/1.1
request on a pooled upstream connection (``Forwarder.acquire``). A body is pumped upstream by a
second task while this one relays the response (an early answer is not held back), both on the
HTTP/1.1 client codec the engine already uses (``h1client``). The response goes to the client
through :class:`H2Sink` (head / data / end(trailers), and 1xx): connection-specific fields are
dropped, trailers always reach an HTTP/2 client (gRPC needs them).

A gRPC call (``content-type: application/grpc…``) cannot cross an HTTP/1.1 upstream leg (no
trailers in most apps, no bidirectional streaming): it is answered at once with a trailers-only
response, ``grpc-status: 14`` (UNAVAILABLE) and a ``grpc-message``, never a hang.

Errors: before the response head, the proxy's own answers (400, 403, 408, 413, 502, 504) go out as
an HTTP/2 response with the same short plain-text body as HTTP/1.1; after it, the stream is reset
(``INTERNAL_ERROR``, or ``CANCEL`` when the client went away). The connection lives on either way.
Each exchange ends in one access-log line and the engine's metrics (``Forwarder.finish``) and a
count in ``tlsproxy_h2_streams_total`` by class.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import h2.errors
import h2.exceptions
import trio

from ..errors import HTTPError, UpstreamError
from ..log import get_logger
from . import framing
from . import headers as hdr
from .deadlines import Watch
from .exchange import End, Triple
from .h1client import UpstreamProtocolError
from .h2core import CONNECTION_SPECIFIC, BadRequest, Request
from .shell import (
    BODY_IN,
    BODY_RATE,
    CLIENT_SEND,
    UPSTREAM_WAIT,
    AccessEntry,
    Close,
    upstream_send,
)

if TYPE_CHECKING:
    from .h2server import Connection

log = get_logger("http")

SINK_FLUSH_BYTES = 64 * 1024      # queue DATA frames up to this before waiting for the socket
FLUSH_BYTES = 256 * 1024         # request body bytes coalesced per upstream send
GRPC_UNAVAILABLE = b"14"
GRPC_HTTP1_MESSAGE = b"tlsproxy: the upstream speaks HTTP/1.1; gRPC needs an h2c:// upstream"


class H2Stream:
    """One stream's request body queue and send-window wakeup, shared by the reader and the exchange."""

    __slots__ = ("id", "body", "buffered", "end", "wake", "window", "reset", "scope", "data_bytes",
                 "responded")

    def __init__(self, stream_id: int) -> None:
        self.id = stream_id
        self.body: list[bytes] = []
        self.buffered = 0
        self.end: End | None = None
        self.wake = trio.Event()          # body data, its end, or a reset arrived
        self.window = trio.Event()        # the client opened a send window
        self.reset = False
        self.scope: trio.CancelScope | None = None   # the exchange's, cancelled on a client reset
        self.data_bytes = 0
        self.responded = False

    def poke(self) -> None:
        self.wake.set()

    def poke_window(self) -> None:
        self.window.set()


class H2Sink:
    """The client side of one exchange on an HTTP/2 stream (the shape of ``sink.H1Sink``): head,
    data, flush, end(trailers), 1xx. Fields are sent lowercased with ``:status`` first and no
    connection-specific ones; body bytes go out within the client's windows only."""

    __slots__ = ("conn", "st", "watch", "timeout_s", "sent", "flushed", "m_out", "stream", "pending")

    def __init__(self, conn: Connection, st: H2Stream, watch: Watch) -> None:
        self.conn = conn
        self.st = st
        self.watch = watch
        self.timeout_s = conn.fwd.route.limits.body_timeout_s
        self.sent = 0
        self.pending = 0                    # body bytes queued in h2 since the last flush
        self.flushed = False
        self.m_out = conn.server.m_out
        self.stream = None                  # no byte stream of its own (an HTTP/1.1 sink's is)

    async def informational(self, status: int, reason: bytes, items: list[Triple]) -> None:
        self._headers(status, items, False)
        await self.flush()

    async def head(self, status: int, reason: bytes, items: list[Triple], *, close: bool = False,
                   end: bool = False) -> None:
        self.st.responded = True
        self._headers(status, items, end)   # queued: it leaves with the first body bytes

    def _headers(self, status: int, items: list[Triple], end: bool) -> None:
        fields = [(b":status", b"%d" % status)]
        fields += [(name, value) for _raw, name, value in items
                   if name not in CONNECTION_SPECIFIC and name != b"te" and name != b"host"]
        self._check()
        with _gone():
            self.conn.core.h2.send_headers(self.st.id, fields, end_stream=end)

    async def data(self, chunk: bytes | bytearray | memoryview) -> None:
        core, st, watch = self.conn.core, self.st, self.watch
        view = memoryview(chunk)
        while view:
            self._check()
            room = core.send_window(st.id)
            if room < 0:
                raise Close("client reset the stream")
            if room == 0:                   # a zero window: wait for WINDOW_UPDATE, bounded
                st.window = trio.Event()     # before the flush: an update during it must wake us
                await self.flush()
                watch.arm(CLIENT_SEND, self.timeout_s)
                await st.window.wait()
                continue
            part, view = view[:room], view[room:]
            with _gone():
                core.h2.send_data(st.id, bytes(part))
            self.sent += len(part)
            self.pending += len(part)
            if self.pending >= SINK_FLUSH_BYTES:   # else the engine's next flush() or end() sends it
                await self.flush()

    async def flush(self) -> None:
        self.pending = 0
        await self.conn.flush()
        self.flushed = True

    async def end(self, trailers: tuple[Triple, ...] = ()) -> None:
        self._check()
        # an HTTP/2 client always takes trailers (gRPC needs them); the framing ones never cross
        fields = [(name, value) for _raw, name, value in framing.relayable_trailers(trailers)
                  if name not in CONNECTION_SPECIFIC]
        with _gone():
            if fields:
                self.conn.core.h2.send_headers(self.st.id, fields, end_stream=True)
            else:
                self.conn.core.h2.end_stream(self.st.id)
        await self.flush()

    @property
    def keep_alive(self) -> bool:
        return True                         # the connection's life is not one stream's to decide

    def _check(self) -> None:
        if self.st.reset:
            raise Close("client reset the stream")


_H2_STREAM_ERRORS = (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError)


class _gone:
    """h2 refusing a frame on a stream the client closed: the client went away from it."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ, exc, tb) -> bool:
        if typ is not None and issubclass(typ, _H2_STREAM_ERRORS):
            raise Close(f"client closed the stream: {exc}") from None
        return False


async def run_stream(conn: Connection, st: H2Stream, ev: Request | BadRequest) -> None:
    fwd = conn.fwd
    t0 = time.perf_counter()
    entry = AccessEntry(ev.method, ev.target, conn.facts)
    watch = fwd.drain.watchdog.watch()
    sink = H2Sink(conn, st, watch)
    try:
        with watch.scope:
            st.scope = watch.scope
            try:
                if type(ev) is BadRequest:
                    raise ev.error
                await _exchange(conn, st, ev, entry, sink, watch)
            except HTTPError as err:
                await _refuse(conn, st, sink, err, entry)
            except (Close, UpstreamError) as why:
                entry.status = entry.status if entry.responded else 499
                entry.note = why.why if isinstance(why, Close) else why.reason
                conn.core.reset(st.id, h2.errors.ErrorCodes.CANCEL if st.reset
                                else h2.errors.ErrorCodes.INTERNAL_ERROR)
                await conn.flush()
            except Exception as exc:       # a bug costs this stream, never its connection
                log.error("h2 stream failed", listener=fwd.route.name, client=conn.facts.client,
                          error=repr(exc))
                entry.status, entry.note = entry.status or 500, "internal_error"
                conn.core.reset(st.id, h2.errors.ErrorCodes.INTERNAL_ERROR)
                await conn.flush()
        if watch.scope.cancelled_caught:
            await _expired(conn, st, sink, watch, entry)
    finally:
        fwd.drain.watchdog.forget(watch)
        conn.done(st)
        if not entry.status:
            entry.status = 499
        entry.bytes_out = sink.sent
        conn.server.count_stream(entry.status)
        fwd.finish(entry, t0)


async def _expired(conn: Connection, st: H2Stream, sink: H2Sink, watch: Watch, entry: AccessEntry) -> None:
    if st.reset:
        entry.status, entry.note = entry.status if entry.responded else 499, "client reset the stream"
        return
    if watch.expired is None:        # the connection ended around us
        entry.note = entry.note or "connection closed"
        return
    what = conn.fwd.expiry(watch.expired)
    guard = conn.fwd.drain.watchdog.watch()
    try:
        with guard.scope:
            guard.arm(CLIENT_SEND, 5.0)
            sink.watch = guard
            if isinstance(what, HTTPError) and not entry.responded:
                await _refuse(conn, st, sink, what, entry)
            else:
                entry.status = entry.status if entry.responded else 499
                entry.note = what.why if isinstance(what, Close) else what.kind
                conn.core.reset(st.id, h2.errors.ErrorCodes.INTERNAL_ERROR)
                await conn.flush()
    finally:
        conn.fwd.drain.watchdog.forget(guard)


async def _refuse(conn: Connection, st: H2Stream, sink: H2Sink, err: HTTPError, entry: AccessEntry) -> None:
    """The proxy's own answer on this stream (the connection lives on)."""
    fwd = conn.fwd
    fwd.metrics.client_errors.labels(fwd.route.name, str(err.status)).inc()
    entry.status, entry.note = err.status, err.kind
    if err.status >= 500 and err.kind.startswith("upstream"):
        log.warning("upstream error", listener=fwd.route.name, client=conn.facts.client, status=err.status,
                    reason=err.reason, upstream=fwd.route.upstream_label)
    if entry.responded or st.reset:
        conn.core.reset(st.id, h2.errors.ErrorCodes.INTERNAL_ERROR)
        await conn.flush()
        return
    body = (err.reason.rstrip("\n") + "\n").encode("utf-8", "replace")
    try:
        await sink.head(err.status, b"", [(b"content-type", b"content-type", b"text/plain; charset=utf-8"),
                                          (b"content-length", b"content-length", b"%d" % len(body))])
        entry.responded = True
        await sink.data(body)
        await sink.end()
    except Close:
        pass
    _stop_request(conn, st)


def _stop_request(conn: Connection, st: H2Stream) -> None:
    """The response ended before the request body: ask the client to stop sending (RFC 9113 §8.1)."""
    if st.end is None and not st.reset:
        conn.core.reset(st.id, h2.errors.ErrorCodes.NO_ERROR)


async def _exchange(conn: Connection, st: H2Stream, req: Request, entry: AccessEntry, sink: H2Sink,
                    watch: Watch) -> None:
    fwd = conn.fwd
    route = fwd.route
    facts = conn.facts
    hdr.check_request(req.method, req.target, b"1.1", req.items)
    if facts.deny is not None:
        raise facts.deny
    if req.grpc and not (route.pool is not None and route.pool.http2):
        entry.status, entry.note = 200, "grpc_needs_h2_upstream"
        entry.responded = True
        await sink.head(200, b"", [(b"content-type", b"content-type", b"application/grpc"),
                                   (b"grpc-status", b"grpc-status", GRPC_UNAVAILABLE),
                                   (b"grpc-message", b"grpc-message", GRPC_HTTP1_MESSAGE)], end=True)
        await sink.flush()
        _stop_request(conn, st)
        return
    items, request_id, _upgrade = hdr.rewrite_request(req.items, facts.forward,
                                                      host_override=route.host_override,
                                                      te_trailers=req.te_trailers)
    entry.request_id = request_id
    has_body = not req.ended         # (the body may have arrived, whole, before this task ran)
    length = hdr.header_value(req.items, b"content-length")
    if has_body and length is None:
        items.append((b"transfer-encoding", b"transfer-encoding", b"chunked"))
    max_body = route.limits.max_body_bytes
    if length is not None and max_body is not None and length.isdigit() and int(length) > max_body:
        raise HTTPError(413, f"request body larger than {max_body} bytes", kind="body_too_large")
    if has_body and hdr.has_token(req.items, b"expect", b"100-continue"):
        await sink.informational(100, b"Continue", [])   # the body waits in the stream window, bounded
    pool = route.pool
    up = await fwd.acquire(pool)
    clean = False
    try:
        upc = up.h11
        head_bytes = upc.send_head(req.method, req.target, items)
        if not has_body:
            await upstream_send(up, head_bytes + upc.send_end(), False, watch)
            entry.request_done = True
            watch.arm(UPSTREAM_WAIT, route.limits.upstream_response_timeout_s)
            clean = await _respond(conn, st, up, req, entry, sink, watch, None)
        else:
            clean = await _with_body(conn, st, up, req, head_bytes, entry, sink, watch)
    except UpstreamError as exc:
        raise fwd.upstream_failed(exc) from None
    except UpstreamProtocolError as exc:
        fwd.upstream_error("protocol")
        raise HTTPError(502, f"upstream sent an invalid response: {exc}", kind="upstream_protocol") from None
    finally:
        if clean and entry.request_done:
            fwd.release(pool, up)
        else:
            pool.discard(up)


async def _with_body(conn: Connection, st: H2Stream, up, req: Request, head_bytes: bytes, entry: AccessEntry,
                     sink: H2Sink, watch: Watch) -> bool:
    fwd = conn.fwd
    watchdog = fwd.drain.watchdog
    pw = watchdog.watch()
    state = {"error": None, "done": False}

    async def pump() -> None:
        try:
            with pw.scope:
                await _pump(conn, st, up, head_bytes, entry, pw)
            if pw.expired is not None:
                state["error"] = fwd.expiry(pw.expired)
                nursery.cancel_scope.cancel()
                return
            state["done"] = True
            if not st.responded:
                watch.arm(UPSTREAM_WAIT, fwd.route.limits.upstream_response_timeout_s)
        except (HTTPError, Close) as exc:
            state["error"] = exc
            nursery.cancel_scope.cancel()
        except UpstreamError:
            state["done"] = True      # the response side reads what the app said, or fails

    clean = False
    failure: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump)
            watch.disarm()
            try:
                clean = await _respond(conn, st, up, req, entry, sink, watch, pw)
            except (HTTPError, Close, UpstreamError, UpstreamProtocolError) as exc:
                failure = exc
                pw.scope.cancel()
            if not state["done"]:
                pw.scope.cancel()          # an early answer: the rest of the body is not the app's
                _stop_request(conn, st)
                clean = False
    except BaseExceptionGroup as group:    # only cancellations get here: both tasks catch the rest
        raise _first(group) from None
    finally:
        watchdog.forget(pw)
    if state["error"] is not None:
        failure = state["error"]
    if failure is not None:
        if isinstance(failure, HTTPError) and entry.responded:
            failure = Close(failure.reason)
        raise failure
    return clean


async def _pump(conn: Connection, st: H2Stream, up, head_bytes: bytes, entry: AccessEntry, pw: Watch) -> None:
    fwd = conn.fwd
    limits = fwd.route.limits
    max_body = limits.max_body_bytes
    upc = up.h11
    out = bytearray(head_bytes)
    sent = False
    waited = 0.0            # time spent waiting for the client's bytes (what the minimum rate counts)
    while True:
        if st.body:
            chunks, st.body = st.body, []
            n = st.buffered
            st.buffered = 0
            st.data_bytes += n
            entry.bytes_in = st.data_bytes
            if max_body is not None and st.data_bytes > max_body:
                raise HTTPError(413, f"request body larger than {max_body} bytes", kind="body_too_large")
            for chunk in chunks:
                try:
                    out += upc.send_data(chunk)
                except Exception as exc:       # more than the declared Content-Length
                    raise HTTPError(400, f"bad request: {exc}", kind="body_length") from None
            if len(out) >= FLUSH_BYTES or st.end is None:
                await upstream_send(up, out, sent, pw)
                sent = True
                out = bytearray()
            conn.core.consumed(st.id, n)
            await conn.flush()              # the window update
            continue
        if st.end is not None:
            try:
                out += upc.send_end(framing.relayable_trailers(st.end.trailers))
            except Exception as exc:           # less than the declared Content-Length
                raise HTTPError(400, f"bad request: {exc}", kind="body_length") from None
            entry.request_done = True
            await upstream_send(up, out, sent, pw)
            fwd.count_in(st.data_bytes)
            return
        if st.reset:
            raise Close("client reset the stream")
        if out:
            await upstream_send(up, out, sent, pw)
            sent = True
            out = bytearray()
        st.wake = trio.Event()
        timeout, phase = limits.body_timeout_s, BODY_IN
        rate = limits.min_body_rate_bps
        if rate > 0:        # the same minimum average rate as an HTTP/1.1 body (body.py)
            allowed = max(limits.min_body_rate_grace_s, st.data_bytes / rate) - waited
            if allowed < timeout:
                timeout, phase = max(allowed, 0.0), BODY_RATE
        pw.arm(phase, timeout)
        t = time.monotonic()
        await st.wake.wait()
        waited += time.monotonic() - t


async def _respond(conn: Connection, st: H2Stream, up, req: Request, entry: AccessEntry, sink: H2Sink,
                   watch: Watch, pw: Watch | None) -> bool:
    """Relay the upstream's response to the stream through the engine's response side (1xx,
    head, body, trailers). True when the upstream leg ended cleanly."""
    fwd = conn.fwd
    response = await fwd.read_response_head(sink, up, False, watch, None)
    entry.status = response.status
    await fwd.stream_response(sink, up, response, entry, watch, close=False)
    return True


def _first(group: BaseExceptionGroup) -> BaseException:
    """The exception to re-raise from a nursery's group: a non-cancellation first."""
    flat = list(_leaves(group))
    for exc in flat:
        if not isinstance(exc, trio.Cancelled):
            return exc
    return flat[0]


def _leaves(group: BaseExceptionGroup):
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc
