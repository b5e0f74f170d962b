"""A scripted HTTP/2 app on the ``h2`` library (server side), for what a well-behaved app never does:
GOAWAY before serving, dying mid-stream, resetting a stream, never answering. It runs its own trio
loop in a thread and counts its connections.

Behaviour by path: ``/ok`` (200 "ok"), ``/goaway-once`` (the first connection answers its first
stream with GOAWAY, last stream id 0, and closes; later ones serve it), ``/goaway`` (always so),
``/die`` (response head and 64 KiB, then the socket closes), ``/reset`` (RST_STREAM INTERNAL_ERROR),
``/silent`` (never answers), ``/freeze`` (stops reading the connection: no PING ack),
``/trailers-in`` (the request's body length and trailers, as JSON), ``/early`` (403 at the request
head, then RST_STREAM NO_ERROR).
"""

from __future__ import annotations

import json
import threading

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import trio


class ScriptedApp:
    def __init__(self) -> None:
        self.port = 0
        self.connections = 0
        self.goaways = 0
        self._token: trio.lowlevel.TrioToken | None = None
        self._ready = threading.Event()
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=lambda: trio.run(self._main), daemon=True)

    def __enter__(self) -> ScriptedApp:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        assert self._token is not None and self._stop is not None
        self._token.run_sync_soon(self._stop.set)
        self._thread.join(10)

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self._serve, listeners)
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    async def _serve(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        first = self.connections == 1
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        conn.initiate_connection()
        requests: dict[int, dict] = {}
        try:
            await stream.send_all(conn.data_to_send())
            with trio.move_on_after(60):
                while True:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    for ev in conn.receive_data(data):
                        if isinstance(ev, h2.events.RequestReceived):
                            requests[ev.stream_id] = {"headers": dict(ev.headers), "body": 0, "trailers": {}}
                            if dict(ev.headers).get(b":path") == b"/early":
                                # refuse before the body: 403, then RST_STREAM NO_ERROR (RFC 9113 8.1)
                                conn.send_headers(ev.stream_id, [(b":status", b"403"),
                                                                 (b"content-length", b"2")])
                                conn.send_data(ev.stream_id, b"no", end_stream=True)
                                conn.reset_stream(ev.stream_id, h2.errors.ErrorCodes.NO_ERROR)
                                requests.pop(ev.stream_id)
                        elif isinstance(ev, h2.events.DataReceived):
                            conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                            if ev.stream_id in requests:
                                requests[ev.stream_id]["body"] += len(ev.data)
                        elif isinstance(ev, h2.events.TrailersReceived):
                            requests[ev.stream_id]["trailers"] = {k.decode(): v.decode()
                                                                  for k, v in ev.headers}
                        elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id in requests:
                            req = requests.pop(ev.stream_id)
                            if await self._answer(conn, stream, ev.stream_id, req, first):
                                return
                    await stream.send_all(conn.data_to_send())
        except (trio.BrokenResourceError, trio.ClosedResourceError, h2.exceptions.ProtocolError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def _answer(self, conn, stream, sid: int, req: dict, first: bool) -> bool:
        """Answer one request; True to close the connection at once."""
        path = req["headers"].get(b":path", b"")
        if path == b"/goaway" or (path == b"/goaway-once" and first):
            self.goaways += 1
            conn.close_connection(h2.errors.ErrorCodes.NO_ERROR, last_stream_id=0)
            await stream.send_all(conn.data_to_send())
            return True
        if path == b"/die":
            conn.send_headers(sid, [(b":status", b"200")])
            conn.send_data(sid, b"x" * 16384)
            conn.send_data(sid, b"x" * 16384)
            await stream.send_all(conn.data_to_send())
            return True
        if path == b"/reset":
            conn.reset_stream(sid, h2.errors.ErrorCodes.INTERNAL_ERROR)
            return False
        if path == b"/silent":
            return False
        if path == b"/freeze":               # stop reading the connection at all (no PING ack)
            await trio.sleep(30)
            return True
        if path == b"/trailers-in":
            body = json.dumps({"body": req["body"], "trailers": req["trailers"]}).encode()
        else:
            body = b"ok"
        conn.send_headers(sid, [(b":status", b"200"), (b"content-length", str(len(body)).encode())])
        conn.send_data(sid, body, end_stream=True)
        return False
