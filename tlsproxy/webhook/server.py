"""``tlsproxy webhook``: the mutating admission webhook, served over tlsproxy's own TLS stack.

Theory of operation. The pieces are the proxy's: ``net.bind`` + ``inbound.server.serve_tls`` accept
and handshake each connection with the *current* context of a ``ContextStore``; the certificate comes
from a ``CertSource`` (``--cert-dir`` or ``--cert/--key``) and is reloaded by the proxy's
``tls.reload`` service (directory watch plus a periodic re-check): a changed pair becomes a new
context swapped in one reference; on failure the old one keeps serving, and the error is logged and
counted. The admin listener is the proxy's
(``/healthz``, ``/readyz``, ``/metrics``).

What differs is the connection handler: a small h11 loop that accepts ``POST /mutate`` and
``POST /mutate-namespace`` with a bounded JSON body and answers with :func:`review.handle` — a pure
function. One log line per review (action, pod, reason, uid).

Nursery layout: root (admin, reload loop, signals) → handlers (connections; deadline on drain) →
accepting (cancelled first on drain), as in ``app.py``.
"""

from __future__ import annotations

import json
import signal
from dataclasses import dataclass
from http import HTTPStatus

import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest

from ..admin.health import Health
from ..admin.server import AdminRequest, AdminRoutes, Reply, serve_admin
from ..certs.bundle import Bundle
from ..certs.source import CertSource, Material
from ..config import Settings
from ..errors import ConfigError
from ..http.forward import ConnFacts
from ..inbound.server import ConnectionHandler, TLSListenerConfig, serve_tls
from ..log import get_logger
from ..metrics import Metrics
from ..tls.contexts import ServerTLSOptions, server_context
from ..tls.reload import Reloader, serve_reloads
from ..tls.store import ContextStore, Generation
from ..tls.stream import TLSStream
from .injector import InjectOptions
from .review import MAX_REVIEW_BYTES, PATHS, ReviewError, handle

log = get_logger("webhook")

MAX_HEAD_BYTES = 16 * 1024         # the API server sends a short head; node's default is 16 KiB
READ_CHUNK = 65536
LINGER_S = 2.0                     # after a 413, drain the client's in-flight body this long at most


@dataclass(frozen=True)
class WebhookConfig:
    settings: Settings
    options: InjectOptions
    reload_check_s: float | None = None       # None: --reload-interval (the proxy's own setting)
    webhook_configuration: str | None = None  # keep this MutatingWebhookConfiguration's caBundle current


