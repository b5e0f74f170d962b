"""The I/O shell of an HTTP/2 client connection: one reader, one writer, one task per stream.

Theory of operation
-------------------
:meth:`H2Server.serve` runs one connection. The reader task receives bytes, feeds them to the
sans-IO :class:`~.h2core.H2Core` and routes its events to per-stream :class:`H2Stream` values; a
request starts an exchange task (:func:`.h2exchange.run_stream`) in the connection's nursery. Every
task that made h2 queue bytes awaits :meth:`Connection.flush`: the writer task (the only one that
touches the socket) sends everything queued and wakes it, so frames never interleave, a stream
cancelled mid-wait never leaves half a TLS record, and at most one chunk per stream waits behind a
slow socket.

Backpressure, both ways, with bounded memory:

* **request bodies**: a stream buffers at most its receive window (``--h2-stream-window``); its
  window reopens only as the exchange passes data upstream, so a slow app slows that stream and
  nothing else (the connection window is returned on arrival, streams bound the memory:
  ``max_concurrent_streams × stream_window`` per connection at most);
* **responses**: a stream sends body bytes only within the client's send windows (stream and
  connection); it waits for a ``WINDOW_UPDATE`` at most ``--body-timeout`` (a zero-window reader),
  then the stream is reset. The upstream is read only after the previous chunk went out.

Deadlines: the reader's watch is ``IDLE`` while no stream is open (``--idle-timeout``; the first
bytes within ``--head-timeout``), so a drain wakes it like an idle HTTP/1.1 connection; a drain
sends GOAWAY with the last stream id, lets the streams in flight finish (the runtime bounds them
with ``--drain-timeout``) and closes. The writer's watch (``--body-timeout``) cuts a client that
stops reading the socket. A broken defence (:class:`~.h2core.Refusal`) is GOAWAY, a log line, a
count in ``tlsproxy_h2_defences_total``, and a close.
"""

from __future__ import annotations

import h2.errors
import trio

from ..log import get_logger
from ..metrics import Metrics
from . import h2core
from .deadlines import Watchdog
from .exchange import IDLE, ConnFacts, End
from .h2core import H2Core, H2Limits, Refusal
from .h2exchange import H2Stream, run_stream
from .shell import CLIENT_SEND, close_stream

log = get_logger("http")

READ_BYTES = 256 * 1024


class H2Server:
    """Serves HTTP/2 connections for one listener; the exchanges go through ``fwd`` (a Forwarder)."""

    def __init__(self, fwd, limits: H2Limits, metrics: Metrics) -> None:
        self.fwd = fwd
        self.limits = limits
        self.metrics = metrics
        name = fwd.route.name
        self.m_connections = metrics.h2_connections.labels(name)
        self.m_in = metrics.bytes_received.labels(name, "h2")
        self.m_out = metrics.bytes_sent.labels(name, "h2")
        self._m_streams = {c: metrics.h2_streams.labels(name, c)
                           for c in ("1xx", "2xx", "3xx", "4xx", "5xx", "reset")}

    def count_stream(self, status: int) -> None:
        cls = "reset" if not status or status == 499 else f"{min(max(status // 100, 1), 5)}xx"
        self._m_streams[cls].inc()

    def defence(self, facts: ConnFacts, why: Refusal) -> None:
        self.metrics.h2_defences.labels(self.fwd.route.name, why.defence).inc()
        log.warning("h2 connection refused", listener=self.fwd.route.name, client=facts.client,
                    defence=why.defence, reason=why.reason)

    async def serve(self, stream, facts: ConnFacts, received: bytes = b"") -> None:
        self.m_connections.inc()
        facts.extra_log = {**facts.extra_log, "protocol": "h2"}    # on every access-log line
        conn = Connection(self, stream, facts)
        try:
            await conn.run(received)
        finally:
            close_stream(stream)


