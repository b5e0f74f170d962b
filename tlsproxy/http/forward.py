"""THE request-forwarding engine: the I/O shell around the sans-IO HTTP/1.1 core.

Theory of operation
-------------------
A client connection is served by :meth:`Forwarder.serve` in a loop; each request becomes an
*exchange* (one request, one response, one access-log line):

1. wait for a request head (``idle_timeout_s`` before its first byte, then ``head_timeout_s`` for
   the whole head → 408) and parse it (``h1server.parse_request_head``: checks, framing, Expect);
2. rewrite the head (pure, ``headers.py``) and take a pooled upstream connection;
3. a request **without a body** is complete with its head: one task sends the head and relays
   the response (the fast path: no second task, no lock). A request **with a body** runs both
   directions at once (:mod:`.duplex`): a pump task streams the body upstream (decoded by
   ``framing.BodyReader``: strict chunk lines, trailers, minimum rate) while this task relays the
   response as soon as it arrives — an early answer (a 401 before the body is read) reaches the
   client at once. ``Expect: 100-continue`` goes to the app; the proxy answers ``100`` itself only
   when the app says nothing for ``EXPECT_WAIT_S`` or is known to speak HTTP/1.0;
4. the response head and body are relayed, coalescing the head with the first body bytes; trailers
   reach a client that sent ``TE: trailers`` and are dropped otherwise (RFC 9110 §6.5);
5. a 101 answer to an upgrade request turns the connection into a two-way byte relay;
6. keep-alive when both legs finished cleanly, otherwise close.

Deadlines, one way: every wait arms the connection's :class:`~.deadlines.Watch` (two attribute
stores and a clock read) and one watchdog task cancels the connection when a deadline passes. A
request body's pump has a watch of its own (so the response's deadlines and the body's run side
by side), and so has the short wait for an app's ``100 Continue``. What is said to the client after
an expiry (408, 504) goes out under a watch of its own, shielded from the expired one.

Errors the proxy answers itself (4xx/5xx) always close the client connection afterwards, with a
lingering close so the client reads the answer. Failures after the response started can only be
signalled by closing the client connection (a truncated response, never a mixed one).
Inbound and outbound both use this engine; they differ only in the pool's opener and the
:class:`~.exchange.Route` (listener name, Host rewrite, authorisation, scheme facts).
"""

from __future__ import annotations

import math
import time

import trio

from ..errors import HTTPError, UpstreamError
from ..log import get_logger
from ..metrics import Metrics
from ..relay import relay
from . import framing
from . import headers as hdr
from .deadlines import Watch
from .duplex import exchange_with_body
from .exchange import IDLE, ConnFacts, Drain, End, Leg, ResponseHead, Route, UpstreamPool
from .h1client import CLOSED, NEED_DATA, UpstreamProtocolError
from .h1server import RequestHead, parse_request_head
from .local import answer_locally
from .response import FramingError, informational_head
from .shell import (
    BODY_IN,
    BODY_RATE,
    CLIENT_SEND,
    DISCARD,
    HEAD,
    UPSTREAM_BODY,
    UPSTREAM_SEND,
    UPSTREAM_WAIT,
    AccessEntry,
    Close,
    client_send,
    close_stream,
    code_class,
    receive,
    upstream_receive,
    upstream_send,
)
from .sink import H1Sink

log = get_logger("http")

UPSTREAM_READ_BYTES = 256 * 1024  # large upstream reads: fewer trips through Python per byte
REFUSE_TIMEOUT_S = 5.0            # an error answer and its lingering close, at most
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


