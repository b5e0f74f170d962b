"""A keep-alive pool of upstream HTTP/1.1 connections (h11 client + stream).

The pool knows nothing of how a connection is opened: it is given an ``opener`` (plain TCP to the
local app for inbound, verified TLS to a peer for outbound). Idle connections are reused LIFO (the
most recently used is the least likely to have been closed by the server) and dropped after
``idle_timeout_s``; a connection goes back to the pool only when both sides of its h11 state machine
finished the exchange cleanly.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import h11
import trio

from ..net import readable_now
from .h1client import H1Client

IDLE_TIMEOUT_S = 30.0   # below common app keep-alive timeouts (Go 90 s, nginx 75 s, node 5 s is the outlier)
MAX_IDLE = 128          # idle connections kept per upstream


class UpstreamConn:
    __slots__ = ("stream", "h11", "idle_since", "reused")

    def __init__(self, stream: Any) -> None:     # a net.FdStream (plain TCP, or TLS outbound)
        self.stream = stream
        self.h11 = H1Client()    # h11's surface, a fraction of its cost (see h1client.py)
        self.idle_since = 0.0
        self.reused = False


class Pool:
    """Keep-alive HTTP/1.1 connections to one upstream."""

    http2 = False           # the leg speaks HTTP/1.1: no gRPC across it (h2pool.H2Pool says True)

    def __init__(self, opener: Callable[[], Awaitable[Any]], *, max_idle: int = MAX_IDLE,
                 idle_timeout_s: float = IDLE_TIMEOUT_S) -> None:
        self._opener = opener
        self._idle: list[UpstreamConn] = []
        self._max_idle = max_idle
        self._idle_timeout_s = idle_timeout_s
        self.opened = 0
        self.http10 = False     # the upstream answered in HTTP/1.0 once: it never sends 100 Continue

    async def acquire(self, *, fresh: bool = False) -> UpstreamConn:
        if not fresh:
            now = trio.current_time()
            while self._idle:
                conn = self._idle.pop()
                if now - conn.idle_since < self._idle_timeout_s and not _stale(conn.stream):
                    conn.reused = True
                    return conn
                _close_now(conn)   # too old, closed by the app, or stray bytes arrived while it sat idle
        stream = await self._opener()
        self.opened += 1
        return UpstreamConn(stream)

    def release(self, conn: UpstreamConn) -> None:
        """Give a connection back after a complete exchange; anything unclean is closed instead."""
        c = conn.h11
        if c.http10:
            self.http10 = True
        if c.our_state is h11.DONE and c.their_state is h11.DONE and len(self._idle) < self._max_idle:
            c.start_next_cycle()
            conn.idle_since = trio.current_time()
            self._idle.append(conn)
        else:
            _close_now(conn)

    def discard(self, conn: UpstreamConn) -> None:
        _close_now(conn)

    def close_idle(self) -> None:
        while self._idle:
            _close_now(self._idle.pop())



def _close_now(conn: UpstreamConn) -> None:
    conn.stream.close_now()


def _stale(stream) -> bool:
    """True when an idle pooled connection is readable: EOF (the app closed it) or bytes nobody
    asked for (an app that answered twice). Either way it must not carry the next request."""
    fd = stream.fileno()
    return fd < 0 or readable_now(fd)
