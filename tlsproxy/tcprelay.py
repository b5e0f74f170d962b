"""One relayed TCP connection, measured: limits, byte counters, how it ended, one log line.

``relay.py`` copies bytes; this module wraps one such copy with what an operator needs, the same way
for the inbound tcp mode (TLS client → plain upstream) and the outbound ``tls://`` routes (plain
local client → TLS peer):

* bytes are counted *as they flow* (a wrapper around the upstream side feeds the metric counters per
  chunk), so a day-long gRPC/xDS stream shows its traffic while it lasts, not when it ends;
* how it ended is one word — ``client_closed``, ``upstream_closed``, ``idle_timeout``, ``lifetime``,
  ``error``, ``drain`` (cancelled: the drain deadline passed) — used as a metric label and in the log;
* one log line per connection (client, identity, bytes each way, duration, ended), also when the
  relay was cancelled (logging is synchronous, so it runs even while the task is being cancelled).

A leaf helper: it imports only ``relay`` and ``log``; metric objects are handed in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import trio

from .log import get_logger
from .relay import relay

access = get_logger("access")


@dataclass(frozen=True)
class RelayLimits:
    idle_timeout_s: float | None = 3600.0    # no byte either way this long: close (None: never)
    close_timeout_s: float = 5.0             # after one side ended, time for the other direction
    max_lifetime_s: float | None = None      # close this long after the relay started (None: never)


class CountingStream(trio.abc.HalfCloseableStream):
    """Wraps one side of a relay: counts bytes each way and feeds two counters as they flow.

    On the upstream side, ``sent`` is what went *to* the upstream (from the client) and ``received``
    what came back. ``bulk=True`` is for a TLS stream: ``relay.py`` asks for at most 256 KiB per
    receive, and a ``TLSStream`` given a ``max_bytes`` returns one 16 KiB record per call, while
    without one it drains every readable record up to the same 256 KiB. Measured here (128 MiB
    through tcp mode, client and upstream in the same process): ~85-130 MiB/s with the hint,
    ~160-300 MiB/s without."""

    def __init__(self, inner: trio.abc.Stream, to_upstream=None, from_upstream=None, *,
                 bulk: bool = False) -> None:
        self.inner = inner
        self.sent = 0
        self.received = 0
        self._to = to_upstream
        self._from = from_upstream
        self._bulk = bulk

    async def send_all(self, data) -> None:
        await self.inner.send_all(data)
        self.sent += len(data)
        if self._to is not None:
            self._to.inc(len(data))

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self.inner.receive_some(None if self._bulk else max_bytes)
        if data:
            self.received += len(data)
            if self._from is not None:
                self._from.inc(len(data))
        return data

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        if not isinstance(self.inner, trio.abc.HalfCloseableStream):
            # a TLS stream cannot half-close here: relay.py treats this as "cannot"
            raise trio.BrokenResourceError("stream cannot half-close")
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


def _ended(raw: str) -> str:
    if raw == "a_closed":
        return "client_closed"
    if raw == "b_closed":
        return "upstream_closed"
    if raw in ("idle_timeout", "lifetime"):
        return raw
    return "error"


async def run(client: trio.abc.Stream, upstream: CountingStream, *, listener: str, protocol: str,
              metrics, limits: RelayLimits, log_fields: dict, access_log: bool = True) -> str:
    """Relay ``client`` ⇄ ``upstream`` under ``limits``; record metrics and the log line. Returns how
    it ended. Closes neither stream (whoever opened a stream closes it). ``client`` may itself be a
    (counter-less) :class:`CountingStream` with ``bulk=True`` when it is a TLS stream."""
    t0 = time.monotonic()
    ended, detail = "drain", ""
    try:
        # prompt_close=False: a byte stream may be half-closed by either side while the other still
        # sends (--tcp-close-timeout, docs/tcp.md), unlike an upgrade's end (relay.py)
        result = await relay(client, upstream, idle_timeout_s=limits.idle_timeout_s,
                             close_timeout_s=limits.close_timeout_s, max_lifetime_s=limits.max_lifetime_s,
                             prompt_close=False)
        ended = _ended(result.ended_by)
        if ended == "error":
            detail = result.ended_by.removeprefix("error: ")
    finally:
        duration = time.monotonic() - t0
        metrics.relay_duration.labels(listener, protocol).observe(duration)
        metrics.relays_ended.labels(listener, ended).inc()
        if access_log:
            fields = dict(log_fields, bytes_in=upstream.sent, bytes_out=upstream.received,
                          duration_ms=round(duration * 1000, 3), ended=ended)
            if detail:
                fields["detail"] = detail[:200]
            access.info("connection", **fields)
    return ended


def log_refused(log_fields: dict, ended: str, reason: str, t0: float, metrics, listener: str,
                access_log: bool = True) -> None:
    """The log line and metric of a connection that never reached the relay (identity refused,
    upstream down)."""
    metrics.relays_ended.labels(listener, ended).inc()
    if access_log:
        access.info("connection", **log_fields, bytes_in=0, bytes_out=0,
                    duration_ms=round((time.monotonic() - t0) * 1000, 3), ended=ended, detail=reason)