class Forwarder:
    def __init__(self, route: Route, metrics: Metrics, drain: Drain) -> None:
        self.route = route
        self.metrics = metrics
        self.drain = drain
        name = route.name
        self._m_requests = {c: metrics.requests.labels(name, c) for c in ("1xx", "2xx", "3xx", "4xx", "5xx")}
        self._m_duration = metrics.request_duration.labels(name)
        self._m_in = metrics.bytes_received.labels(name, "http")
        self._m_out = metrics.bytes_sent.labels(name, "http")

    # ------------------------------------------------------------------ connection loop
    async def serve(self, stream, facts: ConnFacts, received: bytes = b"") -> None:
        """Serve one client connection (a stream with ``close_now``/``linger_close``) to its end.
        ``received``: bytes already read from it (a listener that peeked)."""
        pending = bytearray(received)      # received, not yet parsed
        watchdog = self.drain.watchdog
        watch = watchdog.watch()
        first = True
        try:
            with watch.scope:
                while True:
                    try:
                        head = await self._read_head(stream, pending, first, watch)
                    except Close:
                        return
                    except HTTPError as err:
                        await self.refuse(stream, facts, err, None)
                        return
                    except trio.Cancelled:
                        if watch.expired == HEAD:
                            await self.refuse(stream, facts, HTTPError(
                                408, "request head not received in time", kind="head_timeout"), None,
                                shield=True)
                            return
                        if watch.expired is not None:
                            return      # idle (or woken by a drain): close quietly
                        raise
                    first = False
                    keep = await self._handle(stream, head, pending, facts, watch)
                    if not keep:     # the writer said close, or the request was not read to its end
                        return
        finally:
            watchdog.forget(watch)
            close_stream(stream)

    async def _read_head(self, stream, pending: bytearray, first: bool, watch: Watch) -> RequestHead:
        """The next request head, from ``pending`` (bytes already received) and the stream; what
        follows the head stays in ``pending``."""
        limits = self.route.limits
        started = bool(pending)
        if started:      # pipelined bytes: the head's deadline runs from now
            watch.arm(HEAD, limits.head_timeout_s)
        scanned = 0       # bytes of the (growing) head buffer already searched: each read is scanned once
        while True:
            end = hdr.find_head_end(pending, max(0, scanned - 2))
            if end >= 0:
                head = parse_request_head(pending, end, limits.max_head_bytes)
                del pending[:end]
                return head
            if len(pending) > limits.max_head_bytes:
                raise hdr.map_h11_error(431, "request head too large", pending)
            if started:
                bare_cr = hdr.check_bare_cr(pending, max(0, scanned - 1))
                if bare_cr is not None:
                    raise bare_cr
                scanned = len(pending)
                data = await receive(stream)     # under the HEAD deadline (408)
                if not data:
                    raise Close("eof in head")
                pending += data
                continue
            # Idle before the first byte: the keep-alive idle timeout (the handshake deadline
            # already bounded the first request's wait), cut short by a drain.
            if self.drain.draining:
                raise Close("idle")
            watch.arm(IDLE, limits.head_timeout_s if first else limits.idle_timeout_s)
            data = await receive(stream)
            if not data:
                raise Close("eof")
            pending += data
            started = True
            watch.arm(HEAD, limits.head_timeout_s)

    # ------------------------------------------------------------------ one exchange
    async def _handle(self, stream, head: RequestHead, pending: bytearray, facts: ConnFacts,
                      watch: Watch) -> bool:
        """Proxy one request. Returns True to keep the client connection for another request;
        ``pending`` then holds the bytes that followed it."""
        route = self.route
        t0 = time.perf_counter()
        entry = AccessEntry(head.method, head.target, facts)
        watch.disarm()        # the upstream dial has its own deadline
        try:
            hdr.check_request(head.method, head.target, head.http_version, head.items)
            if facts.deny is not None:
                raise facts.deny
            if route.local is not None:
                keep = await answer_locally(route, self.drain, stream, head, pending, entry, watch)
            else:
                keep = await self._forward(stream, head, pending, entry, watch)
        except HTTPError as err:
            await self.refuse(stream, facts, err, entry)
            keep = False
        except Close as why:
            entry.status = entry.status or 499
            entry.note = why.why
            keep = False
        except trio.Cancelled:
            expired = self._expired(watch)
            if expired is None:
                raise           # not our deadline: the drain's cut, or the process stopping
            if isinstance(expired, HTTPError) and not entry.responded:
                await self.refuse(stream, facts, expired, entry, shield=True)
            else:               # the response has started: all we can do is close
                entry.status = entry.status or 499
                entry.note = expired.why if isinstance(expired, Close) else expired.kind
            keep = False
        self.finish(entry, t0)
        return keep and not self.drain.draining

    def finish(self, entry: AccessEntry, t0: float) -> None:
        """The exchange's metrics and its one access-log line."""
        duration = time.perf_counter() - t0
        self._m_duration.observe(duration)
        if entry.status and entry.status != 499:
            self._m_requests[code_class(entry.status)].inc()
        if self.route.access_log:
            entry.emit(self.route.name, duration)

    def _expired(self, watch: Watch) -> HTTPError | Close | None:
        """What an expired deadline inside a request means (None: the cancellation is not ours)."""
        phase = watch.expired
        if phase is None:
            return None
        return self.expiry(phase)

    def expiry(self, phase: str) -> HTTPError | Close:
        if phase == UPSTREAM_WAIT:
            self.upstream_error("timeout")
            return HTTPError(504, "upstream did not answer in time", kind="upstream_timeout")
        if phase == UPSTREAM_SEND:
            self.upstream_error("timeout")
            return HTTPError(504, "upstream failed: upstream stopped reading the request",
                             kind="upstream_timeout")
        if phase == UPSTREAM_BODY:
            self.upstream_error("body_timeout")
            return Close("upstream response body stalled")
        if phase == BODY_IN:
            return Close("request body stalled")
        if phase == BODY_RATE:
            return HTTPError(408, "request body too slow (below the minimum body rate)", kind="body_too_slow")
        if phase == CLIENT_SEND:
            return Close("client stopped reading the response")
        if phase == DISCARD:
            return Close("rest of the request body not read in time after an early answer")
        return Close(f"{phase or 'wait'} timed out")

    async def _forward(self, stream, head: RequestHead, pending: bytearray, entry: AccessEntry,
                       watch: Watch) -> bool:
        route = self.route
        items = head.items
        pool, target, host_override = route.pool, head.target, route.host_override
        if route.resolve is not None:
            dest = route.resolve(head.method, head.target)
            pool, target, host_override = dest.pool, dest.target, dest.host_override
        else:
            target, items = hdr.to_origin_form(target, items)
        assert pool is not None, "a route without a local handler has a pool"
        has_body = head.has_body
        out_items, request_id, upgrade = hdr.rewrite_request(
            items, entry.facts.forward, host_override=host_override,
            expect_continue=has_body and head.expect_continue, te_trailers=head.te_trailers)
        entry.request_id = request_id
        if not has_body:
            return await self._bodiless(stream, head, (head.method, target, out_items), upgrade,
                                        pending, entry, pool, watch)
        max_body = route.limits.max_body_bytes
        if head.framing == framing.CHUNKED:
            out_items.append((b"Transfer-Encoding", b"transfer-encoding", b"chunked"))
        elif max_body is not None and head.length > max_body:
            raise HTTPError(413, f"request body larger than {max_body} bytes", kind="body_too_large")
        return await exchange_with_body(self, stream, head, (head.method, target, out_items), pending,
                                        entry, pool, watch)

    async def _bodiless(self, stream, head: RequestHead, upstream_req, upgrade: bytes | None,
                        pending: bytearray, entry: AccessEntry, pool: UpstreamPool, watch: Watch) -> bool:
        """A request complete with its head: one task sends it and relays the answer."""
        limits = self.route.limits
        retryable = head.method in IDEMPOTENT
        up = await self.acquire(pool)
        try:
            while True:
                try:
                    data = up.h11.send_head(*upstream_req) + up.h11.send_end()
                    await upstream_send(up, data, False, watch)
                    entry.request_done = True
                    watch.arm(UPSTREAM_WAIT, limits.upstream_response_timeout_s)
                    sink = self.h1_sink(stream, head, watch)
                    response = await self.read_response_head(sink, up, upgrade is not None, watch, None)
                    break
                except UpstreamError as exc:
                    if retryable and up.reused and exc.sent_nothing:
                        pool.discard(up)
                        up = await self.acquire(pool, fresh=True)
                        retryable = False
                        continue
                    raise
        except UpstreamError as exc:
            pool.discard(up)
            raise self.upstream_failed(exc) from None
        except BaseException:
            pool.discard(up)
            raise
        entry.status = response.status
        if response.status == 101:
            return await self._switch(stream, head, pending, up, response, entry, pool, watch)
        try:
            keep = await self.stream_response(sink, up, response, entry, watch, close=False)
        except BaseException:
            pool.discard(up)
            raise
        self.release(pool, up)
        return keep

    def release(self, pool: UpstreamPool, up: Leg) -> None:
        if up.h11.trailing_data[0]:
            pool.discard(up)    # bytes beyond the response: never hand them to the next request
        else:
            pool.release(up)

    def upstream_failed(self, exc: UpstreamError) -> HTTPError:
        self.upstream_error(exc.kind)
        status = 504 if exc.kind == "timeout" else 502
        return HTTPError(status, f"upstream failed: {exc.reason}", kind="upstream_" + exc.kind)

    async def acquire(self, pool: UpstreamPool, fresh: bool = False) -> Leg:
        try:
            return await pool.acquire(fresh=fresh)
        except UpstreamError as exc:
            self.upstream_error(exc.kind)
            status = 504 if exc.kind == "connect_timeout" else 502
            raise HTTPError(status, f"upstream unavailable: {exc.reason}", kind="upstream_" + exc.kind) \
                from None

    def upstream_error(self, kind: str) -> None:
        self.metrics.upstream_errors.labels(self.route.name, kind).inc()

    async def read_response_head(self, sink, up: Leg, upgrading: bool, watch: Watch,
                                 flow) -> ResponseHead:
        """The final response head (or a 101). 1xx answers before it are relayed to the client's
        ``sink`` (``flow``: an HTTP/1.1 body exchange's shared state, which owns the ``100
        Continue`` decision; without one a ``100`` stays here)."""
        got = 0
        upc = up.h11
        while True:
            try:
                event = upc.next_event()
            except UpstreamProtocolError as exc:
                raise UpstreamError("protocol", f"invalid response: {exc}", sent_nothing=got == 0) from None
            if event is NEED_DATA:
                data = await upstream_receive(up, got == 0)
                got += len(data)
                upc.receive_data(data)   # b"" (EOF) becomes CLOSED or an error above
                continue
            if event is CLOSED:
                raise UpstreamError("closed", "upstream closed the connection before answering",
                                    sent_nothing=got == 0)
            status = event.status
            if status >= 200 or status == 101:
                if status == 101 and not upgrading:
                    raise UpstreamError("protocol", "101 without an upgrade request")
                return event
            deadline = watch.deadline    # the response head's deadline runs on while we relay a 1xx
            phase = watch.phase
            if status == 100:
                if flow is not None:
                    await flow.app_continued(sink.stream, watch)
            else:                        # 103 etc. pass through
                items = hdr.rewrite_response(event.items)
                if flow is not None:
                    await flow.send_interim(sink, status, event.reason, items)
                else:
                    await sink.informational(status, event.reason, items)
            watch.phase, watch.deadline = phase, deadline
            if flow is not None and flow.pump_done and watch.deadline == math.inf:
                # the request ended while we relayed the 1xx: the head's deadline starts now
                watch.arm(UPSTREAM_WAIT, self.route.limits.upstream_response_timeout_s)

    async def stream_response(self, sink, up: Leg, response: ResponseHead, entry: AccessEntry,
                              watch: Watch, *, close: bool) -> bool:
        """Relay the response to the client's ``sink`` (``sink.py``: an HTTP/1.1 connection or an
        HTTP/2 stream); True when the client connection may carry another request."""
        limits = self.route.limits
        await sink.head(response.status, response.reason, hdr.rewrite_response(response.items),
                        close=close or self.drain.draining)
        entry.responded = True
        upc = up.h11
        try:
            while True:
                try:
                    event = upc.next_event()
                except UpstreamProtocolError as exc:
                    self.upstream_error("protocol")
                    if not sink.flushed:    # nothing reached the client yet: still a clean 502
                        raise HTTPError(502, f"upstream sent an invalid response: {exc}",
                                        kind="upstream_protocol") from None
                    raise Close(f"upstream broke the response body: {exc}") from None
                if event is NEED_DATA:
                    await sink.flush()
                    watch.arm(UPSTREAM_BODY, limits.body_timeout_s)
                    try:
                        data = await up.stream.receive_some(UPSTREAM_READ_BYTES)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        self.upstream_error("reset")
                        raise Close("upstream reset during the response body") from None
                    upc.receive_data(data)
                    continue
                if type(event) is End:
                    await sink.end(event.trailers)
                    break
                await sink.data(event)
        except FramingError as exc:
            self.upstream_error("protocol")
            raise Close(f"upstream body does not match its framing: {exc}") from None
        finally:
            entry.bytes_out = sink.sent
            sink.m_out.inc(sink.sent)
        return sink.keep_alive

    def h1_sink(self, stream, head: RequestHead, watch: Watch) -> H1Sink:
        return H1Sink(stream, head, watch, self.route.limits.body_timeout_s, self._m_out)

    async def _switch(self, stream, head: RequestHead, pending: bytearray, up: Leg,
                      response: ResponseHead, entry: AccessEntry, pool: UpstreamPool, watch: Watch) -> bool:
        """The app accepted an upgrade: answer 101, then relay bytes both ways until both end."""
        try:
            if not head.upgrade:    # cannot happen: the client leg asked, or h1client refused the 101
                raise Close("101 for a request that did not ask to upgrade")
            items = hdr.rewrite_response(response.items, upgrade=True)
            entry.responded = True
            timeout_s = self.route.limits.body_timeout_s
            await client_send(stream, informational_head(101, response.reason, items), watch, timeout_s)
            client_rest = bytes(pending)
            pending.clear()
            upstream_rest = up.h11.trailing_data[0]
            if upstream_rest:
                await client_send(stream, upstream_rest, watch, timeout_s)
            if client_rest:
                await upstream_send(up, client_rest, True, watch)
            watch.disarm("upgraded")      # the relay has its own timeouts
            result = await relay(stream, up.stream, idle_timeout_s=None,
                                 close_timeout_s=self.route.limits.upgrade_close_timeout_s)
            entry.bytes_in = result.a_to_b + len(client_rest)
            entry.bytes_out = result.b_to_a + len(upstream_rest)
            entry.note = "upgraded"
        finally:
            pool.discard(up)
        return False

    async def refuse(self, stream, facts: ConnFacts, err: HTTPError, entry: AccessEntry | None, *,
                     shield: bool = False) -> None:
        """Answer ``err`` and close. ``shield``: the connection's scope is already cancelled (an
        expired deadline), so the answer goes out under a shielded scope of its own."""
        self.metrics.client_errors.labels(self.route.name, str(err.status)).inc()
        if entry is not None:
            entry.status = err.status
            entry.note = err.kind
        else:
            self._m_requests[code_class(err.status)].inc()
            log.info("request refused", listener=self.route.name, client=facts.client, status=err.status,
                     reason=err.reason)
        if err.status >= 500 and err.kind.startswith("upstream"):
            log.warning("upstream error", listener=self.route.name, client=facts.client, status=err.status,
                        reason=err.reason, upstream=self.route.upstream_label)
        watchdog = self.drain.watchdog
        guard = watchdog.watch()          # the answer's own deadline, on the one mechanism
        guard.scope.shield = shield
        try:
            with guard.scope:
                guard.arm(CLIENT_SEND, REFUSE_TIMEOUT_S)
                await stream.send_all(hdr.error_response(err.status, err.reason))
                await stream.linger_close()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            watchdog.forget(guard)

    def count_in(self, n: int) -> None:
        self._m_in.inc(n)

