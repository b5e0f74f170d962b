"""An exchange whose request has a body: both directions at once.

Theory of operation
-------------------
Two tasks in one nursery share a :class:`Flow`:

* the **pump** streams the request upstream: the head (alone first when the client sent
  ``Expect: 100-continue``, else coalesced with the first body bytes), then the body's data and
  its end with the client's trailers, as the :class:`~.body.RequestBody` source gives them (the
  upstream request is chunked when the client's is). Its waits run on a watch of its own: the
  client's next bytes (``body_timeout_s``, and the minimum average rate after a grace period:
  408), the upstream taking them (504).
* this task relays the response the moment it comes (``Forwarder.stream_response``): a final
  answer before the body ends (a 401 to an upload) reaches the client at once.

``Expect: 100-continue``: the pump sends the head and waits; the app's ``100`` is relayed and the
pump goes on. When the app answers finally instead, the pump stops without reading a byte and the
answer goes out with ``Connection: close`` (RFC 9110 §10.1.1). When the app says nothing for
``EXPECT_WAIT_S`` (what curl waits), or is known to speak HTTP/1.0, the proxy sends ``100`` itself.
Every send to the client before the response head goes through ``Flow.lock`` (a ``100`` from the
pump and a 1xx relayed by this task never interleave).

When the response ends before the request body (an early answer), the pump is stopped and the
rest of the body is read and dropped, up to ``DISCARD_MAX_BYTES`` within ``DISCARD_S``; if it ends
there the connection is kept, otherwise it is closed after a lingering close (RFC 9112 §9.3). The
upstream connection is never reused after an early answer.

Errors: a bad body (400), a too large one (413) or a too slow one (408) ends both tasks; the
client gets the status when no response has started, a close otherwise. An upstream that stops
taking the body does not cancel the response side: what the app already answered is still relayed.
"""

from __future__ import annotations

from typing import Any, Protocol

import trio

from ..errors import HTTPError, UpstreamError
from . import framing
from .body import RequestBody
from .deadlines import Watch
from .exchange import Drain, End, Leg, ResponseHead, Route, UpstreamPool
from .h1server import RequestHead
from .response import informational_head
from .shell import (
    DISCARD,
    EXPECT,
    UPSTREAM_WAIT,
    AccessEntry,
    Close,
    client_send,
    linger,
    upstream_send,
)
from .sink import H1Sink


class Engine(Protocol):
    """What a body exchange uses of the engine (``forward.Forwarder``, which calls in here): the
    pool, the upstream's response relayed to the client, and what an expired deadline means."""

    route: Route
    drain: Drain

    async def acquire(self, pool: UpstreamPool, fresh: bool = False) -> Leg: ...
    def release(self, pool: UpstreamPool, up: Leg) -> None: ...
    def count_in(self, n: int) -> None: ...
    def h1_sink(self, stream: Any, head: RequestHead, watch: Watch) -> H1Sink: ...
    async def read_response_head(self, sink: Any, up: Leg, upgrading: bool, watch: Watch,
                                 flow: Any) -> ResponseHead: ...
    async def stream_response(self, sink: Any, up: Leg, response: ResponseHead, entry: AccessEntry,
                              watch: Watch, *, close: bool) -> bool: ...
    def upstream_failed(self, exc: UpstreamError) -> HTTPError: ...
    def expiry(self, phase: str) -> HTTPError | Close: ...

EXPECT_WAIT_S = 1.0               # curl's --expect100-timeout default
EXPECT_ANSWER = informational_head(100, b"Continue", ())
DISCARD_MAX_BYTES = 1024 * 1024   # after an early answer, read and drop at most this much of the body
DISCARD_S = 2.0                   # ... within this long, else close
FLUSH_BYTES = 256 * 1024


