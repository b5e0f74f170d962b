"""Per-connection deadlines, enforced by one watchdog task instead of a cancel scope per wait.

Theory of operation
-------------------
A proxied request waits in up to six places (idle before the head, the rest of the head, the
request body, the upstream taking the request, the upstream's answer, the client taking the
response), each under its own timeout. A ``trio.CancelScope`` per wait cost about 35 Python calls
(two generator context managers inside trio, a deadline heap push) — a sixth of a keep-alive
request's CPU (docs/performance.md). Here each client connection owns one :class:`Watch`, made
once: its scope wraps the whole connection, and arming a wait is two attribute stores and a clock
read. One :class:`Watchdog` task per process wakes every ``TICK_S`` and cancels the scope of
every watch whose deadline passed, recording *which* wait expired (``Watch.expired``); the engine
turns that into the same answer a per-wait scope gave (408, 504, or a quiet close). Deadlines are
therefore exact to one tick: a twentieth of the shortest configured timeout (:func:`tick_for`,
25–500 ms), so a deadline fires at most 5 % late.

Every expiry of the connection's watch ends the connection, which is what makes one scope per
connection enough: a cancelled scope stays cancelled. This is the engine's one deadline mechanism
(no ``fail_after``/``move_on_after`` in ``tlsproxy/http``); the few waits that must survive or
outlive another are given a watch of their own, made only when needed: a request body's pump (its
deadlines run beside the response's), the short wait for an app's ``100 Continue``, and an error
answer after an expiry (a shielded watch: the connection's scope is already cancelled).

A watch can also guard a single wait on a descriptor without any cancel scope (``Watch(fd=…)``,
from :meth:`Watchdog.watch_fd`): an expiry (or a drain) wakes the wait with
``trio.ClosedResourceError`` (``trio.lowlevel.notify_closing``), and the waiter, which then sees
``expired`` set, closes the descriptor. The TLS listener waits for a connection's first byte this
way: an idle connection that has not sent a request holds no scope and no engine state
(docs/performance.md, "Idle memory").
"""

from __future__ import annotations

import math
import time

import trio

TICK_S = 0.05
MIN_TICK_S, MAX_TICK_S = 0.025, 0.5


def tick_for(*timeouts_s: float) -> float:
    """The watchdog's period for these timeouts: a twentieth of the shortest (a deadline fires at
    most 5 % late), between 25 ms and 500 ms — with the defaults (10 s and up) 0.5 s, so 10,000
    idle connections cost 20,000 deadline checks a second, not 200,000."""
    return min(MAX_TICK_S, max(MIN_TICK_S, min(timeouts_s) / 20))

_now = time.monotonic


class Watch:
    """One client connection's current wait: what it is (``phase``) and until when (``deadline``)."""

    __slots__ = ("scope", "deadline", "phase", "expired", "fd")
    scope: trio.CancelScope     # unset on a descriptor's watch (fd >= 0): an expiry wakes the wait on fd

    def __init__(self, fd: int = -1) -> None:
        if fd < 0:
            self.scope = trio.CancelScope()
        self.deadline = math.inf
        self.phase = ""
        self.expired: str | None = None    # the phase whose deadline passed, once it did
        self.fd = fd

    def arm(self, phase: str, timeout_s: float) -> None:
        self.phase = phase
        self.deadline = _now() + timeout_s

    def disarm(self, phase: str = "") -> None:
        self.phase = phase
        self.deadline = math.inf


class Watchdog:
    """Owns the live watches; :meth:`run` (one task, in the application's root nursery) expires them."""

    def __init__(self, tick_s: float = TICK_S) -> None:
        self.tick_s = tick_s
        self.watches: set[Watch] = set()

    def watch(self) -> Watch:
        w = Watch()
        self.watches.add(w)
        return w

    def watch_fd(self, fd: int) -> Watch:
        """A watch over one wait on ``fd`` (no cancel scope): an expiry wakes the wait with
        ``trio.ClosedResourceError``; the waiter must check ``expired`` and close ``fd``."""
        w = Watch(fd)
        self.watches.add(w)
        return w

    def forget(self, w: Watch) -> None:
        self.watches.discard(w)

    @staticmethod
    def fire(w: Watch) -> None:
        """Expire ``w`` now (its deadline passed, or a drain wakes an idle connection)."""
        if w.expired is None:
            w.expired = w.phase
        w.deadline = math.inf
        if w.fd < 0:
            w.scope.cancel()
        else:
            try:
                trio.lowlevel.notify_closing(w.fd)
            except (ValueError, OSError):
                pass    # already closed

    def expire_due(self, now: float | None = None) -> int:
        now = _now() if now is None else now
        due = [w for w in self.watches if w.deadline <= now]
        for w in due:
            self.fire(w)
        return len(due)

    async def run(self) -> None:
        while True:
            await trio.sleep(self.tick_s)
            if self.watches:
                self.expire_due()
