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
line per review (action, pod, reason, uid). The HTTP/1.1 connection is the engine's: the answer is a
*local handler* of the forward engine (``http/local.py``), so the webhook has the same head limits,
timeouts, error answers and keep-alive as every other listener.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import trio
from prometheus_client import Counter

from .. import net
from ..accept import ConnectionHandler, TLSListenerConfig
from ..admin.health import Health
from ..certs.bundle import Bundle
from ..certs.source import CertSource, Material
from ..config import Settings
from ..errors import ConfigError
from ..http.deadlines import tick_for
from ..http.exchange import Drain, Limits, LocalRequest, LocalResponse, Route
from ..http.forward import Forwarder
from ..log import get_logger
from ..metrics import Metrics
from ..runtime import Runtime
from ..tls.contexts import ServerTLSOptions, server_context
from ..tls.served import ServedTLS
from ..tls.store import Generation
from .injector import InjectOptions
from .review import MAX_REVIEW_BYTES, PATHS, ReviewError, handle

log = get_logger("webhook")

MAX_HEAD_BYTES = 16 * 1024         # the API server sends a short head; node's default is 16 KiB
# The engine reads a body up to this (a plain-text 413 beyond); between MAX_REVIEW_BYTES and this the
# answer is the webhook's own JSON 413, which is what an API server's client library can show.
MAX_LOCAL_BODY_BYTES = 2 * MAX_REVIEW_BYTES

Headers = Sequence[tuple[bytes, bytes]]
JSON = ((b"content-type", b"application/json"),)


@dataclass(frozen=True)
class WebhookConfig:
    settings: Settings
    options: InjectOptions
    reload_check_s: float | None = None       # None: --reload-interval (the proxy's own setting)
    webhook_configuration: str | None = None  # keep this MutatingWebhookConfiguration's caBundle current


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
        if cfg.webhook_configuration and s.provision_secret is None:
            raise ConfigError("--webhook-configuration keeps caBundle equal to the provisioned CA: it needs "
                              "--provision-secret")
        if s.cert_dir is None and s.cert is None and s.provision_secret is None:
            raise ConfigError("webhook needs --cert-dir DIR, --cert FILE --key FILE, or --provision-secret "
                              "NAME: the API server only calls a webhook whose certificate its caBundle "
                              "trusts")
        if cfg.reload_check_s:
            s = s.replace(reload_check_interval_s=cfg.reload_check_s)
        self.cfg = cfg
        self.settings = s
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
        self.served = ServedTLS(self.source, self._build, self.metrics)
        self.store = self.served.store
        self.reloader = self.served.reloader
        if self.keeper is not None:           # every served CA change is a caBundle to keep equal
            keeper = self.keeper
            self.served.subscribe(lambda _old, _new: keeper.ca_changed())
        self.health = Health()
        self.runtime = Runtime(s, self.served, self.metrics, self.health, name="webhook")
        self.answerer = Answerer(cfg.options, self.metrics)
        self.drain = Drain()
        self.drain.watchdog.tick_s = tick_for(s.head_timeout_s, s.body_timeout_s, s.idle_timeout_s,
                                              s.min_body_rate_grace_s)

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
                                    max_connections=s.max_connections, first_byte_timeout_s=s.head_timeout_s)
        limits = Limits(max_head_bytes=MAX_HEAD_BYTES, max_body_bytes=MAX_LOCAL_BODY_BYTES,
                        head_timeout_s=s.head_timeout_s, body_timeout_s=s.body_timeout_s,
                        idle_timeout_s=s.idle_timeout_s, min_body_rate_bps=float(s.min_body_rate),
                        min_body_rate_grace_s=s.min_body_rate_grace_s)
        route = Route(name="webhook", pool=None, limits=limits, access_log=False, local=self._local,
                      max_local_body_bytes=MAX_LOCAL_BODY_BYTES)
        forwarder = Forwarder(route, self.metrics, self.drain)
        handler = ConnectionHandler(tls_cfg, self.store, self.metrics, forwarder.serve, drain=self.drain)
        self.runtime.bound.tls = await accepting.start(net.serve, handler.listener(), handler, handlers)
        log.info("webhook ready", listen=str(self.bound_tls), paths=list(PATHS), image=self.cfg.options.image)

    def on_drain(self) -> None:
        self.drain.start()     # wake idle keep-alive connections: they close now

    async def run(self, *, task_status: trio.TaskStatus[Webhook] = trio.TASK_STATUS_IGNORED) -> None:
        background = [self.drain.watchdog.run]
        if self.keeper is not None:
            background.append(self.keeper.serve)
        await self.runtime.run(self, background=tuple(background), task_status=task_status)

    async def run_with_signals(self) -> None:
        await self.runtime.run_with_signals(self.run)

    # ------------------------------------------------------------------ one request (a local handler)
    async def _local(self, req: LocalRequest) -> LocalResponse:
        status, headers, payload = self.answerer.answer(req.method.encode("ascii"), req.target, req.headers,
                                                        req.body, req.facts.client)
        fields = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in headers]
        return LocalResponse(status, payload, fields)


def _json(data: object) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()