class Connection:
    def __init__(self, server: H2Server, stream, facts: ConnFacts) -> None:
        self.server = server
        self.fwd = server.fwd
        self.stream = stream
        self.facts = facts
        self.core = H2Core(server.limits)
        self.streams: dict[int, H2Stream] = {}
        self.dirty = trio.Event()                # h2 has queued bytes for the writer
        self.sent_event = trio.Event()           # the writer sent a batch
        self.queued = self.sent = 0              # batches handed to the writer / sent by it
        self.outbuf = bytearray()                # taken from h2, not yet sent
        self.broken = False
        self.watchdog = self.fwd.drain.watchdog
        self.wwatch = self.watchdog.watch()      # the writer's: a client that stops reading
        self.nursery: trio.Nursery | None = None
        self.goaway_sent = False
        self.rwatch = None
        self.refused_streams = 0

    async def flush(self) -> None:
        """Have what h2 queued so far sent; returns once it is on the socket (the backpressure a
        stream feels), at once when nothing is queued. Only the writer task touches the socket: a
        stream cancelled while it waits here never leaves half a TLS record behind."""
        data = self.core.data_to_send()
        if data:
            self.outbuf += data
            self.queued += 1
            self.dirty.set()
        elif self.sent == self.queued:
            return                       # nothing queued, nothing in flight
        mine = self.queued
        while self.sent < mine:
            await self.sent_event.wait()

    async def _writer(self) -> None:
        w = self.wwatch
        timeout_s = self.fwd.route.limits.body_timeout_s
        while True:
            await self.dirty.wait()
            self.dirty = trio.Event()
            upto = self.queued
            data = self.outbuf + self.core.data_to_send()
            self.outbuf = bytearray()
            if data:
                w.arm(CLIENT_SEND, timeout_s)
                try:
                    await self.stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    self.broken = True
                    self.nursery.cancel_scope.cancel()    # the client is gone: so are its streams
                    return
                w.disarm()
            self.sent = upto
            event, self.sent_event = self.sent_event, trio.Event()
            event.set()

    async def run(self, received: bytes) -> None:
        try:
            with self.wwatch.scope:
                async with trio.open_nursery() as nursery:
                    self.nursery = nursery
                    nursery.start_soon(self._writer)
                    await self.flush()           # our SETTINGS (and connection window) first
                    await self._read(received)
                    await self.flush()           # a GOAWAY, the last resets
                    nursery.cancel_scope.cancel()
                if self.goaway_sent and not self.broken:   # read and drop what the client still
                    await self.stream.linger_close()       # sends, so that it reads the GOAWAY
        finally:
            self.watchdog.forget(self.wwatch)

    async def _read(self, received: bytes) -> None:
        limits = self.fwd.route.limits
        drain = self.fwd.drain
        data = received
        first = True
        while True:
            rw = self.rwatch = self.watchdog.watch()
            try:
                with rw.scope:
                    while True:
                        if data:
                            try:
                                self._dispatch(self.core.receive(data))
                            except Refusal as why:
                                await self._refuse(why)
                                return
                            self.server.m_in.inc(len(data))
                            await self.flush()
                        if drain.draining and not self.goaway_sent:
                            await self._goaway()
                        if self.goaway_sent and not self.streams:
                            return
                        if self.streams:
                            rw.disarm(IDLE)             # a drain still wakes it
                        else:
                            rw.arm(IDLE, limits.head_timeout_s if first else limits.idle_timeout_s)
                        first = False
                        try:
                            data = await self.stream.receive_some(READ_BYTES)
                        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                            return
                        if not data:
                            return
            finally:
                self.watchdog.forget(rw)
            # woken: an idle timeout closes; a drain says GOAWAY and serves the streams in flight
            if rw.expired is None:
                return
            if not self.goaway_sent:
                await self._goaway()
            if not self.streams:
                return
            data = b""

    async def _goaway(self) -> None:
        self.goaway_sent = True
        self.core.goaway(h2.errors.ErrorCodes.NO_ERROR)
        await self.flush()

    async def _refuse(self, why: Refusal) -> None:
        self.server.defence(self.facts, why)
        self.goaway_sent = True
        self.core.goaway(why.code, why.reason)
        for st in self.streams.values():
            if st.scope is not None:
                st.scope.cancel()
        await self.flush()              # bounded by the writer's watch

    def _dispatch(self, events: list) -> None:
        streams = self.streams
        for ev in events:
            t = type(ev)
            if t is h2core.Data:
                st = streams.get(ev.stream_id)
                if st is None or st.reset:
                    self.core.consumed(ev.stream_id, ev.flow_len)
                    continue
                if ev.data:
                    st.body.append(ev.data)
                    st.buffered += len(ev.data)
                    st.poke()
            elif t is h2core.Request:
                if self.goaway_sent:
                    self.core.reset(ev.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                    continue
                if len(streams) >= self.server.limits.max_concurrent_streams:
                    # h2 enforces the setting only once the client acknowledged it: this holds before
                    self.core.reset(ev.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                    self._refused_stream()
                    continue
                st = streams[ev.stream_id] = H2Stream(ev.stream_id)
                if ev.ended:
                    st.end = End()
                self.nursery.start_soon(run_stream, self, st, ev)
            elif t is h2core.Ended:
                st = streams.get(ev.stream_id)
                if st is not None:
                    st.end = ev.end
                    st.poke()
            elif t is h2core.Window:
                if ev.stream_id == 0:
                    for st in streams.values():
                        st.poke_window()
                else:
                    st = streams.get(ev.stream_id)
                    if st is not None:
                        st.poke_window()
            elif t is h2core.Reset:
                st = streams.get(ev.stream_id)
                if st is not None:
                    st.reset = True
                    st.poke()
                    st.poke_window()
                    if st.scope is not None:
                        st.scope.cancel()
            elif t is h2core.BadRequest:
                self.nursery.start_soon(run_stream, self, H2Stream(ev.stream_id), ev)
            elif t is h2core.GoneAway:
                self.goaway_sent = True     # the client leaves: no new streams, finish the rest

    def _refused_stream(self) -> None:
        self.refused_streams += 1
        server = self.server
        server.metrics.h2_defences.labels(self.fwd.route.name, "concurrent_streams").inc()
        if self.refused_streams == 1:       # one line per connection, not one per stream
            log.warning("h2 streams refused", listener=self.fwd.route.name, client=self.facts.client,
                        defence="concurrent_streams",
                        reason=f"more than {server.limits.max_concurrent_streams} streams at once")

    def done(self, st: H2Stream) -> None:
        """The exchange of ``st`` ended: the stream is gone from this connection."""
        self.streams.pop(st.id, None)
        self.core.forget(st.id)
        if self.goaway_sent and not self.streams and self.rwatch is not None:
            Watchdog.fire(self.rwatch)      # the last stream after a GOAWAY: the reader closes
