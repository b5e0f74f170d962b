"""THE request-forwarding engine: one client connection, many requests, one upstream pool.

Theory of operation
-------------------
A client connection is served by :meth:`Forwarder.serve` in a loop:

1. wait for a request head (``idle_timeout_s`` before its first byte, then ``head_timeout_s`` for
   the whole head → 408; every wait's deadline is a :class:`~.deadlines.Watch` on the connection);
   check what h11 lets through (bare LF, obs-fold, CL+TE, versions, Host);
2. rewrite the head (pure, ``headers.py``) and take a pooled upstream connection;
3. stream the request body with backpressure: every upstream write is awaited before the next
   client read, and writes are coalesced until we are about to wait on the client; ``Expect:
   100-continue`` is answered by the proxy when it first needs body bytes;
4. wait for the response head (``upstream_response_timeout_s`` from the end of the request body → 504),
   then stream the body back, coalescing the head with the first body bytes;
5. a 101 answer to an upgrade request turns the connection into a two-way byte relay;
6. keep-alive when both h11 state machines finished cleanly, otherwise close.

Errors the proxy answers itself (4xx/5xx) always close the client connection afterwards, with a
lingering close so the client reads the answer. Failures after the response started can only be
signalled by closing the client connection (a truncated response, never a mixed one).
Inbound and outbound both use this engine; they differ only in the pool's opener and the
:class:`Route` (listener name, Host rewrite, authorisation, scheme facts).
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import h11
import trio
from h11._headers import Headers

from ..errors import HTTPError, UpstreamError
from ..log import get_logger
from ..metrics import Metrics
from ..relay import relay
from . import headers as hdr
from .deadlines import Watch, Watchdog
from .pool import Pool, UpstreamConn
from .response import FramingError, ResponseWriter, informational_head

log = get_logger("http")
access = get_logger("access")

FLUSH_BYTES = 256 * 1024          # coalesce body writes up to this before sending
DIRECT_BYTES = 16 * 1024          # a body chunk this large goes out as it is (no copy into a buffer)
UPSTREAM_READ_BYTES = 256 * 1024  # large upstream reads: fewer trips through Python per byte
# Deadlines: one Watch per client connection (deadlines.py), not a cancel scope per wait.
EXPECT_ANSWER = b"HTTP/1.1 100 Continue\r\n\r\n"
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

# What a client connection is waiting for (Watch.phase): an expired deadline is answered by phase.
IDLE = "idle"                      # between requests (or before the first): quiet close
HEAD = "head"                      # the rest of a request head: 408
BODY_IN = "request_body"           # the client's next request body bytes: close
UPSTREAM_SEND = "upstream_send"    # the upstream taking our request: 504
UPSTREAM_WAIT = "upstream_response"  # the upstream's response head: 504
UPSTREAM_BODY = "upstream_body"    # the upstream's next response body bytes: close
CLIENT_SEND = "client_send"        # the client taking what we send: close

_NEED_DATA = h11.NEED_DATA
_PAUSED = h11.PAUSED
_Data = h11.Data
_EndOfMessage = h11.EndOfMessage
_END = h11.EndOfMessage()     # events are frozen: one instance for every request


@dataclass(frozen=True)
class Limits:
    max_head_bytes: int = 32 * 1024
    max_body_bytes: int | None = None
    head_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    idle_timeout_s: float = 60.0
    upstream_response_timeout_s: float = 60.0
    upgrade_close_timeout_s: float = 5.0


@dataclass(frozen=True)
class Route:
    """What differs between listeners that share the engine."""

    name: str                                    # metrics/log label: "inbound", "http", "outbound:..."
    pool: Pool
    limits: Limits
    host_override: bytes | None = None           # outbound: Host becomes the peer's authority
    access_log: bool = True
    upstream_label: str = ""                     # for logs: where requests go
    # Per-request routing (the outbound forward proxy): (method, target) -> Destination, or raise
    # HTTPError to refuse. None: every request goes to ``pool`` with ``host_override``.
    resolve: Callable[[bytes, bytes], Destination] | None = None


@dataclass(frozen=True)
class Destination:
    """Where one request goes when the route resolves requests one by one."""

    pool: Pool
    target: bytes                                # the request target sent upstream (origin-form)
    host_override: bytes | None = None


@dataclass
class ConnFacts:
    """Facts about one client connection, fixed once the handshake is done."""

    client: str                                  # "ip:port"
    forward: hdr.ForwardFacts
    tls_version: str = "-"
    identity: str = ""                           # verified client identity, for logs
    deny: HTTPError | None = None                # set when mTLS identity rules refuse this client
    extra_log: dict = field(default_factory=dict)


class Drain:
    """Tells connection handlers that a drain started, and wakes the ones idling between requests.
    Owns the :class:`~.deadlines.Watchdog` that enforces every client connection's deadlines (its
    ``run`` task belongs in the application's root nursery)."""

    def __init__(self) -> None:
        self.draining = False
        self.watchdog = Watchdog()

    def start(self) -> None:
        self.draining = True
        for w in list(self.watchdog.watches):
            if w.phase == IDLE:
                Watchdog.fire(w)


