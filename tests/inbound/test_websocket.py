"""A WebSocket upgrade through the proxy becomes a two-way relay (trio-websocket on both ends)."""

from __future__ import annotations

import ssl

import trio
from trio_websocket import open_websocket_url, serve_websocket

from tests.support import running_proxy, settings_for


async def _echo_server(request):
    ws = await request.accept()
    try:
        while True:
            message = await ws.get_message()
            await ws.send_message(f"echo:{message}" if isinstance(message, str) else message[::-1])
    except Exception:
        return


async def test_websocket_roundtrip_through_proxy(pki):
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, _echo_server, "127.0.0.1", 0, None)
        port = server.port
        with running_proxy(settings_for(pki, port)) as proxy:
            ctx = ssl.create_default_context(cafile=str(pki.ca_file))
            async with open_websocket_url(f"wss://localhost:{proxy.port}/ws", ssl_context=ctx) as ws:
                for i in range(50):
                    await ws.send_message(f"hello {i}")
                    assert await ws.get_message() == f"echo:hello {i}"
                big = bytes(range(256)) * 4096    # 1 MiB binary frame
                await ws.send_message(big)
                assert await ws.get_message() == big[::-1]
            nursery.cancel_scope.cancel()
