"""The watchdog behind every client connection's deadlines (tlsproxy/http/deadlines.py)."""

import math

import trio

from tlsproxy.http.deadlines import Watchdog, tick_for


async def test_expire_due_fires_only_watches_whose_deadline_passed_and_records_the_phase():
    dog = Watchdog()
    late, early, unarmed = dog.watch(), dog.watch(), dog.watch()
    late.arm("head", 100.0)
    early.arm("idle", -1.0)
    unarmed.disarm("upgraded")
    assert dog.expire_due() == 1
    assert early.expired == "idle" and early.scope.cancel_called and early.deadline == math.inf
    assert late.expired is None and not late.scope.cancel_called
    assert unarmed.expired is None
    assert dog.expire_due() == 0          # a fired watch does not fire again
    dog.forget(early)
    assert early not in dog.watches


async def test_first_expiry_wins_when_a_drain_and_a_deadline_race():
    dog = Watchdog()
    w = dog.watch()
    w.arm("idle", 60)
    Watchdog.fire(w)
    w.phase = "head"
    Watchdog.fire(w)
    assert w.expired == "idle"


async def test_a_blocked_wait_is_cancelled_within_a_tick_of_its_deadline():
    dog = Watchdog(tick_s=0.02)
    w = dog.watch()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(dog.run)
        t0 = trio.current_time()
        with w.scope:
            w.arm("upstream_response", 0.1)
            await trio.sleep(5)
        elapsed = trio.current_time() - t0
        nursery.cancel_scope.cancel()
    assert w.scope.cancelled_caught and w.expired == "upstream_response"
    assert 0.1 <= elapsed < 1.0


def test_the_tick_is_a_twentieth_of_the_shortest_timeout_within_bounds():
    assert tick_for(10, 30, 60, 60) == 0.5
    assert tick_for(0.5, 30) == 0.025
    assert tick_for(2.0, 60) == 0.1
    assert tick_for(0.1) == 0.025