class Flow:
    """The state both tasks of a body exchange share."""

    __slots__ = ("fwd", "head", "body", "up", "watch", "nursery", "lock", "go", "continued",
                 "response_started", "request_done", "error", "upstream_broken", "stopped", "http10",
                 "pump_done")

    def __init__(self, fwd: Engine, head: RequestHead, body: RequestBody, up: Leg,
                 watch: Watch) -> None:
        self.fwd = fwd
        self.head = head
        self.body = body
        self.up = up
        self.watch = watch                  # the pump's own deadlines
        self.nursery: trio.Nursery | None = None
        self.lock = trio.Lock()             # client sends before the response head
        self.go = trio.Event()              # the pump may send the body (Expect)
        self.continued = not head.expect_continue   # the client was told to send the body
        self.response_started = False
        self.request_done = False
        self.error: BaseException | None = None     # the pump's client-side failure
        self.upstream_broken = False
        self.stopped = False
        self.http10 = False                 # the app is known to speak HTTP/1.0: no 100 from it
        self.pump_done = False              # the request went upstream (or could go no further)

    async def send_interim(self, sink, status: int, reason: bytes, items) -> None:
        async with self.lock:
            await sink.informational(status, reason, items)

    async def app_continued(self, stream, watch: Watch) -> None:
        """The app sent ``100 Continue``: pass it on (once) and let the pump go."""
        async with self.lock:
            if not self.continued and not self.response_started:
                await client_send(stream, EXPECT_ANSWER, watch, self.fwd.route.limits.body_timeout_s)
                self.continued = True
        self.go.set()

    async def start_response(self) -> None:
        async with self.lock:
            self.response_started = True
        self.go.set()

    async def continue_ourselves(self, stream) -> None:
        async with self.lock:
            if not self.continued and not self.response_started:
                await client_send(stream, EXPECT_ANSWER, self.watch, self.fwd.route.limits.body_timeout_s)
                self.continued = True

    def stop_pump(self) -> None:
        self.stopped = True
        self.watch.scope.cancel()


async def exchange_with_body(fwd: Engine, stream, head: RequestHead, upstream_req, pending: bytearray,
                             entry: AccessEntry, pool: UpstreamPool, watch: Watch) -> bool:
    reader = head.body_reader()
    if pending:
        reader.feed(bytes(pending))
        pending.clear()
    body = RequestBody(stream, reader, fwd.route.limits)
    up = await fwd.acquire(pool)
    watchdog = fwd.drain.watchdog
    flow = Flow(fwd, head, body, up, watchdog.watch())
    flow.http10 = pool.http10
    keep = False
    try:
        keep = await _run(fwd, stream, flow, up.h11.send_head(*upstream_req), entry, watch)
    finally:
        watchdog.forget(flow.watch)
        if up.h11.http10:
            pool.http10 = True
        if not keep or not flow.request_done:
            pool.discard(up)
        else:
            fwd.release(pool, up)
    entry.bytes_in = body.data_bytes
    fwd.count_in(body.data_bytes)
    if keep and not body.done:
        keep = await _discard(stream, body, watch)
    elif not keep and not body.done:
        await linger(stream)
    if keep:
        pending += body.rest()
    return keep


async def _run(fwd: Engine, stream, flow: Flow, upstream_req, entry: AccessEntry, watch: Watch) -> bool:
    keep = False
    failure: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            flow.nursery = nursery
            nursery.start_soon(_pump, fwd, stream, flow, upstream_req, entry, watch)
            try:
                watch.disarm()    # no response deadline while the body streams (the pump's bound it)
                sink = fwd.h1_sink(stream, flow.head, watch)
                response = await fwd.read_response_head(sink, flow.up, False, watch, flow)
                await flow.start_response()
                entry.status = response.status
                close = not flow.continued or flow.upstream_broken
                keep = await fwd.stream_response(sink, flow.up, response, entry, watch, close=close)
                if not flow.body.done:
                    flow.stop_pump()       # an early answer: the rest of the body is not the app's
            except (HTTPError, Close, UpstreamError) as exc:
                failure = exc
                flow.stop_pump()
    except BaseExceptionGroup as group:       # only cancellations get here: both tasks catch the rest
        raise _first(group) from None
    if flow.error is not None:            # the pump's failure ended the exchange
        failure = flow.error
    if failure is not None:
        if isinstance(failure, UpstreamError):
            failure = fwd.upstream_failed(failure)
        if isinstance(failure, HTTPError) and entry.responded:
            failure = Close(failure.reason)
        raise failure
    return keep


