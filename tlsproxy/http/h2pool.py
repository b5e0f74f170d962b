"""Pooled upstream HTTP/2 connections (``--upstream h2c://``): the I/O shell around ``h2client``.

Theory of operation
-------------------
The engine drives an upstream *leg* the same way whatever the protocol: ``pool.acquire()`` gives a
leg with a codec (``leg.h11``: send_head/send_data/send_end, receive_data/next_event) and a
transport (``leg.stream``: ``send_all``, ``receive_some``), then ``pool.release`` or
``pool.discard``. For HTTP/1.1 the transport is the connection; here it is an :class:`H2Channel`,
one HTTP/2 stream of a shared connection: ``send_all(body bytes)`` opens the stream with the
recorded head, sends the bytes as DATA frames within the flow-control windows (waiting for the
app's WINDOW_UPDATE: a slow app slows its own stream only) and then the recorded end (trailers);
``receive_some()`` waits for what the connection's reader delivered to this stream (a list of h2
events, which the codec turns into the exchange's events) and reopens the stream's window for it —
the window is only reopened as the engine takes the data, so an app runs at most
``STREAM_WINDOW`` ahead of a slow client, on that stream only.

Connections: at most ``MAX_STREAMS`` (or the app's SETTINGS_MAX_CONCURRENT_STREAMS, if lower)
exchanges each; a new connection is dialled when every open one is full (one dial at a time, the
others wait for it). Each connection has two tasks in the pool's nursery (:meth:`H2Pool.run`, run
by the application's root nursery): a **reader** (bytes → h2 events → the streams' channels; it
never writes, so it cannot deadlock against an app that writes while we write) and a **writer**
(h2's outgoing bytes → the socket, ``WRITE_TIMEOUT_S`` per write). A connection is dead when the app
closes it, a write times out, the app breaks the protocol, or a PING (sent after ``PING_IDLE_S``
of silence while streams are open) is not answered within ``PING_TIMEOUT_S``; its streams then
fail (the engine answers 502 before a response, a close after). A GOAWAY from the app fails the
streams above its last stream id as *refused* (never served: the engine retries a bodiless
idempotent request on another connection) and lets the others finish. A connection without streams
for ``IDLE_TIMEOUT_S`` is closed with a GOAWAY.

These are the pool's own tasks, not a client connection's waits, so they use trio's timeouts
(the engine's waits on a leg run under the client connection's watch, as HTTP/1.1's do).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import h2.errors
import h2.events
import h2.exceptions
import h11
import trio

from ..errors import UpstreamError
from ..log import get_logger
from ..metrics import Metrics
from .h2client import H2ConnectionError, H2Core, StreamCodec

log = get_logger("http")

IDLE_TIMEOUT_S = 30.0        # as the HTTP/1.1 pool: below common app keep-alive timeouts
# Silence with streams open before we ask the app whether it is alive. Never more often: a gRPC
# server counts a PING sooner than 5 minutes after the last (without data) as abuse and answers
# GOAWAY ENHANCE_YOUR_CALM after two (grpc core's min_recv_ping_interval_without_data, max_ping_strikes).
PING_IDLE_S = 300.0
PING_TIMEOUT_S = 10.0        # ... and how long its PING ack may take
WRITE_TIMEOUT_S = 30.0       # as shell.UPSTREAM_WRITE_TIMEOUT_S: an app not reading for this long is dead
READ_BYTES = 256 * 1024
FLUSH_BYTES = 256 * 1024     # a stream's DATA queued ahead of the writer, at most
CLOSE_FLUSH_S = 1.0          # a closing connection's GOAWAY gets this long to go out


@dataclass(frozen=True)
class Timers:
    idle_timeout_s: float = IDLE_TIMEOUT_S
    ping_idle_s: float = PING_IDLE_S
    ping_timeout_s: float = PING_TIMEOUT_S


class H2Channel:
    """One HTTP/2 stream as the engine's upstream transport. See the module docstring."""

    __slots__ = ("conn", "codec", "sid", "inbox", "error", "refused", "_wake", "_window")

    def __init__(self, conn: H2Conn, codec: StreamCodec) -> None:
        self.conn = conn
        self.codec = codec
        self.sid = 0                  # allocated when the head goes out
        self.inbox: list = []
        self.error: str | None = None
        self.refused = False          # the app never served it (GOAWAY above it, REFUSED_STREAM)
        self._wake = trio.Event()
        self._window = trio.Event()

    def fileno(self) -> int:
        return -1

    # ------------------------------------------------------------------ engine side
    async def send_all(self, data) -> None:
        conn, core, codec = self.conn, self.conn.core, self.codec
        self._check()
        try:
            view = memoryview(data)
            pos, size = 0, len(view)
            if not self.sid:
                if not core.open:
                    self.fail("the upstream sent GOAWAY before this stream opened", refused=True)
                    self._check()
                self.sid = core.open_stream(codec, size > 0)
                conn.streams[self.sid] = self
            queued = 0
            while pos < size:
                self._check()
                n = min(core.window(self.sid), size - pos)
                if n <= 0:                   # the app's window is closed: wait for its WINDOW_UPDATE
                    if queued:
                        await conn.flushed()
                        queued = 0
                        continue
                    self._window = trio.Event()
                    await self._window.wait()
                    continue
                core.send_body(self.sid, view[pos:pos + n])
                pos += n
                queued += n
                if queued >= FLUSH_BYTES:    # bounded: what this stream queued waits to be written
                    await conn.flushed()
                    queued = 0
            if codec.end is not None:
                core.finish(self.sid, codec.end)
                codec.end = None
            await conn.flushed()
        except h2.exceptions.TooManyStreamsError:
            self.fail("the upstream lowered its stream limit", refused=True)
            self._check()
        except h2.exceptions.StreamClosedError as exc:
            self.fail(f"the stream closed while sending: {exc}")
            self._check()
        except h2.exceptions.ProtocolError as exc:
            # h2 refused what we asked it to send (a header it will not encode): the HPACK state
            # may be half-updated, so no new stream goes on this connection
            conn.closing = True
            self.fail(f"the request cannot be sent over HTTP/2: {exc}")
            self._check()

    async def receive_some(self, max_bytes: int | None = None) -> list:
        while not self.inbox:
            self._check()
            self._wake = trio.Event()
            await self._wake.wait()
        events, self.inbox = self.inbox, []
        taken = sum(ev.flow_controlled_length for ev in events if isinstance(ev, h2.events.DataReceived))
        if taken:
            self.conn.core.consumed(self.sid, taken)
            self.conn.kick()
        return events

    def _check(self) -> None:
        if self.error is None and self.conn.dead is not None:
            self.error = self.conn.dead      # the connection died (perhaps before this stream opened)
        if self.error is not None:
            raise trio.BrokenResourceError(self.error)

    # ------------------------------------------------------------------ reader side
    def deliver(self, events: list) -> None:
        for ev in events:
            if isinstance(ev, h2.events.WindowUpdated):
                self._window.set()
            elif isinstance(ev, h2.events.StreamReset):
                refused = ev.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
                self.fail(f"the upstream reset the stream ({_code(ev.error_code)})", refused=refused)
            else:
                self.inbox.append(ev)
        self._wake.set()

    def fail(self, reason: str, *, refused: bool = False) -> None:
        if self.error is None:
            self.error = reason
            self.refused = refused
        self._wake.set()
        self._window.set()

    def window_opened(self) -> None:
        self._window.set()


