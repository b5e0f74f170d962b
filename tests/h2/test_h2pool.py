"""The h2c pool's shell on its own, over real loopback sockets to the scripted h2 app: what the
engine's upstream leg sees when a connection goes silent, and the pool's connection sharing."""

from __future__ import annotations

import pytest
import trio

from tests.h2.scripted_app import ScriptedApp
from tlsproxy.config import Upstream
from tlsproxy.http.exchange import End, ResponseHead
from tlsproxy.http.h2client import NEED_DATA
from tlsproxy.http.h2pool import H2Pool, Timers
from tlsproxy.inbound.upstream import tcp_opener


def _pool(port: int, **timers) -> H2Pool:
    return H2Pool(tcp_opener(Upstream("h2c", "127.0.0.1", port), 5.0), connect_timeout_s=5.0,
                  timers=Timers(**timers))


async def _request(pool: H2Pool, path: bytes):
    leg = await pool.acquire()
    leg.h11.send_head(b"GET", path, [(b"Host", b"host", b"app")])
    leg.h11.send_end()
    await leg.stream.send_all(b"")
    return leg


async def _response(leg) -> list:
    events = []
    while True:
        event = leg.h11.next_event()
        if event is NEED_DATA:
            leg.h11.receive_data(await leg.stream.receive_some())
            continue
        events.append(event)
        if isinstance(event, End):
            return events


async def test_streams_share_a_connection_and_a_silent_one_is_found_dead_by_ping():
    with ScriptedApp() as app:
        pool = _pool(app.port, ping_idle_s=0.3, ping_timeout_s=0.3)
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            with trio.fail_after(10):
                legs = [await _request(pool, b"/ok") for _ in range(5)]
                for leg in legs:
                    head, body, _end = await _response(leg)
                    assert isinstance(head, ResponseHead) and head.status == 200 and body == b"ok"
                    pool.release(leg)
                assert pool.connections == 1 and app.connections == 1
                frozen = await _request(pool, b"/freeze")
                t0 = trio.current_time()
                with pytest.raises(trio.BrokenResourceError, match="did not answer a PING"):
                    await _response(frozen)
                assert trio.current_time() - t0 < 3
                pool.discard(frozen)
                assert pool.connections == 0
                leg = await _request(pool, b"/ok")          # a new connection serves the next stream
                assert (await _response(leg))[1] == b"ok"
                pool.release(leg)
                assert app.connections == 2
            nursery.cancel_scope.cancel()


async def test_idle_connection_is_closed_with_goaway():
    with ScriptedApp() as app:
        pool = _pool(app.port, idle_timeout_s=0.3)
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            with trio.fail_after(10):
                leg = await _request(pool, b"/ok")
                await _response(leg)
                pool.release(leg)
                assert pool.connections == 1
                while pool.connections:              # noqa: ASYNC110 (the pool has no event for it)
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