class _Close(Exception):
    """End the client connection quietly (EOF, idle timeout, client gone, stalled body)."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


def _chunked_reader(conn: h11.Connection):
    """h11's reader of a chunked request body (its position tells a chunk-size line from data),
    or None for other framings."""
    reader = getattr(conn, "_reader", None)
    return reader if hasattr(reader, "_bytes_in_chunk") and hasattr(reader, "_reading_trailer") else None


def _request(method: bytes, target: bytes, items: list[hdr.Triple]) -> h11.Request:
    """An h11 Request for a head parsed by ``parse_simple_request`` (already validated: built
    without h11's constructor, which would walk the headers again)."""
    req = object.__new__(h11.Request)
    set_ = object.__setattr__
    set_(req, "method", method)
    set_(req, "target", target)
    set_(req, "http_version", b"1.1")
    set_(req, "headers", Headers(items))
    return req


def _unparsed(conn: h11.Connection) -> bytes | bytearray:
    buf = getattr(conn, "_receive_buffer", None)
    data = getattr(buf, "_data", None)
    return data if data is not None else conn.trailing_data[0]


class Forwarder:
    def __init__(self, route: Route, metrics: Metrics, drain: Drain,
                 on_request: Callable[[], None] | None = None) -> None:
        self.route = route
        self.metrics = metrics
        self.drain = drain
        name = route.name
        self._m_requests = {c: metrics.requests.labels(name, c) for c in ("1xx", "2xx", "3xx", "4xx", "5xx")}
        self._m_duration = metrics.request_duration.labels(name)
        self._m_in = metrics.bytes_received.labels(name, "http")
        self._m_out = metrics.bytes_sent.labels(name, "http")

    # ------------------------------------------------------------------ connection loop
    async def serve(self, stream: trio.abc.Stream, facts: ConnFacts) -> None:
        pending = bytearray()      # received, not yet parsed
        watchdog = self.drain.watchdog
        watch = watchdog.watch()
        first = True
        try:
            with watch.scope:
                while True:
                    try:
                        request, client = await self._read_head(stream, pending, first, watch)
                    except _Close:
                        return
                    except HTTPError as err:
                        await self._refuse(stream, facts, err, None)
                        return
                    except trio.Cancelled:
                        if watch.expired == HEAD:
                            await self._refuse(stream, facts, HTTPError(
                                408, "request head not received in time", kind="head_timeout"), None,
                                shield=True)
                            return
                        if watch.expired is not None:
                            return      # idle (or woken by a drain): close quietly
                        raise
                    first = False
                    keep = await self._handle(stream, client, request, facts, watch)
                    if not keep:     # the writer said close, or the request was not read to its end
                        return
                    if client is not None:   # h11 read this request: it holds what came after it
                        pending = bytearray(client.trailing_data[0])
        finally:
            watchdog.forget(watch)
            await _close(stream)

    async def _read_head(self, stream: trio.abc.Stream, pending: bytearray, first: bool,
                         watch: Watch) -> tuple[h11.Request, h11.Connection | None]:
        """The next request head, from ``pending`` (bytes already received) and the stream.

        The common head (see :func:`~.headers.parse_simple_request`) is parsed here and comes back
        without an h11 connection: it has no body, and ``pending`` keeps what follows it. Any other
        head goes to a fresh h11 connection, which then owns the rest of the bytes (its body).
        """
        limits = self.route.limits
        started = bool(pending)
        if started:      # pipelined bytes: the head's deadline runs from now
            watch.arm(HEAD, limits.head_timeout_s)
        scanned = 0       # bytes of the (growing) head buffer already searched: each read is scanned once
        while True:
            end = hdr.find_head_end(pending, max(0, scanned - 2))
            if end >= 0:
                problem = hdr.check_head_size(pending, end, limits.max_head_bytes) or \
                    hdr.check_raw_head(pending[:end])
                if problem is not None:
                    raise problem
                simple = hdr.parse_simple_request(pending, end)
                if simple is not None:
                    del pending[:end]
                    return _request(*simple), None
                client = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_head_bytes)
                client.receive_data(bytes(pending))
                pending.clear()
                try:
                    event = client.next_event()
                except h11.RemoteProtocolError as exc:
                    raise hdr.map_h11_error(exc.error_status_hint, str(exc), _unparsed(client)) from None
                if type(event) is h11.Request:
                    return event, client
                raise HTTPError(400, "bad request: no request line", kind="malformed")
            if len(pending) > limits.max_head_bytes:      # what h11 calls "Receive buffer too long"
                raise hdr.map_h11_error(431, "request head too large", pending)
            if started:
                bare_cr = hdr.check_bare_cr(pending, max(0, scanned - 1))
                if bare_cr is not None:
                    raise bare_cr
                scanned = len(pending)
                data = await _receive(stream)     # under the HEAD deadline (408)
                if not data:
                    raise _Close("eof in head")
                pending += data
                continue
            # Idle before the first byte: the keep-alive idle timeout (the handshake deadline
            # already bounded the first request's wait), cut short by a drain.
            if self.drain.draining:
                raise _Close("idle")
            watch.arm(IDLE, limits.head_timeout_s if first else limits.idle_timeout_s)
            data = await _receive(stream)
            if not data:
                raise _Close("eof")
            pending += data
            started = True
            watch.arm(HEAD, limits.head_timeout_s)

    # ------------------------------------------------------------------ one request
    async def _handle(self, stream: trio.abc.Stream, client: h11.Connection | None, req: h11.Request,
                      facts: ConnFacts, watch: Watch) -> bool:
        """Proxy one request. Returns True to keep the client connection for another request."""
        route = self.route
        t0 = time.perf_counter()
        log_entry = _AccessEntry(req.method, req.target, facts)
        watch.disarm()        # the upstream dial has its own deadline
        try:
            hdr.check_request(req.method, req.target, req.http_version, req.headers._full_items)
            if facts.deny is not None:
                raise facts.deny
            items = req.headers._full_items
            pool, target, host_override = route.pool, req.target, route.host_override
            if route.resolve is not None:
                dest = route.resolve(req.method, req.target)
                pool, target, host_override = dest.pool, dest.target, dest.host_override
            else:
                target, items = hdr.to_origin_form(target, items)
            out_items, request_id, upgrade = hdr.rewrite_request(items, facts.forward,
                                                                 host_override=host_override)
            log_entry.request_id = request_id
            if client is not None and client.their_state is h11.SEND_BODY:
                if hdr.header_value(items, b"transfer-encoding") is not None:
                    out_items.append((b"Transfer-Encoding", b"transfer-encoding", b"chunked"))
                cl = hdr.header_value(items, b"content-length")
                if cl is not None and route.limits.max_body_bytes is not None \
                        and int(cl) > route.limits.max_body_bytes:
                    raise HTTPError(413, f"request body larger than {route.limits.max_body_bytes} bytes",
                                    kind="body_too_large")
            upstream_req = (req.method, target, out_items)    # H1Client.send_head's arguments
            keep = await self._exchange(stream, client, req, upstream_req, upgrade, log_entry, pool, watch)
        except HTTPError as err:
            await self._refuse(stream, facts, err, log_entry)
            keep = False
        except _Close as why:
            log_entry.status = log_entry.status or 499
            log_entry.note = why.why
            keep = False
        except trio.Cancelled:
            expired = self._expired(watch)
            if expired is None:
                raise           # not our deadline: the drain's cut, or the process stopping
            if isinstance(expired, HTTPError) and not log_entry.responded:
                await self._refuse(stream, facts, expired, log_entry, shield=True)
            else:               # the response has started: all we can do is close
                log_entry.status = log_entry.status or 499
                log_entry.note = expired.why if isinstance(expired, _Close) else expired.kind
            keep = False
        duration = time.perf_counter() - t0
        self._m_duration.observe(duration)
        if log_entry.status and log_entry.status != 499:
            self._m_requests[_code_class(log_entry.status)].inc()
        if route.access_log:
            log_entry.emit(route.name, duration)
        return keep and not self.drain.draining

    def _expired(self, watch: Watch) -> HTTPError | _Close | None:
        """What an expired deadline inside a request means (None: the cancellation is not ours)."""
        phase = watch.expired
        if phase is None:
            return None
        if phase == UPSTREAM_WAIT:
            self._upstream_error("timeout")
            return HTTPError(504, "upstream did not answer in time", kind="upstream_timeout")
        if phase == UPSTREAM_SEND:
            self._upstream_error("timeout")
            return HTTPError(504, "upstream failed: upstream stopped reading the request",
                             kind="upstream_timeout")
        if phase == UPSTREAM_BODY:
            self._upstream_error("body_timeout")
            return _Close("upstream response body stalled")
        if phase == BODY_IN:
            return _Close("request body stalled")
        if phase == CLIENT_SEND:
            return _Close("client stopped reading the response")
        return _Close(f"{phase or 'wait'} timed out")

    async def _exchange(self, stream: trio.abc.Stream, client: h11.Connection | None, req: h11.Request,
                        upstream_req: tuple[bytes, bytes, list[hdr.Triple]], upgrade: bytes | None,
                        entry: _AccessEntry, pool: Pool, watch: Watch) -> bool:
        limits = self.route.limits
        # h11 is in SEND_BODY after every request head (even a bodiless GET), so ask the framing.
        # A head parsed without h11 (client None) has neither Content-Length nor Transfer-Encoding.
        has_body = client is not None and (
            hdr.header_value(req.headers._full_items, b"content-length") not in (None, b"0")
            or hdr.header_value(req.headers._full_items, b"transfer-encoding") is not None)
        retryable = not has_body and req.method in IDEMPOTENT
        up = await self._acquire(pool)
        try:
            while True:
                try:
                    await self._send_request(stream, client, up, upstream_req, has_body, entry, watch)
                    watch.arm(UPSTREAM_WAIT, limits.upstream_response_timeout_s)
                    response = await self._read_response_head(stream, client, up, upgrade is not None, watch)
                    break
                except UpstreamError as exc:
                    if retryable and up.reused and exc.sent_nothing:
                        pool.discard(up)
                        up = await self._acquire(pool, fresh=True)
                        retryable = False
                        continue
                    raise
        except UpstreamError as exc:
            pool.discard(up)
            self._upstream_error(exc.kind)
            status = 504 if exc.kind == "timeout" else 502
            raise HTTPError(status, f"upstream failed: {exc.reason}", kind="upstream_" + exc.kind) from None
        except BaseException:
            pool.discard(up)
            raise
        entry.status = response.status_code
        if response.status_code == 101:
            return await self._switch(stream, client, up, response, entry, pool, watch)
        try:
            keep = await self._stream_response(stream, client, req, up, response, entry, watch)
        except BaseException:
            pool.discard(up)
            raise
        if up.h11.trailing_data[0]:
            pool.discard(up)    # bytes beyond the response: never hand them to the next request
        else:
            pool.release(up)
        return keep

    async def _acquire(self, pool: Pool, fresh: bool = False) -> UpstreamConn:
        try:
            while True:
                up = await pool.acquire(fresh=fresh)
                if not up.reused or not _stale(up.stream):
                    return up
                pool.discard(up)   # closed by the app, or stray bytes arrived while it sat idle
        except UpstreamError as exc:
            self._upstream_error(exc.kind)
            status = 504 if exc.kind == "connect_timeout" else 502
            raise HTTPError(status, f"upstream unavailable: {exc.reason}", kind="upstream_" + exc.kind) \
                from None

    def _upstream_error(self, kind: str) -> None:
        self.metrics.upstream_errors.labels(self.route.name, kind).inc()

    async def _send_request(self, stream: trio.abc.Stream, client: h11.Connection | None, up: UpstreamConn,
                            upstream_req: tuple[bytes, bytes, list[hdr.Triple]], has_body: bool,
                            entry: _AccessEntry, watch: Watch) -> None:
        limits = self.route.limits
        out = bytearray(up.h11.send_head(*upstream_req))
        sent_anything = False
        # A bodiless request is complete with its head: h11's EndOfMessage for it consumes no
        # bytes, so we do not ask for it (the next request gets a fresh parser anyway).
        if has_body and client is not None and client.their_state is h11.SEND_BODY:
            received = 0
            wire = len(_unparsed(client))
            max_body = limits.max_body_bytes
            chunked = _chunked_reader(client)
            new_lf = True     # a chunk-size line can only go bad when a read brought an LF
            while True:
                try:
                    event = client.next_event()
                except h11.RemoteProtocolError as exc:
                    raise HTTPError(400, f"bad request body: {exc}", kind="body_malformed") from None
                if event is _NEED_DATA:
                    if chunked is not None:
                        problem = hdr.check_chunk_overhead(wire - len(_unparsed(client)), received)
                        if problem is None and new_lf and chunked._bytes_in_chunk == 0 \
                                and not chunked._bytes_to_discard and not chunked._reading_trailer:
                            problem = hdr.check_chunk_line(_unparsed(client))
                        if problem is not None:
                            raise problem
                    if out:
                        await _upstream_send(up, out, sent_anything, watch)
                        sent_anything = True
                        out = bytearray()
                    if client.they_are_waiting_for_100_continue:
                        await _client_send(stream, EXPECT_ANSWER, watch, limits.body_timeout_s)
                        client.send(h11.InformationalResponse(status_code=100, headers=[]))
                    watch.arm(BODY_IN, limits.body_timeout_s)
                    data = await _receive(stream)
                    if not data:
                        raise _Close("client closed during request body")
                    wire += len(data)
                    new_lf = b"\n" in data
                    client.receive_data(data)
                    continue
                if type(event) is _Data:
                    received += len(event.data)
                    if max_body is not None and received > max_body:
                        raise HTTPError(413, f"request body larger than {max_body} bytes",
                                        kind="body_too_large")
                    out += up.h11.send(event)
                    if len(out) >= FLUSH_BYTES:
                        await _upstream_send(up, out, sent_anything, watch)
                        sent_anything = True
                        out = bytearray()
                elif type(event) is _EndOfMessage:
                    if chunked is not None:   # the whole body may have come in one read
                        problem = hdr.check_chunk_overhead(wire - len(_unparsed(client)), received)
                        if problem is not None:
                            raise problem
                    out += up.h11.send(_END)
                    break
            entry.bytes_in = received
            self._m_in.inc(received)
        else:
            out += up.h11.send(_END)
        entry.request_done = True
        await _upstream_send(up, out, sent_anything, watch)

    async def _read_response_head(self, stream: trio.abc.Stream, client: h11.Connection | None,
                                  up: UpstreamConn, upgrading: bool, watch: Watch
                                  ) -> h11.Response | h11.InformationalResponse:
        got = 0
        while True:
            try:
                event = up.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise UpstreamError("protocol", f"invalid response: {exc}", sent_nothing=got == 0) from None
            if event is _NEED_DATA:
                data = await _upstream_receive(up, got == 0)
                got += len(data)
                up.h11.receive_data(data)   # b"" (EOF) becomes ConnectionClosed or an error above
                continue
            etype = type(event)
            if etype is h11.Response:
                return event
            if etype is h11.InformationalResponse:
                if event.status_code == 101:
                    if not upgrading:
                        raise UpstreamError("protocol", "101 without an upgrade request")
                    return event
                if event.status_code == 100:   # 100 is ours to send; 103 etc. pass through
                    continue
                head = informational_head(event.status_code, event.reason,
                                          hdr.rewrite_response(event.headers._full_items))
                deadline = watch.deadline    # the response head's deadline runs on while we relay a 1xx
                await _client_send(stream, head, watch, self.route.limits.body_timeout_s)
                watch.phase, watch.deadline = UPSTREAM_WAIT, deadline
                continue
            if etype is h11.ConnectionClosed:
                raise UpstreamError("closed", "upstream closed the connection before answering",
                                    sent_nothing=got == 0)
            raise UpstreamError("protocol", f"unexpected {etype.__name__}")

    async def _stream_response(self, stream: trio.abc.Stream, client: h11.Connection | None, req: h11.Request,
                               up: UpstreamConn, response: h11.Response, entry: _AccessEntry,
                               watch: Watch) -> bool:
        """Send the response; True when the client connection may carry another request."""
        limits = self.route.limits
        writer = ResponseWriter()
        http11 = req.http_version == b"1.1"
        out = bytearray(writer.head(
            response.status_code, response.reason, hdr.rewrite_response(response.headers._full_items),
            request_method=req.method, client_http11=http11,
            client_keep_alive=http11 and not hdr.has_token(req.headers._full_items, b"connection", b"close"),
            # draining, or the app answered before reading the whole request body: close after this
            close=self.drain.draining or not entry.request_done))
        entry.responded = True
        sent = 0
        flushed = False          # until the head is on the wire, a broken body can still be a 502
        upc = up.h11
        while True:
            try:
                event = upc.next_event()
            except h11.RemoteProtocolError as exc:
                self._upstream_error("protocol")
                if not flushed:
                    raise HTTPError(502, f"upstream sent an invalid response: {exc}",
                                    kind="upstream_protocol") from None
                raise _Close(f"upstream broke the response body: {exc}") from None
            if event is _NEED_DATA:
                if out:
                    await _client_send(stream, out, watch, limits.body_timeout_s)
                    out = bytearray()
                    flushed = True
                watch.arm(UPSTREAM_BODY, limits.body_timeout_s)
                try:
                    data = await up.stream.receive_some(UPSTREAM_READ_BYTES)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    self._upstream_error("reset")
                    raise _Close("upstream reset during the response body") from None
                upc.receive_data(data)
                continue
            etype = type(event)
            if etype is _Data:
                data = event.data
                sent += len(data)
                try:
                    parts = writer.data(data)
                except FramingError as exc:
                    self._upstream_error("protocol")
                    raise _Close(f"upstream body does not match its framing: {exc}") from None
                if not out and len(data) >= DIRECT_BYTES and len(parts) == 1:
                    await _client_send(stream, data, watch, limits.body_timeout_s)   # no copy
                    flushed = True
                    continue
                for part in parts:   # no join: one copy
                    out += part
                if len(out) >= FLUSH_BYTES:
                    await _client_send(stream, out, watch, limits.body_timeout_s)
                    out = bytearray()
                    flushed = True
            elif etype is _EndOfMessage:
                try:
                    out += writer.end()
                except FramingError as exc:
                    self._upstream_error("protocol")
                    raise _Close(f"upstream body does not match its framing: {exc}") from None
                break
            else:
                self._upstream_error("protocol")
                raise _Close("upstream closed during the response body")
        if out:
            await _client_send(stream, out, watch, limits.body_timeout_s)
        entry.bytes_out = sent
        self._m_out.inc(sent)
        return writer.keep_alive

    async def _switch(self, stream: trio.abc.Stream, client: h11.Connection | None, up: UpstreamConn,
                      response: h11.InformationalResponse, entry: _AccessEntry, pool: Pool,
                      watch: Watch) -> bool:
        """The app accepted an upgrade: answer 101, then relay bytes both ways until both end."""
        if client is None:    # cannot happen: a head with Upgrade never takes the fast path
            pool.discard(up)
            raise _Close("101 for a request that did not ask to upgrade")
        try:
            items = hdr.rewrite_response(response.headers._full_items, upgrade=True)
            head = informational_head(101, response.reason, items)
            entry.responded = True
            timeout_s = self.route.limits.body_timeout_s
            await _client_send(stream, head, watch, timeout_s)
            client_rest = client.trailing_data[0]
            upstream_rest = up.h11.trailing_data[0]
            if upstream_rest:
                await _client_send(stream, upstream_rest, watch, timeout_s)
            if client_rest:
                watch.arm(UPSTREAM_SEND, UPSTREAM_WRITE_TIMEOUT_S)
                await up.stream.send_all(client_rest)
            watch.disarm("upgraded")      # the relay has its own timeouts
            result = await relay(stream, up.stream, idle_timeout_s=None,
                                 close_timeout_s=self.route.limits.upgrade_close_timeout_s)
            entry.bytes_in = result.a_to_b + len(client_rest)
            entry.bytes_out = result.b_to_a + len(upstream_rest)
            entry.note = "upgraded"
        finally:
            pool.discard(up)
        return False

    async def _refuse(self, stream: trio.abc.Stream, facts: ConnFacts, err: HTTPError,
                      entry: _AccessEntry | None, *, shield: bool = False) -> None:
        """Answer ``err`` and close. ``shield``: the connection's scope is already cancelled (an
        expired deadline), so the answer goes out under a shielded scope of its own."""
        self.metrics.client_errors.labels(self.route.name, str(err.status)).inc()
        if entry is not None:
            entry.status = err.status
            entry.note = err.kind
        else:
            self._m_requests[_code_class(err.status)].inc()
            log.info("request refused", listener=self.route.name, client=facts.client, status=err.status,
                     reason=err.reason)
        if err.status >= 500 and err.kind.startswith("upstream"):
            log.warning("upstream error", listener=self.route.name, client=facts.client, status=err.status,
                        reason=err.reason, upstream=self.route.upstream_label)
        try:
            with trio.CancelScope(deadline=trio.current_time() + 5, shield=shield):
                await stream.send_all(hdr.error_response(err.status, err.reason))
                linger = getattr(stream, "linger_close", None)
                if linger is not None:
                    await linger()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