class H2Leg:
    """What ``H2Pool.acquire`` gives the engine: ``h11`` (the stream's codec, named as the HTTP/1.1
    leg's) and ``stream`` (its :class:`H2Channel`)."""

    __slots__ = ("conn", "h11", "stream")

    def __init__(self, conn: H2Conn) -> None:
        self.conn = conn
        self.h11 = StreamCodec()
        self.stream = H2Channel(conn, self.h11)

    @property
    def reused(self) -> bool:
        """True when a failure before any answer may be retried elsewhere: the connection served
        streams before (it may have been closed while idle), or the app refused this one unserved."""
        return self.conn.served > 0 or self.stream.refused


class H2Conn:
    """One upstream HTTP/2 connection: the reader and writer tasks. See the module docstring."""

    def __init__(self, pool: H2Pool, stream, core: H2Core) -> None:
        self.pool = pool
        self.stream = stream
        self.core = core
        self.streams: dict[int, H2Channel] = {}
        self.active = 0              # legs handed out and not yet released
        self.served = 0
        self.dead: str | None = None
        self.ended = ""              # why it ended, for tlsproxy_upstream_h2_connections_closed_total
        self.closing = False
        self.idle_since = trio.current_time()
        self._ping_sent: float | None = None
        self._last_rx = self.idle_since
        self._dirty = trio.Event()
        self._progress = trio.Event()
        self._taken = 0              # writer passes started
        self._done = 0               # writer passes finished
        self._scope: trio.CancelScope | None = None
        self._timer: trio.CancelScope | None = None     # the reader's current wait
        self._writing = False
        self._goaway_seen: tuple[int, int] | None = None

    @property
    def usable(self) -> bool:
        return self.dead is None and not self.closing and self.core.open

    def kick(self) -> None:
        self._dirty.set()

    async def flushed(self) -> None:
        """Wait until what is queued now has been written (backpressure for the senders)."""
        target = self._taken + 1
        self._dirty.set()
        while self._done < target:
            if self.dead is not None:
                raise trio.BrokenResourceError(self.dead)
            await self._progress.wait()

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                nursery.start_soon(self._writer)
                await self._read_frames()
                nursery.cancel_scope.cancel()
        finally:
            if self.dead is None:           # cancelled: the process is stopping
                if not self._writing:       # (a write cut short leaves no room for a frame after it)
                    await self._goodbye()   # what is queued (a GOAWAY already?) and a GOAWAY
                self._end("drain", "the proxy is stopping")
            self._fail_all(self.dead or "the connection closed")
            self.pool.forget(self)
            self.stream.close_now()

    async def _goodbye(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_FLUSH_S):
            self.core.close()
            try:
                await self.stream.send_all(self.core.outgoing())
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass

    async def _writer(self) -> None:
        try:
            while True:
                await self._dirty.wait()
                self._dirty = trio.Event()
                data = self.core.outgoing()
                self._taken += 1
                if data:
                    self._writing = True
                    with trio.fail_after(WRITE_TIMEOUT_S):
                        await self.stream.send_all(data)
                    self._writing = False
                self._done = self._taken
                self._progress.set()
                self._progress = trio.Event()
                if self.closing and self.active == 0:
                    self._end("drain" if self.core.open else "goaway", "closed by the proxy")
                    break            # the GOAWAY is out and no stream is left: the connection ends
        except trio.TooSlowError:
            self._end("write_timeout", f"the upstream stopped reading for {WRITE_TIMEOUT_S:g}s")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._end("reset", f"connection lost while sending: {exc}")
        self._scope.cancel()

    async def _read_frames(self) -> None:
        t = self.pool.timers
        while self.dead is None:
            if self._ping_sent is not None:
                wait_s = t.ping_timeout_s
            elif self.active == 0:
                wait_s = t.idle_timeout_s
            else:
                wait_s = t.ping_idle_s
            with trio.move_on_after(wait_s) as timer:
                self._timer = timer
                try:
                    data = await self.stream.receive_some(READ_BYTES)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    self._end("reset", f"connection lost: {exc}")
                    return
            if timer.cancelled_caught:
                await self._quiet()
                continue
            if not data:
                # after a GOAWAY either way, an EOF is the expected end of the connection
                kind = "goaway" if not self.core.open else "drain" if self.closing else "closed"
                self._end(kind, "the upstream closed the connection")
                return
            self._ping_sent = None
            self._last_rx = trio.current_time()
            try:
                streams, conn_events = self.core.receive(data)
            except H2ConnectionError as exc:
                self._end("protocol", str(exc))
                log.warning("upstream error", upstream=self.pool.label, reason=self.dead)
                self.core.close()
                await self._flush_briefly()
                return
            for sid, events in streams.items():
                channel = self.streams.get(sid)
                if channel is not None:
                    channel.deliver(events)
                else:       # a stream we let go of: give its data's window back to the connection
                    for ev in events:
                        if isinstance(ev, h2.events.DataReceived):
                            self.core.consumed(sid, ev.flow_controlled_length)
            for ev in conn_events:
                if isinstance(ev, h2.events.ConnectionTerminated):
                    self._goaway(ev)
                elif isinstance(ev, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
                    for channel in self.streams.values():
                        channel.window_opened()
            self.kick()      # settings and ping acks, window updates
            if not self.core.open and not self.streams:
                await self._flush_briefly()
                self._end("goaway", "the upstream sent GOAWAY")
                return

    async def _quiet(self) -> None:
        """Nothing received for a while: close when idle, else make sure the app is alive."""
        now = trio.current_time()
        t = self.pool.timers
        if self._ping_sent is not None:
            self._end("ping_timeout", f"the upstream did not answer a PING within {t.ping_timeout_s:g}s")
            log.warning("upstream error", upstream=self.pool.label, reason=self.dead)
        elif not self.streams and self.active == 0:
            if now - self.idle_since >= t.idle_timeout_s:
                self.closing = True
                self.core.close()
                await self._flush_briefly()
                self._end("idle", "idle")
        elif now - self._last_rx >= t.ping_idle_s:
            self._ping_sent = now
            self.core.ping(b"tlsproxy")
            self.kick()

    async def _flush_briefly(self) -> None:
        with trio.move_on_after(CLOSE_FLUSH_S):
            try:
                await self.flushed()
            except trio.BrokenResourceError:
                pass

    def _goaway(self, ev) -> None:
        last = self.core.goaway_last_id or 0
        if (last, ev.error_code) != self._goaway_seen:       # an app may repeat its GOAWAY
            self._goaway_seen = (last, ev.error_code)
            log.info("upstream GOAWAY", upstream=self.pool.label, last_stream_id=last,
                     error=self.core.goaway_error, open_streams=len(self.streams))
        for sid, channel in list(self.streams.items()):
            if sid > last:
                channel.fail("the upstream sent GOAWAY before serving this stream", refused=True)
            elif ev.error_code != h2.errors.ErrorCodes.NO_ERROR:
                channel.fail(f"the upstream closed the connection ({self.core.goaway_error})")

    def _end(self, kind: str, reason: str) -> None:
        if self.dead is None:
            self.dead, self.ended = reason, kind

    def _fail_all(self, reason: str) -> None:
        self._end("closed", reason)
        for channel in self.streams.values():
            channel.fail(reason)
        self._progress.set()

    def let_go(self, leg: H2Leg, clean: bool) -> None:
        channel = leg.stream
        if channel.sid:
            self.streams.pop(channel.sid, None)
            if not clean and channel.error is None and self.dead is None:
                self.core.reset(channel.sid)
                self.kick()
        self.active -= 1
        self.served += 1
        self.pool.stream_done()
        if self.active == 0:
            self.idle_since = now = trio.current_time()
            if self._timer is not None:       # the reader's wait now ends at the idle deadline
                self._timer.deadline = min(self._timer.deadline, now + self.pool.timers.idle_timeout_s)
            if self.closing or not self.core.open:
                self.closing = True
                self.core.close()
                self.kick()


class H2Pool:
    """Upstream HTTP/2 connections shared by every exchange of a route. See the module docstring."""

    http2 = True            # trailers (gRPC's grpc-status) cross this leg

    def __init__(self, opener: Callable[[], Awaitable[trio.abc.Stream]], *, connect_timeout_s: float,
                 label: str = "", metrics: Metrics | None = None, timers: Timers = Timers()) -> None:
        self._opener = opener
        self.timers = timers
        self._metrics = metrics
        self._connect_timeout_s = connect_timeout_s
        self.label = label
        self._conns: list[H2Conn] = []
        self._nursery: trio.Nursery | None = None
        self._dialling: trio.Event | None = None
        self._dial_error: UpstreamError | None = None
        self.opened = 0
        self.http10 = False          # the engine's HTTP/1.0 checks: never for HTTP/2

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The connections' tasks live here: run it in the application's root nursery."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    @property
    def connections(self) -> int:
        return len(self._conns)

    async def acquire(self, *, fresh: bool = False) -> H2Leg:
        """A leg on a connection with a free stream slot; dials when all are full. ``fresh``: the
        engine retries after a failure (the failed connection is no longer usable either way)."""
        while True:
            for conn in self._conns:
                if conn.usable and conn.active < conn.core.max_streams:
                    conn.active += 1
                    if self._metrics is not None:
                        self._metrics.upstream_h2_streams.inc()
                    return H2Leg(conn)
            if self._dialling is not None:
                done = self._dialling
                await done.wait()             # one dial at a time: its result serves every waiter
                if self._dial_error is not None:
                    raise self._dial_error
                continue
            self._dialling = done = trio.Event()
            self._dial_error = None
            try:
                await self._dial()
            except UpstreamError as exc:
                self._dial_error = exc
                raise
            finally:
                self._dialling = None
                done.set()

    async def _dial(self) -> None:
        if self._nursery is None:
            raise UpstreamError("connect", "the h2c pool is not running")
        stream = await self._opener()
        core = H2Core()
        try:
            with trio.fail_after(self._connect_timeout_s):
                core.start()
                await stream.send_all(core.outgoing())
                # The app's SETTINGS come first: they say it speaks HTTP/2 and how many streams it takes.
                while True:
                    data = await stream.receive_some(READ_BYTES)
                    if not data:
                        raise UpstreamError("protocol", "the upstream closed the connection instead of "
                                            "answering in HTTP/2 (is it an h2c server?)")
                    _streams, conn_events = core.receive(data)
                    if any(isinstance(ev, h2.events.RemoteSettingsChanged) for ev in conn_events):
                        break
        except trio.TooSlowError:
            stream.close_now()
            raise UpstreamError("connect_timeout", f"no HTTP/2 SETTINGS from the upstream within "
                                f"{self._connect_timeout_s:g}s (is it an h2c server?)") from None
        except H2ConnectionError as exc:
            stream.close_now()
            raise UpstreamError("protocol", f"the upstream does not speak HTTP/2 with prior knowledge: "
                                f"{exc}") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            stream.close_now()
            raise UpstreamError("connect", f"connection lost during the HTTP/2 preface: {exc}") from None
        except BaseException:
            stream.close_now()
            raise
        conn = H2Conn(self, stream, core)
        self._conns.append(conn)
        self.opened += 1
        if self._metrics is not None:
            self._metrics.upstream_h2_connections.inc()
        conn.kick()                  # the SETTINGS ack
        self._nursery.start_soon(conn.run)

    def forget(self, conn: H2Conn) -> None:
        if conn in self._conns:
            self._conns.remove(conn)
            if self._metrics is not None:
                self._metrics.upstream_h2_connections.dec()
                self._metrics.upstream_h2_closed.labels(conn.ended or "closed").inc()
            if conn.ended not in ("idle", "drain", "goaway"):
                log.info("upstream connection ended", upstream=self.label, reason=conn.dead,
                         streams_failed=len(conn.streams))

    def stream_done(self) -> None:
        if self._metrics is not None:
            self._metrics.upstream_h2_streams.dec()

    def release(self, leg: H2Leg) -> None:
        """After a complete exchange (both ends of the stream closed)."""
        c = leg.h11
        leg.conn.let_go(leg, c.our_state is h11.DONE and c.their_state is h11.DONE)

    def discard(self, leg: H2Leg) -> None:
        """After a failed or abandoned exchange: the stream is reset, the connection kept."""
        leg.conn.let_go(leg, False)

    def close_idle(self) -> None:
        for conn in list(self._conns):
            conn.closing = True
            if conn.active == 0:
                conn.core.close()
                conn.kick()


def _code(code) -> str:
    try:
        return h2.errors.ErrorCodes(code).name
    except ValueError:
        return str(code)
