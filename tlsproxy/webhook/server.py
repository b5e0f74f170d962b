"""``tlsproxy webhook``: the mutating admission webhook, a program of the shared runtime.

Theory of operation. Everything but the answer is the proxy's own machinery: the runtime
(``runtime.py``: root nursery, admin listener with ``/healthz``, ``/readyz``, ``/metrics``,
``/certs``, ``/shutdown``, reloads, signals, drain), one served TLS identity (``tls/served.py``:
``--cert-dir`` or ``--cert/--key`` → validated bundle → context → store → reloader; on failure the
old context keeps serving, the error is logged and counted) and the TLS connection handler every
TLS listener uses (``accept.py``: the *current* context per accept, the handshake under its
timeout).

What is the webhook's own is :func:`answer`: (method, path, headers, body, client) → (status,
headers, body), a function of the request alone around the pure :func:`review.handle`, with one log
line per review (action, pod, reason, uid). Until the forward engine serves local handlers, a small
h11 loop here reads each request (bounded JSON body) and writes the answer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus

import h11
import trio
from prometheus_client import Counter

from .. import net
from ..accept import ConnectionHandler, TLSListenerConfig
from ..admin.health import Health
from ..certs.bundle import Bundle
from ..certs.source import CertSource, Material
from ..config import Settings
from ..errors import ConfigError
from ..http.forward import ConnFacts
from ..log import get_logger
from ..metrics import Metrics
from ..runtime import Runtime
from ..tls.contexts import ServerTLSOptions, server_context
from ..tls.served import ServedTLS
from ..tls.store import Generation
from ..tls.stream import TLSStream
from .injector import InjectOptions
from .review import MAX_REVIEW_BYTES, PATHS, ReviewError, handle

log = get_logger("webhook")

MAX_HEAD_BYTES = 16 * 1024         # the API server sends a short head; node's default is 16 KiB
READ_CHUNK = 65536
LINGER_S = 2.0                     # after a 413, drain the client's in-flight body this long at most

Headers = Sequence[tuple[bytes, bytes]]
JSON = ((b"content-type", b"application/json"),)


@dataclass(frozen=True)
class WebhookConfig:
    settings: Settings
    options: InjectOptions
    reload_check_s: float | None = None       # None: --reload-interval (the proxy's own setting)


class Answerer:
    """:meth:`answer`: one webhook request → its response; counts reviews by outcome."""

    def __init__(self, options: InjectOptions, metrics: Metrics) -> None:
        self.options = options
        self.reviews = Counter("tlsproxy_webhook_reviews", "AdmissionReviews answered, by outcome",
                               ["action"], registry=metrics.registry)

    def answer(self, method: bytes, path: str, headers: Headers, body: bytes,
               client: str) -> tuple[int, Headers, bytes]:
        """(method, path, headers, body, client) → (status, headers, body). Never raises for a bad
        request: every refusal is a status with a JSON ``{"error": ...}`` body."""
        del headers   # the review is in the body; Content-Type is not required (the API server sets it)
        if method != b"POST":
            return 405, (*JSON, (b"allow", b"POST")), _json({"error": "POST an AdmissionReview"})
        if len(body) > MAX_REVIEW_BYTES:
            return 413, JSON, _json({"error": f"body larger than {MAX_REVIEW_BYTES} bytes"})
        try:
            outcome = handle(path, body, self.options)
        except ReviewError as exc:
            self.reviews.labels("error").inc()
            log.warning("admission review refused", path=path, client=client, status=exc.status,
                        reason=exc.reason)
            return exc.status, JSON, _json({"error": exc.reason})
        self.reviews.labels(outcome.action).inc()
        log.info("admission review", path=path, action=outcome.action, pod=outcome.pod,
                 reason=outcome.reason, uid=outcome.response["response"]["uid"])
        return 200, JSON, _json(outcome.response)


class Webhook:
    def __init__(self, cfg: WebhookConfig) -> None:
        s = cfg.settings
        if s.cert_dir is None and s.cert is None:
            raise ConfigError("webhook needs --cert-dir DIR or --cert FILE --key FILE: the API server "
                              "only calls a webhook whose certificate its caBundle trusts")
        if cfg.reload_check_s:
            s = s.replace(reload_check_interval_s=cfg.reload_check_s)
        self.cfg = cfg
        self.settings = s
        self.source = CertSource(cert_dir=s.cert_dir, cert=s.cert, key=s.key)
        self.metrics = Metrics()
        self.served = ServedTLS(self.source, self._build, self.metrics)
        self.store = self.served.store
        self.reloader = self.served.reloader
        self.health = Health()
        self.runtime = Runtime(s, self.served, self.metrics, self.health, name="webhook")
        self.answerer = Answerer(cfg.options, self.metrics)

    @property
    def bound_tls(self):
        return self.runtime.bound.tls

    @property
    def bound_admin(self):
        return self.runtime.bound.admin

    # ------------------------------------------------------------------ certificates
    def _build(self, material: Material) -> tuple[object, list[Bundle]]:
        """Material → a *new* context (the reloader calls this off the event loop). Raises CertError."""
        s = self.settings
        bundles = list(material.bundles())
        ctx = server_context(bundles, ServerTLSOptions(min_version=s.tls_min_version,
                                                       session_tickets=s.tls_session_tickets))
        return ctx, bundles

    def load_certificates(self) -> Generation:
        """Startup load through the reloader; raises CertError and changes nothing then."""
        return self.served.load_now()

    # ------------------------------------------------------------------ the program
    def request_drain(self, reason: str = "signal") -> None:
        self.runtime.request_drain(reason)

    async def start_listeners(self, accepting: trio.Nursery, handlers: trio.Nursery) -> None:
        s = self.settings
        tls_cfg = TLSListenerConfig(name="webhook", addr=s.listen, handshake_timeout_s=s.handshake_timeout_s,
                                    max_connections=s.max_connections)
        handler = ConnectionHandler(tls_cfg, self.store, self.metrics, self._serve_connection)
        self.runtime.bound.tls = await accepting.start(net.serve, handler.listener(), handler, handlers)
        log.info("webhook ready", listen=str(self.bound_tls), paths=list(PATHS), image=self.cfg.options.image)

    def on_drain(self) -> None:
        pass    # no pools; idle keep-alive connections end with the handlers' deadline

    async def run(self, *, task_status: trio.TaskStatus[Webhook] = trio.TASK_STATUS_IGNORED) -> None:
        await self.runtime.run(self, task_status=task_status)

    async def run_with_signals(self) -> None:
        await self.runtime.run_with_signals(self.run)

    # ------------------------------------------------------------------ one connection (HTTP/1.1)
    async def _serve_connection(self, stream: TLSStream, facts: ConnFacts) -> None:
        s = self.settings
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        first = True
        while True:
            try:
                request = await _next(stream, conn, s.head_timeout_s if first else s.idle_timeout_s)
                if request is None:
                    return
                if not isinstance(request, h11.Request):
                    raise h11.RemoteProtocolError("expected a request", 400)
                length = dict(request.headers).get(b"content-length")
                if length is not None and int(length) > MAX_REVIEW_BYTES:
                    raise _TooLarge()
                body = await _read_body(stream, conn, s.body_timeout_s)
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                await _send_simple(stream, conn, status, {"error": str(exc) or HTTPStatus(status).phrase})
                return
            except _TooLarge:
                await _send_simple(stream, conn, 413, {"error": f"body larger than {MAX_REVIEW_BYTES} bytes"})
                # read and drop what is still in flight, so the client sees the 413, not a reset
                await stream.linger_close(LINGER_S, 2 * MAX_REVIEW_BYTES)
                return
            except trio.TooSlowError:
                return
            first = False
            path = request.target.decode("ascii", "replace")
            status, headers, payload = self.answerer.answer(request.method, path, request.headers, body,
                                                            facts.client)
            await _send(stream, conn, status, payload, headers)
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
            else:
                return


class _TooLarge(Exception):
    pass


def _json(data: object) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


async def _next(stream: TLSStream, conn: h11.Connection, timeout_s: float):
    """The next h11 event; None when the client closed cleanly between requests."""
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            if isinstance(event, h11.ConnectionClosed):
                return None
            return event
        with trio.fail_after(timeout_s):
            data = await stream.receive_some(READ_CHUNK)
        if not data and conn.their_state is h11.IDLE:
            return None
        conn.receive_data(data)


async def _read_body(stream: TLSStream, conn: h11.Connection, timeout_s: float) -> bytes:
    body = bytearray()
    while True:
        event = await _next(stream, conn, timeout_s)
        if event is None:
            raise h11.RemoteProtocolError("connection closed mid-request", 400)
        if isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_REVIEW_BYTES:
                raise _TooLarge()
        elif isinstance(event, h11.EndOfMessage):
            return bytes(body)


async def _send(stream: TLSStream, conn: h11.Connection, status: int, payload: bytes,
                headers: Headers = JSON) -> None:
    head = [*headers, (b"content-length", str(len(payload)).encode())]
    # head + body in one write: TLS records are costly in small pieces
    data = conn.send(h11.Response(status_code=status, headers=head))
    data += conn.send(h11.Data(data=payload)) + conn.send(h11.EndOfMessage())
    with trio.fail_after(30):
        await stream.send_all(data)


async def _send_simple(stream: TLSStream, conn: h11.Connection, status: int, data: object) -> None:
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    try:
        await _send(stream, conn, status, _json(data))
    except (trio.BrokenResourceError, trio.TooSlowError, h11.LocalProtocolError):
        pass