def _first(group: BaseExceptionGroup) -> BaseException:
    """The exception to re-raise from a nursery's group: a non-cancellation first."""
    flat: list[BaseException] = []

    def walk(g: BaseExceptionGroup) -> None:
        for exc in g.exceptions:
            walk(exc) if isinstance(exc, BaseExceptionGroup) else flat.append(exc)

    walk(group)
    for exc in flat:
        if not isinstance(exc, trio.Cancelled):
            return exc
    return flat[0]


async def _pump(fwd: Engine, stream, flow: Flow, upstream_req, entry: AccessEntry,
                conn_watch: Watch) -> None:
    bw = flow.watch
    try:
        with bw.scope:
            await _pump_body(fwd, stream, flow, upstream_req, entry)
    except (HTTPError, Close) as exc:
        flow.error = exc
        flow.nursery.cancel_scope.cancel()
        return
    except UpstreamError:
        flow.upstream_broken = True     # the response side reads what the app said, or fails
    if bw.expired is not None and not flow.stopped:
        flow.error = fwd.expiry(bw.expired)
        flow.nursery.cancel_scope.cancel()
        return
    flow.pump_done = True
    if not flow.response_started and not flow.stopped:
        # the request is sent (or can go no further): the response head's deadline starts now
        conn_watch.arm(UPSTREAM_WAIT, fwd.route.limits.upstream_response_timeout_s)


async def _pump_body(fwd: Engine, stream, flow: Flow, upstream_req, entry: AccessEntry) -> None:
    body, up, bw = flow.body, flow.up, flow.watch
    upc = up.h11
    out = bytearray(upstream_req)        # the head, written before the tasks started
    sent = False
    if not flow.continued:
        await upstream_send(up, out, False, bw)
        out = bytearray()
        sent = True
        if not (upc.http10 or flow.http10):
            await _wait_for_app(fwd, flow)
        if flow.response_started and not flow.continued:
            return                       # refused before the client sent a byte of the body
        await flow.continue_ourselves(stream)
    max_body = fwd.route.limits.max_body_bytes
    while True:
        event = body.poll()
        if event is None:                # about to wait for the client: what we have goes now
            if out:
                await upstream_send(up, out, sent, bw)
                sent = True
                out = bytearray()
            await body.wait(bw)
            continue
        if type(event) is End:
            out += upc.send_end(framing.relayable_trailers(event.trailers))
            break
        if max_body is not None and body.data_bytes > max_body:
            raise HTTPError(413, f"request body larger than {max_body} bytes", kind="body_too_large")
        out += upc.send_data(event)
        if len(out) >= FLUSH_BYTES:
            await upstream_send(up, out, sent, bw)
            sent = True
            out = bytearray()
    entry.request_done = True
    await upstream_send(up, out, sent, bw)
    flow.request_done = True


async def _wait_for_app(fwd: Engine, flow: Flow) -> None:
    """Up to EXPECT_WAIT_S for the app's 100 Continue or final answer."""
    watchdog = fwd.drain.watchdog
    ew = watchdog.watch()
    try:
        with ew.scope:
            ew.arm(EXPECT, EXPECT_WAIT_S)
            await flow.go.wait()
    finally:
        watchdog.forget(ew)


async def _discard(stream, body: RequestBody, watch: Watch) -> bool:
    """After an early answer: read and drop the rest of the request body, within bounds. True
    when it ended there (the connection may carry the next request)."""
    watch.arm(DISCARD, DISCARD_S)
    start = body.data_bytes
    try:
        while True:
            event = body.poll()
            if type(event) is End:
                return True
            if event is None:
                if body.data_bytes - start > DISCARD_MAX_BYTES:
                    await linger(stream)
                    return False
                await body.wait(watch, arm=False)
    except HTTPError:
        await linger(stream)
        return False
