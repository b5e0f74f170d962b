"""Two-way byte relay between two streams (101 upgrades, CONNECT tunnels, TCP mode).

Theory of operation: one task per direction, both in one nursery. When a direction reads EOF it
half-closes its destination if the destination can (``send_eof`` on a TCP stream), and the other
direction keeps flowing. A TLS stream cannot half-close here, so when the side that ended can only be
fully closed, the other direction gets ``close_timeout_s`` to finish before both are closed. An idle
timeout (no bytes either way) and a maximum lifetime bound every relay.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from .log import get_logger

log = get_logger("relay")

CHUNK = 256 * 1024   # large reads: fewer trips through Python per byte


@dataclass
class RelayResult:
    a_to_b: int = 0
    b_to_a: int = 0
    ended_by: str = ""   # "a_closed", "b_closed", "idle_timeout", "lifetime", "error: ..."


async def relay(a: trio.abc.Stream, b: trio.abc.Stream, *, idle_timeout_s: float | None = None,
                close_timeout_s: float = 5.0, max_lifetime_s: float | None = None) -> RelayResult:
    """Copy a→b and b→a until both directions end (or a timeout). Does not close the streams."""
    result = RelayResult()
    last_activity = [trio.current_time()]
    done = {"a": False, "b": False}

    async def pump(src: trio.abc.Stream, dst: trio.abc.Stream, name: str, outer: trio.CancelScope) -> None:
        total = 0
        try:
            while True:
                data = await src.receive_some(CHUNK)
                if not data:
                    break
                last_activity[0] = trio.current_time()
                await dst.send_all(data)
                total += len(data)
                if name == "a":
                    result.a_to_b = total
                else:
                    result.b_to_a = total
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            result.ended_by = result.ended_by or f"error: {exc}"
            outer.cancel()
            return
        done[name] = True
        result.ended_by = result.ended_by or f"{name}_closed"
        if isinstance(dst, trio.abc.HalfCloseableStream):
            try:
                await dst.send_eof()
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        # dst cannot half-close: give the other direction close_timeout_s, then end everything.
        outer.deadline = min(outer.deadline, trio.current_time() + close_timeout_s)

    with trio.CancelScope() as scope:
        if max_lifetime_s:
            scope.deadline = trio.current_time() + max_lifetime_s
        async with trio.open_nursery() as outer:
            if idle_timeout_s:
                outer.start_soon(_idle_watch, last_activity, idle_timeout_s, scope, result, done)
            async with trio.open_nursery() as pumps:
                pumps.start_soon(pump, a, b, "a", scope)
                pumps.start_soon(pump, b, a, "b", scope)
            outer.cancel_scope.cancel()
    if (scope.cancelled_caught and not result.ended_by.startswith("error") and max_lifetime_s
            and trio.current_time() >= scope.deadline and not any(done.values())):
        result.ended_by = "lifetime"
    return result


async def _idle_watch(last: list[float], idle_s: float, scope: trio.CancelScope, result: RelayResult,
                      done: dict[str, bool]) -> None:
    while True:
        wait = last[0] + idle_s - trio.current_time()
        if wait <= 0:
            result.ended_by = result.ended_by or "idle_timeout"
            scope.cancel()
            return
        await trio.sleep(wait)