class Webhook:
    def __init__(self, cfg: WebhookConfig) -> None:
        s = cfg.settings
        if cfg.webhook_configuration and s.provision_secret is None:
            raise ConfigError("--webhook-configuration keeps caBundle equal to the provisioned CA: it needs "
                              "--provision-secret")
        if s.cert_dir is None and s.cert is None and s.provision_secret is None:
            raise ConfigError("webhook needs --cert-dir DIR, --cert FILE --key FILE, or --provision-secret "
                              "NAME: the API server only calls a webhook whose certificate its caBundle "
                              "trusts")
        self.cfg = cfg
        self.metrics = Metrics()
        self.keeper = None
        if s.provision_secret is not None:    # own certificate in a Secret, caBundle kept (k8s/)
            from ..k8s.cabundle import CABundleKeeper
            from ..k8s.secrets import ProvisionedSecret

            self.source = ProvisionedSecret.from_settings(s, self.metrics)
            if cfg.webhook_configuration:
                self.keeper = CABundleKeeper(cfg.webhook_configuration, self.source.ca_pem,
                                             self.source.cluster, self.metrics)
        else:
            self.source = CertSource(cert_dir=s.cert_dir, cert=s.cert, key=s.key)
        self.store = ContextStore()
        self.store.subscribe(self._on_swap)
        self.reviews = Counter("tlsproxy_webhook_reviews", "AdmissionReviews answered, by outcome",
                               ["action"], registry=self.metrics.registry)
        self.health = Health()
        self.routes = AdminRoutes()
        self.bound_tls = None
        self.bound_admin = None
        self._drain = trio.Event()
        self.reloader = Reloader(self.store, self.source.read, self._build, self.metrics,
                                 describe=self.source.describe())
        self._install_admin()

    # ------------------------------------------------------------------ certificates
    def _build(self, material: Material) -> tuple[object, list[Bundle]]:
        """Material → a *new* context (the reloader calls this off the event loop). Raises CertError."""
        s = self.cfg.settings
        bundles = list(material.bundles())
        ctx = server_context(bundles, ServerTLSOptions(min_version=s.tls_min_version,
                                                       session_tickets=s.tls_session_tickets))
        return ctx, bundles

    def load_certificates(self) -> Generation:
        """Startup load through the reloader; raises CertError and changes nothing then."""
        return self.reloader.load_now()

    def _on_swap(self, old: Generation | None, new: Generation) -> None:
        info = new.bundles[0].info
        self.metrics.cert_not_after.labels("server", info.subject, info.serial).set(
            info.not_after.timestamp())
        self.metrics.last_reload.labels("server").set(new.loaded_at)
        log.info("certificate loaded" if old is None else "certificate reloaded",
                 source=self.source.describe(), serial=info.serial, subject=info.subject,
                 not_after=info.not_after.isoformat(), generation=new.number)

    # ------------------------------------------------------------------ admin
    def _install_admin(self) -> None:
        async def healthz(_req: AdminRequest) -> Reply:
            return Reply.text(200, "ok")

        async def readyz(_req: AdminRequest) -> Reply:
            problems = await self.health.not_ready()
            if problems:
                return Reply.json(503, {"ready": False, "not_ready": problems})
            return Reply.json(200, {"ready": True})

        async def metrics(_req: AdminRequest) -> Reply:
            return Reply(200, generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST)

        async def cert_check() -> str | None:
            return None if self.store.ready else "no valid certificate loaded"

        async def listener_check() -> str | None:
            return None if self.bound_tls is not None else "TLS listener not bound yet"

        self.routes.add("/healthz", healthz)
        self.routes.add("/readyz", readyz)
        self.routes.add("/metrics", metrics)
        self.health.add_check("certificate", cert_check)
        self.health.add_check("listeners", listener_check)

    # ------------------------------------------------------------------ running
    def request_drain(self) -> None:
        self.health.draining = True
        self._drain.set()

    async def run(self, *, task_status: trio.TaskStatus[Webhook] = trio.TASK_STATUS_IGNORED) -> None:
        s = self.cfg.settings
        if not self.store.ready and self.cfg.settings.provision_secret is None:
            self.load_certificates()
        tls_cfg = TLSListenerConfig(name="webhook", addr=s.listen, handshake_timeout_s=s.handshake_timeout_s,
                                    max_connections=s.max_connections)
        handler = ConnectionHandler(tls_cfg, self.store, self.metrics, self._serve_connection)
        async with trio.open_nursery() as root:
            self.bound_admin = await root.start(serve_admin, s.admin, self.routes)
            interval = self.cfg.reload_check_s or s.reload_check_interval_s
            if s.provision_secret is not None:
                keeper = self.keeper
                await root.start(lambda task_status: self.source.serve(
                    self.reloader.reload, task_status=task_status,
                    after_change=keeper.ca_changed if keeper is not None else None))
                if keeper is not None:
                    await root.start(keeper.serve)
                await self.source.first_material.wait()     # not ready (admin says so) until then
            else:
                await root.start(lambda task_status: serve_reloads(
                    self.reloader, self.source.watch_paths, interval_s=interval, task_status=task_status))
            async with trio.open_nursery() as handlers:
                async with trio.open_nursery() as accepting:
                    self.bound_tls = await accepting.start(serve_tls, tls_cfg, handler, handlers)
                    log.info("webhook ready", listen=str(self.bound_tls), paths=list(PATHS),
                             image=self.cfg.options.image)
                    task_status.started(self)
                    await self._drain.wait()
                    # readiness is already 503: let endpoints stop routing here, then stop accepting
                    await trio.sleep(min(s.drain_delay_s, s.drain_timeout_s))
                    accepting.cancel_scope.cancel()
                handlers.cancel_scope.deadline = trio.current_time() + s.drain_timeout_s
            root.cancel_scope.cancel()

    async def run_with_signals(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._signals, nursery.cancel_scope)
            await self.run()
            nursery.cancel_scope.cancel()

    async def _signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                if self._drain.is_set():
                    scope.cancel()
                    raise SystemExit(1)
                log.info("signal received; draining", signal=signal.Signals(signum).name)
                self.request_drain()

    # ------------------------------------------------------------------ one connection
    async def _serve_connection(self, stream: TLSStream, facts: ConnFacts) -> None:
        s = self.cfg.settings
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
            status, payload = self._answer(request, body, facts)
            await _send(stream, conn, status, payload)
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
            else:
                return

    def _answer(self, request: h11.Request, body: bytes, facts: ConnFacts) -> tuple[int, bytes]:
        path = request.target.decode("ascii", "replace")
        if request.method != b"POST":
            return 405, _json({"error": "POST an AdmissionReview"})
        try:
            outcome = handle(path, body, self.cfg.options)
        except ReviewError as exc:
            self.reviews.labels("error").inc()
            log.warning("admission review refused", path=path, client=facts.client, status=exc.status,
                        reason=exc.reason)
            return exc.status, _json({"error": exc.reason})
        self.reviews.labels(outcome.action).inc()
        log.info("admission review", path=path, action=outcome.action, pod=outcome.pod,
                 reason=outcome.reason, uid=outcome.response["response"]["uid"])
        return 200, _json(outcome.response)


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


async def _send(stream: TLSStream, conn: h11.Connection, status: int, payload: bytes) -> None:
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
    # head + body in one write: TLS records are costly in small pieces
    data = conn.send(h11.Response(status_code=status, headers=headers))
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