# ---------------------------------------------------------------------------- I/O helpers

async def _receive(stream: trio.abc.Stream) -> bytes:
    try:
        return await stream.receive_some()
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise _Close(f"client connection broke: {exc}") from None


async def _client_send(stream: trio.abc.Stream, data: bytes | bytearray, watch: Watch,
                       timeout_s: float) -> None:
    """Send to the client; one that stops reading for ``timeout_s`` (a slow-read attack, or a
    client gone without a FIN) is cut, so it cannot hold its connection and an upstream forever."""
    watch.arm(CLIENT_SEND, timeout_s)
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise _Close(f"client went away: {exc}") from None


UPSTREAM_WRITE_TIMEOUT_S = 30.0   # an upstream that stops reading our request for this long is dead


async def _upstream_send(up: UpstreamConn, data: bytes | bytearray, sent_before: bool, watch: Watch) -> None:
    watch.arm(UPSTREAM_SEND, UPSTREAM_WRITE_TIMEOUT_S)
    try:
        await up.stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise UpstreamError("reset", f"connection lost while sending: {_short(exc)}",
                            sent_nothing=not sent_before) from None


async def _upstream_receive(up: UpstreamConn, first: bool) -> bytes:
    try:
        return await up.stream.receive_some()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise UpstreamError("reset", f"connection lost: {_short(exc)}", sent_nothing=first) from None


def _stale(stream: trio.abc.Stream) -> bool:
    """True when an idle pooled connection is readable: EOF (the app closed it) or bytes nobody
    asked for (an app that answered twice). Either way it must not carry the next request."""
    fileno = getattr(stream, "fileno", None)
    sock = getattr(stream, "socket", None)
    fd = fileno() if fileno is not None else (sock.fileno() if sock is not None else -1)
    if fd < 0:
        return True
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLPRI)
    return bool(poller.poll(0))


def _short(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    return str(cause) or type(cause).__name__


async def _close(stream: trio.abc.Stream) -> None:
    close_now = getattr(stream, "close_now", None)
    if close_now is not None:
        close_now()
        return
    with trio.CancelScope(shield=True), trio.move_on_after(1):
        await trio.aclose_forcefully(stream)


def _code_class(status: int) -> str:
    return f"{min(max(status // 100, 1), 5)}xx"


class _AccessEntry:
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
