"""relay.py on real loopback TCP streams: how a relay ends, and when (issue 15, item 3).

Side a is the client, side b the app. Each test wires client ⇄ [relay] ⇄ app with two real socket
pairs. End-to-end through the proxy with real WebSocket clients: tests/inbound/test_websocket_close.py
and test_websocket_chromium.py; TCP mode's rule: tests/tcp/test_relay.py.
"""

from __future__ import annotations

import trio

from tlsproxy.relay import relay


async def _pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    try:
        port = listeners[0].socket.getsockname()[1]
        with trio.fail_after(5):
            near = await trio.open_tcp_stream("127.0.0.1", port)
            far = await listeners[0].accept()
        return near, far
    finally:
        for lst in listeners:
            await lst.aclose()


async def _read_to_eof(stream: trio.SocketStream, timeout: float = 5) -> bytes:
    data = b""
    with trio.fail_after(timeout):
        while chunk := await stream.receive_some():
            data += chunk
    return data


async def _relayed(**kw):
    """(client, app, run): the client's and the app's ends, and a coroutine running the relay."""
    client, proxy_a = await _pair()
    proxy_b, app = await _pair()

    async def run(box: list) -> None:
        t0 = trio.current_time()
        result = await relay(proxy_a, proxy_b, **kw)
        box.append((result, trio.current_time() - t0))
        await proxy_a.aclose()
        await proxy_b.aclose()

    return client, app, run


async def test_app_closing_ends_the_relay_at_once_after_its_last_bytes():
    client, app, run = await _relayed(close_timeout_s=5.0)
    box: list = []
    with trio.fail_after(10):       # bounded even if the relay never ended
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, box)
            await client.send_all(b"hello")
            with trio.fail_after(5):
                assert await app.receive_some() == b"hello"
            await app.send_all(b"bye" * 1000)
            await app.aclose()                               # the app ends: the client is closed now
            assert await _read_to_eof(client) == b"bye" * 1000
    result, took = box[0]
    assert result.ended_by == "b_closed" and result.b_to_a == 3000 and result.a_to_b == 5
    assert took < 1.0, took                              # not the 5 s close timeout
    await client.aclose()


async def test_client_ending_half_closes_the_app_which_may_still_answer():
    client, app, run = await _relayed(close_timeout_s=5.0)
    box: list = []
    with trio.fail_after(10):       # bounded even if the relay never ended
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, box)
            await client.send_all(b"question")
            await client.send_eof()
            assert await _read_to_eof(app) == b"question"    # the app sees the client's EOF
            await trio.sleep(0.3)
            await app.send_all(b"late answer")               # ... and still answers
            await app.aclose()
            assert await _read_to_eof(client) == b"late answer"
    result, took = box[0]
    assert result.ended_by == "a_closed"
    assert took < 2.0, took                              # ended when the app closed, not at 5 s
    await client.aclose()


async def test_close_timeout_bounds_an_app_that_never_closes():
    client, app, run = await _relayed(close_timeout_s=0.5)
    box: list = []
    with trio.fail_after(10):       # bounded even if the relay never ended
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, box)
            await client.send_eof()
            assert await _read_to_eof(app) == b""
            assert await _read_to_eof(client) == b""         # the app said nothing and kept its side open
    result, took = box[0]
    assert result.ended_by == "a_closed"
    assert 0.4 < took < 2.0, took
    await client.aclose()
    await app.aclose()


async def test_tcp_mode_rule_a_half_closed_app_still_hears_the_client():
    """prompt_close=False (TCP mode): the app's FIN is passed on as a FIN and the client's
    direction keeps flowing until the client ends too."""
    client, app, run = await _relayed(close_timeout_s=5.0, prompt_close=False)
    box: list = []
    with trio.fail_after(10):       # bounded even if the relay never ended
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, box)
            await app.send_all(b"bye")
            await app.send_eof()
            assert await _read_to_eof(client) == b"bye"
            await trio.sleep(0.3)
            await client.send_all(b"still here")
            await client.send_eof()
            assert await _read_to_eof(app) == b"still here"
    result, _ = box[0]
    assert result.ended_by == "b_closed" and result.a_to_b == len(b"still here")
    await client.aclose()
    await app.aclose()
