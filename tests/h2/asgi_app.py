"""A tiny ASGI app served by hypercorn over h2c (prior knowledge): the real HTTP/2 app of tests/h2.

Routes: ``GET /bytes/N`` (N bytes of :func:`pattern`), ``POST /echo`` (the body back, streamed as it
comes), ``GET /trailers`` (a body and trailers, sent when the request has ``TE: trailers``),
``GET /conn`` (the client's address: which upstream connection carried the stream),
``GET /sleep/MS`` (answers after MS milliseconds), ``GET /hold/N`` (answers once N requests are
held at once), ``GET /slow`` (one chunk, then a chunk every 5 s).
"""

from __future__ import annotations

import asyncio
import json

BLOCK = bytes(range(256)) * 256        # 64 KiB
_held: list[None] = []                  # requests that reached /hold/N so far


def pattern(n: int) -> bytes:
    return (BLOCK * (n // len(BLOCK) + 1))[:n]


async def _body(receive) -> None:
    while True:
        msg = await receive()
        if msg["type"] != "http.request" or not msg.get("more_body"):
            return


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    path = scope["path"]
    plain = [(b"content-type", b"application/octet-stream")]
    if path == "/echo":
        await send({"type": "http.response.start", "status": 200, "headers": plain})
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return
            body = msg.get("body", b"")
            more = msg.get("more_body", False)
            if body or not more:
                await send({"type": "http.response.body", "body": body, "more_body": more})
            if not more:
                return
    await _body(receive)
    if path.startswith("/bytes/"):
        n = int(path.rsplit("/", 1)[1])
        await send({"type": "http.response.start", "status": 200,
                    "headers": plain + [(b"content-length", str(n).encode())]})
        for i in range(0, n, len(BLOCK)):
            chunk = BLOCK[:min(len(BLOCK), n - i)]     # pattern(n), block by block
            await send({"type": "http.response.body", "body": chunk, "more_body": i + len(BLOCK) < n})
        if n == 0:
            await send({"type": "http.response.body", "body": b""})
    elif path == "/trailers":
        await send({"type": "http.response.start", "status": 200, "trailers": True,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"hello ", "more_body": True})
        await send({"type": "http.response.body", "body": b"trailers", "more_body": False})
        await send({"type": "http.response.trailers", "more_trailers": False,
                    "headers": [(b"x-checksum", b"sha256-abc"), (b"x-status", b"done")]})
    elif path == "/conn":
        body = json.dumps({"client": list(scope["client"]), "http_version": scope["http_version"],
                           "headers": [[k.decode(), v.decode()] for k, v in scope["headers"]]}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})
    elif path.startswith("/sleep/"):
        await asyncio.sleep(int(path.rsplit("/", 1)[1]) / 1000)
        body = json.dumps({"client": list(scope["client"])}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
    elif path.startswith("/hold/"):
        # answers once N requests are held at once (or after 10 s): all N are in flight together
        want = int(path.rsplit("/", 1)[1])
        _held.append(None)
        for _ in range(1000):
            if len(_held) >= want:
                break
            await asyncio.sleep(0.01)
        body = json.dumps({"client": list(scope["client"]), "held": len(_held)}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
    elif path == "/slow":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(6):
            await send({"type": "http.response.body", "body": b"tick\n", "more_body": True})
            await asyncio.sleep(5)
        await send({"type": "http.response.body", "body": b""})
    else:
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b"no such route"})
