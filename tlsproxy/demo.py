"""``tlsproxy demo``: a small built-in HTTP app behind the proxy, so a newcomer sees it work.

The demo app answers every request with a JSON echo of what it received (method, path, the
X-Forwarded-* headers the proxy added), which shows what an unmodified app sees behind tlsproxy.
"""

from __future__ import annotations

import json

import h11
import trio

from . import log as logging_setup
from .app import App, run_main
from .config import Settings, Upstream
from .log import get_logger

log = get_logger("demo")


async def serve_demo_app(port: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    async def handle(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                with trio.move_on_after(60):
                    event = conn.next_event()
                    while event is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
                        event = conn.next_event()
                if not isinstance(event, h11.Request):
                    return
                body = bytearray()
                while True:
                    e = conn.next_event()
                    if e is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
                    elif isinstance(e, h11.Data):
                        body += e.data
                    else:
                        break
                echo = {
                    "app": "tlsproxy demo",
                    "method": event.method.decode(), "path": event.target.decode(),
                    "headers": {k.decode(): v.decode("latin-1") for k, v in event.headers},
                    "body_bytes": len(body),
                }
                payload = (json.dumps(echo, indent=2) + "\n").encode()
                await stream.send_all(
                    conn.send(h11.Response(status_code=200, headers=[
                        ("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]))
                    + conn.send(h11.Data(data=payload)) + conn.send(h11.EndOfMessage()))
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
                else:
                    return
        except (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            return

    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    bound = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, handle, listeners)
        task_status.started(bound)


def main_demo(settings: Settings, app_port: int = 0) -> int:
    logging_setup.setup(settings.log_format, settings.log_level)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_demo_app, app_port)
            log.info("demo app listening", addr=f"127.0.0.1:{port}")
            app = App(settings.replace(upstream=Upstream("http", "127.0.0.1", port)))
            app.load_certificates()
            await app.run_with_signals()
            nursery.cancel_scope.cancel()

    return run_main(run)
