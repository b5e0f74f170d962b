"""Local handlers: exchanges the proxy answers itself (the redirect port, admin, the webhook).

A :class:`~.exchange.Route` with ``local`` set sends every request of its connections here instead
of upstream. The connection loop is the engine's (``Forwarder.serve``), so a local handler gets the
same head limits, timeouts, error answers, keep-alive and access-log line as a proxied request.
The body is read whole, up to ``Route.max_local_body_bytes`` (413 beyond), under the body
deadline; ``Expect: 100-continue`` is answered at once. The handler is an ``async`` function
``LocalRequest -> LocalResponse``; the engine frames the answer (Content-Length, Connection) and
sends no body to a HEAD request. An exception in a handler is a logged 500, never a lost connection.
"""

from __future__ import annotations

from ..errors import HTTPError
from ..log import get_logger
from . import framing
from . import headers as hdr
from .body import RequestBody
from .deadlines import Watch
from .exchange import Drain, End, Limits, LocalRequest, LocalResponse, Route
from .h1server import RequestHead
from .response import ResponseWriter, informational_head
from .shell import AccessEntry, client_send, linger

log = get_logger("http")

CONTINUE = informational_head(100, b"Continue", ())


async def answer_locally(route: Route, drain: Drain, stream, head: RequestHead, pending: bytearray,
                         entry: AccessEntry, watch: Watch) -> bool:
    """Answer one request with ``route.local``; True when the connection may carry another."""
    limits = route.limits
    body = b""
    if head.has_body:
        body = await _read_body(stream, head, pending, watch, route.max_local_body_bytes, limits)
        entry.bytes_in = len(body)
    entry.request_done = True
    facts = entry.facts
    req = LocalRequest(method=head.method.decode("ascii", "replace"),
                       target=head.target.decode("ascii", "replace"),
                       headers=tuple((name, value) for _, name, value in head.items), body=body,
                       client_ip=facts.forward.client_ip.decode("ascii", "replace"), facts=facts)
    try:
        reply = await route.local(req)
    except HTTPError:
        raise
    except Exception as exc:      # a handler's bug: the client gets a 500, the log the cause
        log.error("local handler failed", listener=route.name, path=req.path, error=repr(exc))
        reply = LocalResponse(500, b"internal error\n", [("Content-Type", "text/plain; charset=utf-8")])
    items = [(name.encode(), name.lower().encode(), value.encode()) for name, value in reply.headers]
    items = [t for t in items if t[1] not in (b"content-length", b"transfer-encoding", b"connection")]
    items.append((b"Content-Length", b"content-length", b"%d" % len(reply.body)))
    writer = ResponseWriter()
    out = writer.head(reply.status, hdr.reason_phrase(reply.status), items, request_method=head.method,
                      client_http11=head.http_version == b"1.1", client_keep_alive=head.keep_alive,
                      close=reply.close or drain.draining)
    if head.method != b"HEAD":
        out += reply.body
    entry.status = reply.status
    entry.responded = True
    entry.bytes_out = len(reply.body)
    await client_send(stream, out, watch, limits.body_timeout_s)
    if not writer.keep_alive:
        await linger(stream)      # the client may have sent more: let it read the answer first
    return writer.keep_alive


async def _read_body(stream, head: RequestHead, pending: bytearray, watch: Watch, max_bytes: int,
                     limits: Limits) -> bytes:
    if head.framing == framing.LENGTH and head.length > max_bytes:
        raise HTTPError(413, f"request body larger than {max_bytes} bytes", kind="body_too_large")
    reader = head.body_reader()
    if pending:
        reader.feed(bytes(pending))
        pending.clear()
    if head.expect_continue:
        await client_send(stream, CONTINUE, watch, limits.body_timeout_s)
    body = RequestBody(stream, reader, limits)
    data = bytearray()
    while True:
        event = body.poll()
        if type(event) is End:
            pending += body.rest()
            return bytes(data)
        if event is None:
            await body.wait(watch)
            continue
        data += event
        if len(data) > max_bytes:
            raise HTTPError(413, f"request body larger than {max_bytes} bytes", kind="body_too_large")
