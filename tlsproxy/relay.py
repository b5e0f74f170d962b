"""Two-way byte relay between two streams (101 upgrades, CONNECT tunnels, TCP mode).

Theory of operation: one task per direction, both in one nursery. Side ``a`` is the client, side
``b`` the app (or the tunnel's target). How a relay ends depends on which side ends first:

* **b ends** (the app closed its side): with ``prompt_close`` (upgrades and tunnels, the default) the
  relay ends at once — everything the app sent has been delivered — and the caller closes the client
  (close_notify, then FIN, to a TLS client). A WebSocket client waits for exactly that TCP close
  after the closing handshake (RFC 6455 §7.1.1), and nothing more will come from the app. Without
  ``prompt_close`` (TCP mode) the client's direction gets ``close_timeout_s`` to finish (a TLS client
  cannot be half-closed; a half-closeable one gets a FIN first).
* **a ends** (the client stopped sending): the app's side is half-closed (``send_eof``) and the app's
  direction keeps flowing — it may still answer. With ``prompt_close`` it has up to
  ``close_timeout_s`` to finish; without (TCP mode), until it ends or the idle timeout (a stream that
  cannot half-close gets ``close_timeout_s``).

So the close timeout only bounds a side that never closes: a relay whose sides both close ends as
soon as they have. An idle timeout (no bytes either way) and a maximum lifetime bound every relay.
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
                close_timeout_s: float = 5.0, max_lifetime_s: float | None = None,
                prompt_close: bool = True) -> RelayResult:
    """Copy a (the client) → b (the app) and back until the relay ends (see the module docstring;
    ``prompt_close=False`` is TCP mode's rule). Does not close the streams."""
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
        if prompt_close and name == "b":
            # The app ended: nothing more will come from it. End now; the caller closes the client.
            outer.cancel()
            return
        half_closed = False
        if isinstance(dst, trio.abc.HalfCloseableStream):
            try:
                await dst.send_eof()
                half_closed = True
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        if half_closed and not prompt_close:
            return     # TCP mode: the other direction flows until it ends (or the idle timeout)
        # Give the other direction close_timeout_s to finish, then end everything.
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
