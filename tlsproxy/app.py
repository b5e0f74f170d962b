"""Wiring: settings in, one root nursery of services out; signals; drain.

Nursery layout (outer to inner)::

    root        admin listener, signal handling, certificate watchers   (cancelled last)
      handlers  one task per client connection                         (deadline on drain)
        accept  the TLS (and plain) listeners' accept loops            (cancelled first on drain)

Drain: readiness turns 503 → ``drain_delay_s`` of normal service (endpoints update) → the accept
nursery is cancelled (listeners close) → idle keep-alive connections are woken and closed →
in-flight requests get until ``drain_timeout_s`` after the signal → the handlers nursery is
cancelled → exit 0.
"""

from __future__ import annotations

import datetime as dt
import signal
import sys
import time
from dataclasses import dataclass, field

import trio

from . import log as logging_setup
from .admin import endpoints as admin_endpoints
from .admin.health import Health, ca_problem, certificate_problem, expiring
from .admin.server import AdminRequest, AdminRoutes, Reply, serve_admin
from .certs import devca
from .certs.bundle import Bundle
from .certs.source import CertSource, Material
from .config import HostPort, Settings
from .errors import CertError, ConfigError
from .http.deadlines import tick_for
from .http.forward import Drain, Forwarder, Limits, Route
from .http.pool import Pool
from .inbound import mtls
from .inbound import tcp as tcp_mode
from .inbound import upstream as upstream_mod
from .inbound.plain import PlainHandler, PlainListenerConfig, serve_plain
from .inbound.server import ConnectionHandler, TLSListenerConfig, forwarder_serve, serve_tls
from .log import get_logger
from .metrics import Metrics
from .outbound.server import Outbound
from .tls.contexts import ALPN_HTTP1, ServerTLSOptions, server_context
from .tls.reload import Reloader, serve_reloads
from .tls.store import ContextStore, Generation

log = get_logger("")

EXPIRY_CHECK_INTERVAL_S = 3600.0   # a certificate that was fine at load may enter --expiry-warning later


@dataclass
class Bound:
    """Where each listener ended up (port 0 picks a free port; tests read this)."""

    tls: HostPort | None = None
    admin: HostPort | None = None
    extra: dict[str, HostPort] = field(default_factory=dict)


class App:
    def __init__(self, settings: Settings, *, state_env: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.health = Health()
        self.drain = Drain()
        self.drain.watchdog.tick_s = tick_for(settings.head_timeout_s, settings.body_timeout_s,
                                              settings.idle_timeout_s, settings.upstream_response_timeout_s)
        self.store = ContextStore()
        self.admin_routes = AdminRoutes()
        self.bound = Bound()
        self.started_at = time.time()
        self.drain_started_at: float | None = None
        self._drain_requested = trio.Event()
        self._expiry_warned: set[str] = set()
        self._state_env = state_env
        self.standalone_dir = None
        self.mtls = mtls.MTLSConfig.from_settings(settings)
        self.source = self._cert_source()
        self.store.subscribe(self._on_swap)
        self._cert_ready = trio.Event()
        self.reloader = Reloader(self.store, self.source.read, self.build_generation, self.metrics,
                                 describe=self.source.describe())
        self._install_admin_routes()
        try:   # outbound routes and their TLS material are checked before anything binds
            self.outbound = Outbound(settings, self.metrics, self.drain, self.limits())
        except CertError as exc:
            raise ConfigError(f"outbound: {exc}") from None
        if self.outbound.enabled:
            self.health.add_check("outbound", self.outbound.readiness)

    # ------------------------------------------------------------------ certificates
    def _cert_source(self) -> CertSource:
        s = self.settings
        if s.provision_secret is not None:     # material from a Secret this process fills (k8s/secrets.py)
            from .k8s.secrets import ProvisionedSecret

            return ProvisionedSecret.from_settings(s, self.metrics)  # type: ignore[return-value]
        if s.cert_dir is not None:
            return CertSource(cert_dir=s.cert_dir, client_ca=s.client_ca, cert2=s.cert2, key2=s.key2)
        if s.cert is not None:
            return CertSource(cert=s.cert, key=s.key, client_ca=s.client_ca, cert2=s.cert2, key2=s.key2)
        state = s.state_dir or devca.default_state_dir(self._state_env)
        try:
            directory, _created = devca.ensure(state)
        except OSError as exc:
            raise ConfigError(f"--state-dir: cannot create the development CA in {state}: "
                              f"{exc.strerror or exc}") from None
        self.standalone_dir = directory
        return CertSource(cert_dir=directory, client_ca=s.client_ca)

    def tls_options(self, bundle: Bundle | None = None) -> ServerTLSOptions:
        """Context options; with mTLS on, the client CA comes from ``bundle`` (read with it)."""
        s = self.settings
        client_ca = mtls.client_ca_pem(self.mtls, bundle) if bundle is not None else None
        # ALPN: HTTP mode always offers http/1.1 (never h2); tcp mode offers --alpn (default none).
        alpn = s.alpn if s.protocol == "tcp" else ALPN_HTTP1
        return ServerTLSOptions(min_version=s.tls_min_version, session_tickets=s.tls_session_tickets,
                                client_ca_pem=client_ca, alpn=alpn)

    def build_generation(self, material: Material | None = None) -> tuple[object, list[Bundle]]:
        """Validate the material (certificate(s), key(s), client CA) and build a *new* context.

        ``material`` is what the reloader read (``self.source.read()`` when None). The one place
        that turns certificate material into a context: startup and every reload call it. Raises
        CertError; changes nothing."""
        bundles = list((material if material is not None else self.source.read()).bundles())
        ctx = server_context(bundles, self.tls_options(bundles[0]))
        if self.settings.protocol == "tcp":
            tcp_mode.adapt_context(ctx, self.settings)   # part of building, before any handshake
        return ctx, bundles

    def load_certificates(self) -> Generation:
        """Startup load through the reloader (so it knows which material is live). Raises CertError."""
        if hasattr(self.source, "serve") and self.source.material is None:   # --provision-secret:
            raise CertError(self.source.describe(), "not read yet")         # comes later; no error logged
        return self.reloader.load_now()

    def _on_swap(self, old: Generation | None, new: Generation) -> None:
        for b in new.bundles:
            info = b.info
            self.metrics.cert_not_after.labels("server", info.subject, info.serial).set(
                info.not_after.timestamp())
            for warning in b.warnings:
                log.warning("certificate warning", file=b.cert_path, warning=warning)
        if old is not None:
            for b in old.bundles:
                if b.info.serial not in {n.info.serial for n in new.bundles}:
                    try:
                        self.metrics.cert_not_after.remove("server", b.info.subject, b.info.serial)
                    except KeyError:
                        pass
        self.metrics.last_reload.labels("server").set(new.loaded_at)
        first = new.bundles[0].info
        fields = {"source": self.source.describe(), "serial": first.serial, "subject": first.subject,
                  "not_after": first.not_after.isoformat(), "generation": new.number}
        if old is not None:
            fields["old_serial"] = old.bundles[0].info.serial
            fields["old_not_after"] = old.bundles[0].info.not_after.isoformat()
        log.info("certificate loaded" if old is None else "certificate reloaded", **fields)
        self._cert_ready.set()
        self._warn_expiring(new)

    def _warn_expiring(self, gen: Generation | None) -> None:
        if gen is None:
            return
        now = dt.datetime.now(dt.UTC)
        for info in expiring([b.info for b in gen.bundles], now, self.settings.expiry_warning_s):
            if info.serial in self._expiry_warned:
                continue
            self._expiry_warned.add(info.serial)
            log.warning("certificate expires soon", serial=info.serial, subject=info.subject,
                        not_after=info.not_after.isoformat(),
                        expires_in_h=round((info.not_after - now).total_seconds() / 3600, 1),
                        expiry_warning_s=self.settings.expiry_warning_s)

    async def _expiry_watch(self) -> None:
        while True:
            await trio.sleep(EXPIRY_CHECK_INTERVAL_S)
            self._warn_expiring(self.store.generation)

    # ------------------------------------------------------------------ admin
    def _install_admin_routes(self) -> None:
        # The classic text format (0.0.4): every Prometheus version parses it, and our names are
        # all legacy-valid, so nothing is lost against prometheus-client's newer 1.0.0 default.
        from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

        async def healthz(_req: AdminRequest) -> Reply:
            return Reply.text(200, "ok")

        async def metrics(_req: AdminRequest) -> Reply:
            return Reply(200, generate_latest(self.metrics.registry), CONTENT_TYPE_PLAIN_0_0_4)

        self.admin_routes.add("/healthz", healthz)
        self.admin_routes.add("/readyz", admin_endpoints.readyz_handler(self.health))
        self.admin_routes.add("/metrics", metrics)
        self.admin_routes.add("/certs", admin_endpoints.certs_handler(self.store))
        self.admin_routes.add("/shutdown", admin_endpoints.shutdown_handler(self.request_drain),
                              methods=("POST",))

        async def cert_check() -> str | None:
            gen = self.store.generation
            if gen is None:
                why = self.store.last_error
                return f"waiting for certificate ({why})" if why else "waiting for certificate"
            return certificate_problem(gen and [b.info for b in gen.bundles], dt.datetime.now(dt.UTC))

        async def ca_check() -> str | None:
            gen = self.store.generation
            return ca_problem(gen and gen.context, dt.datetime.now(dt.UTC))

        async def listener_check() -> str | None:
            missing = [] if self.bound.tls is not None else ["tls"]
            if self._plain_enabled() and "http" not in self.bound.extra:
                missing.append("http")
            return f"listeners not bound yet: {', '.join(missing)}" if missing else None

        self.health.add_check("certificate", cert_check)
        if self.mtls.enabled:
            self.health.add_check("client_ca", ca_check)
        self.health.add_check("listeners", listener_check)
        if self.settings.upstream.scheme in ("http", "tcp"):
            up = self.settings.upstream

            async def upstream_check() -> str | None:
                reason = await upstream_mod.probe(up, min(1.0, self.settings.upstream_connect_timeout_s))
                return f"upstream {up}: {reason}" if reason else None

            self.health.add_check("upstream", upstream_check)

    # ------------------------------------------------------------------ running
    def limits(self) -> Limits:
        s = self.settings
        return Limits(max_head_bytes=s.max_head_bytes, max_body_bytes=s.max_body_bytes,
                      head_timeout_s=s.head_timeout_s, body_timeout_s=s.body_timeout_s,
                      idle_timeout_s=s.idle_timeout_s,
                      upstream_response_timeout_s=s.upstream_response_timeout_s)

    def _plain_enabled(self) -> bool:
        return self.settings.http_listen is not None and self.settings.http_mode != "off"

    def request_drain(self, reason: str = "signal") -> None:
        """Start the drain (idempotent): readiness turns 503 now; ``run`` does the rest."""
        if self.drain_started_at is None:
            self.drain_started_at = trio.current_time()
            self.health.draining = True
            log.info("drain started", reason=reason, drain_delay_s=self.settings.drain_delay_s,
                     drain_timeout_s=self.settings.drain_timeout_s)
        self._drain_requested.set()

    async def run(self, *, task_status: trio.TaskStatus[App] = trio.TASK_STATUS_IGNORED) -> None:
        s = self.settings
        if not self.store.ready and self.store.last_error is None:    # main_serve may have tried
            try:
                self.load_certificates()
            except CertError:
                if not s.wait_for_cert_s:
                    raise
        pool = Pool(upstream_mod.tcp_opener(s.upstream, s.upstream_connect_timeout_s))
        route = Route(name="inbound", pool=pool, limits=self.limits(), access_log=s.access_log,
                      upstream_label=str(s.upstream))
        forwarder = Forwarder(route, self.metrics, self.drain)
        tls_cfg = TLSListenerConfig(name="inbound", addr=s.listen, handshake_timeout_s=s.handshake_timeout_s,
                                    max_connections=s.max_connections, reuse_port=s.workers > 1)
        if s.protocol == "tcp":     # the same listener; the handshaken stream goes to a byte relay
            serve = tcp_mode.make_serve(tcp_mode.TCPConfig.from_settings(s), self.metrics)
        else:
            serve = forwarder_serve(forwarder)
        handler = ConnectionHandler(tls_cfg, self.store, self.metrics, serve,
                                    peer_policy=mtls.make_policy(self.mtls), protocol=s.protocol)
        plain = self._plain_listener(pool)
        self._log_summary()
        async with trio.open_nursery() as root:
            self.bound.admin = await root.start(serve_admin, s.admin, self.admin_routes)
            root.start_soon(self._expiry_watch)
            root.start_soon(self.drain.watchdog.run)
            if hasattr(self.source, "serve"):     # a source with its own service (--provision-secret)
                await root.start(self.source.serve, self.reloader.reload)
            else:
                await root.start(lambda task_status: serve_reloads(
                    self.reloader, self.source.watch_paths, interval_s=s.reload_check_interval_s,
                    task_status=task_status))
            if not self.store.ready and not await self._wait_for_certificate():
                root.cancel_scope.cancel()      # drain requested while still waiting: nothing to drain
                return
            async with trio.open_nursery() as handlers:
                async with trio.open_nursery() as accepting:
                    self.bound.tls = await accepting.start(serve_tls, tls_cfg, handler, handlers)
                    if plain is not None:
                        self.bound.extra["http"] = await accepting.start(serve_plain, plain[0], plain[1],
                                                                         handlers)
                    if self.outbound.enabled:
                        self.bound.extra.update(await self.outbound.start(accepting, handlers))
                    self._announce()
                    task_status.started(self)
                    await self._drain_requested.wait()
                    await self._drain_delay()
                    accepting.cancel_scope.cancel()
                log.info("listeners closed", in_flight=len(handlers.child_tasks))
                self.drain.start()
                pool.close_idle()
                self.outbound.close_idle()
                assert self.drain_started_at is not None
                handlers.cancel_scope.deadline = self.drain_started_at + s.drain_timeout_s
            cut = handlers.cancel_scope.cancelled_caught
            log.info("drain finished", cut_connections=cut,
                     seconds=round(trio.current_time() - self.drain_started_at, 3))
            root.cancel_scope.cancel()

    async def _wait_for_certificate(self) -> bool:
        """``--wait-for-cert``: wait (not ready, admin up) until the reloader has swapped in a first
        certificate. False when a drain was requested first; CertError after the deadline."""
        wait_s = self.settings.wait_for_cert_s or 0.0
        log.warning("waiting for certificate", source=self.source.describe(), wait_for_cert_s=wait_s,
                    reason=self.store.last_error)
        with trio.move_on_after(wait_s):
            async with trio.open_nursery() as nursery:
                async def until(event: trio.Event) -> None:
                    await event.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(until, self._cert_ready)
                nursery.start_soon(until, self._drain_requested)
        if self.store.ready:
            return True
        if self._drain_requested.is_set():
            return False
        raise CertError(self.source.describe(), f"no usable certificate after waiting {wait_s:g}s "
                        f"(--wait-for-cert): {self.store.last_error or 'none found'}")

    def _plain_listener(self, pool: Pool) -> tuple[PlainListenerConfig, PlainHandler] | None:
        """The ``--http-listen`` listener, or None when it is not configured (or ``--http-mode off``)."""
        s = self.settings
        if not self._plain_enabled():
            return None
        assert s.http_listen is not None
        cfg = PlainListenerConfig(addr=s.http_listen, mode=s.http_mode, redirect_port=s.redirect_port,
                                  head_timeout_s=s.head_timeout_s, max_head_bytes=s.max_head_bytes,
                                  max_connections=s.max_connections, access_log=s.access_log)
        forwarder = None
        if s.http_mode == "forward":
            route = Route(name="http", pool=pool, limits=self.limits(), access_log=s.access_log,
                          upstream_label=str(s.upstream))
            forwarder = Forwarder(route, self.metrics, self.drain)
        return cfg, PlainHandler(cfg, self.metrics, forwarder)

    async def _drain_delay(self) -> None:
        """Keep serving (and accepting) for ``--drain-delay`` after the drain started, so endpoint
        controllers and load balancers stop sending traffic; never past ``--drain-timeout``."""
        delay = self.settings.drain_delay_s
        if delay > 0:
            assert self.drain_started_at is not None
            await trio.sleep_until(min(self.drain_started_at + delay,
                                       self.drain_started_at + self.settings.drain_timeout_s))

    def _log_summary(self) -> None:
        s = self.settings
        log.info("starting", listen=str(s.listen), upstream=str(s.upstream), admin=str(s.admin),
                 protocol=s.protocol, alpn=",".join(s.alpn) if s.protocol == "tcp" else "http/1.1",
                 certificates=self.source.describe(), tls_min_version=s.tls_min_version,
                 access_log=s.access_log, max_connections=s.max_connections,
                 http_listen=str(s.http_listen) if s.http_listen else "off",
                 http_mode=s.http_mode if s.http_listen else "off",
                 redirect_port=s.redirect_port, client_ca=str(s.client_ca) if s.client_ca else "none",
                 drain_delay_s=s.drain_delay_s, drain_timeout_s=s.drain_timeout_s,
                 expiry_warning_s=s.expiry_warning_s)

    def _announce(self) -> None:
        if self.standalone_dir is None:
            return
        ca = self.standalone_dir / "ca.crt"
        bound = self.bound.tls
        port = bound.port if bound else self.settings.listen.port
        print(f"tlsproxy: standalone mode: development CA at {ca}\n"
              f"tlsproxy: try: curl --cacert {ca} https://localhost:{port}/", flush=True)

    async def run_with_signals(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._signals, nursery.cancel_scope)
            await self.run()
            nursery.cancel_scope.cancel()

    async def _signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    await self.on_sighup()
                elif self.drain_started_at is None:
                    log.info("signal received", signal=signal.Signals(signum).name)
                    self.request_drain()
                else:
                    log.warning("second signal: stopping now", signal=signal.Signals(signum).name)
                    scope.cancel()
                    raise SystemExit(1)

    async def on_sighup(self) -> None:
        """SIGHUP: force a certificate reload (rebuilt even when the files look unchanged)."""
        log.info("signal received", signal="SIGHUP")
        await self.reloader.reload("sighup", force=True)


def main_serve(settings: Settings) -> int:
    logging_setup.setup(settings.log_format, settings.log_level)
    try:
        app = App(settings)
        app.load_certificates()
    except CertError as exc:
        if not settings.wait_for_cert_s:
            sys.stderr.write(f"tlsproxy: error: {exc}\n")
            return 2
    if settings.workers > 1:
        # Validated above in this process; each worker builds its own App (see workers.py).
        from .workers import run_workers

        return run_workers(settings, lambda ws, _index: run_main(App(ws).run_with_signals))
    return run_main(app.run_with_signals)


def run_main(fn) -> int:
    """``trio.run`` with startup failures (a port in use…) turned into one line and exit 2."""
    try:
        trio.run(fn)
    except BaseException as exc:  # noqa: BLE001 - unwrapped and re-raised below when not ours
        first = _first_leaf(exc)
        if isinstance(first, OSError | ConfigError | CertError):
            text = first.strerror if isinstance(first, OSError) and first.strerror else str(first)
            sys.stderr.write(f"tlsproxy: error: {text}\n")
            return 2
        if isinstance(first, KeyboardInterrupt):
            return 130
        if isinstance(first, SystemExit):
            return int(first.code or 0)
        raise
    return 0


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc
