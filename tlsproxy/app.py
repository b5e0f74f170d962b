"""``tlsproxy serve``: the proxy as a program of the shared runtime (``runtime.py``).

What is the proxy's own: the inbound served TLS identity (its certificate source and how material
becomes a server context: options, mTLS client CA, tcp mode — all decided before the context is
stored), the listeners (TLS, plain HTTP, outbound) and their handlers, and the readiness checks only
it has (client CA, upstream, outbound). The root nursery, admin, signals, reloads and the drain are
the runtime's; its module docstring describes the nursery layout and the drain sequence.
"""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Awaitable
from typing import TYPE_CHECKING

import trio

from . import log as logging_setup
from . import net
from .accept import ConnectionHandler, TLSListenerConfig
from .admin.health import Health, ca_problem
from .certs import devca
from .certs.bundle import Bundle
from .certs.source import CertSource, Material
from .config import Settings
from .errors import CertError, ConfigError
from .http.deadlines import tick_for
from .http.exchange import Drain, Limits, Route
from .http.forward import Forwarder
from .http.pool import Pool
from .inbound import mtls
from .inbound import tcp as tcp_mode
from .inbound import upstream as upstream_mod
from .inbound.plain import PlainHandler, PlainListenerConfig, redirect_handler
from .log import get_logger
from .metrics import Metrics
from .runtime import Bound, Runtime, run_main
from .tls.contexts import ALPN_HTTP, ServerTLSOptions, server_context
from .tls.served import ServedTLS
from .tls.store import Generation

if TYPE_CHECKING:
    from .http.h2pool import H2Pool
    from .http.h2server import H2Server
    from .outbound.server import Outbound
    from .workers import WorkerSet

log = get_logger("")

__all__ = ["App", "Bound", "main_serve", "run_main"]


class App:
    def __init__(self, settings: Settings, *, state_env: dict[str, str] | None = None,
                 worker: WorkerSet | None = None) -> None:
        self.settings = settings
        self.worker = worker
        self.metrics = Metrics()
        self.health = Health()
        self.drain = Drain()
        self.drain.watchdog.tick_s = tick_for(settings.head_timeout_s, settings.body_timeout_s,
                                              settings.idle_timeout_s, settings.upstream_response_timeout_s,
                                              settings.min_body_rate_grace_s)
        self._state_env = state_env
        self.standalone_dir = None
        self.mtls = mtls.MTLSConfig.from_settings(settings)
        self.source = self._cert_source()
        self.served = ServedTLS(self.source, self.build_generation, self.metrics)
        self.store = self.served.store
        self.reloader = self.served.reloader
        self.runtime = Runtime(settings, self.served, self.metrics, self.health)
        self.bound: Bound = self.runtime.bound
        if worker is not None and worker.index == 0:     # --workers N: /metrics counts every worker
            own = self.runtime.metrics_text
            self.runtime.metrics_text = lambda: self._every_worker_metrics(own)
        self._install_checks()
        self.outbound: Outbound | None = None
        if settings.outbound or settings.outbound_routes or settings.outbound_proxy is not None:
            # loaded only when configured: ~0.5 MiB of idle memory a proxy without outbound
            # routes does not pay (docs/performance.md, "Start-up and memory")
            from .outbound.server import Outbound

            try:   # outbound routes and their TLS material are checked before anything binds
                self.outbound = Outbound(settings, self.metrics, self.drain, self.limits())
            except CertError as exc:
                raise ConfigError(f"outbound: {exc}") from None
            if self.outbound.enabled:
                self.health.add_check("outbound", self.outbound.readiness)
        self._pool: Pool | H2Pool | None = None
        self._h2: H2Server | None = None
        if settings.upstream.scheme == "h2c":    # its connections' tasks run in the root nursery
            from .http.h2pool import H2Pool

            timeout_s = settings.upstream_connect_timeout_s
            self._pool = H2Pool(upstream_mod.tcp_opener(settings.upstream, timeout_s),
                                connect_timeout_s=timeout_s, label=str(settings.upstream),
                                metrics=self.metrics)

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
            directory, _created = devca.ensure(state, s.dev_ca_names)
        except OSError as exc:
            raise ConfigError(f"--state-dir: cannot create the development CA in {state}: "
                              f"{exc.strerror or exc}") from None
        self.standalone_dir = directory
        return CertSource(cert_dir=directory, client_ca=s.client_ca)

    def tls_options(self, bundle: Bundle | None = None) -> ServerTLSOptions:
        """Context options; with mTLS on, the client CA comes from ``bundle`` (read with it)."""
        s = self.settings
        client_ca = mtls.client_ca_pem(self.mtls, bundle) if bundle is not None else None
        # ALPN: HTTP mode offers --alpn, default h2,http/1.1; tcp mode offers --alpn (default none).
        alpn = s.alpn if s.protocol == "tcp" else (s.alpn or ALPN_HTTP)
        return ServerTLSOptions(min_version=s.tls_min_version, session_tickets=s.tls_session_tickets,
                                client_ca_pem=client_ca, alpn=alpn)

    def build_generation(self, material: Material | None = None) -> tuple[object, list[Bundle]]:
        """Validate the material (certificate(s), key(s), client CA) and build a *new* context.

        ``material`` is what the reloader read (``self.source.read()`` when None). The one place
        that turns certificate material into a context: startup and every reload call it. Every
        option is decided here, before the context is stored. Raises CertError; changes nothing."""
        bundles = list((material if material is not None else self.source.read()).bundles())
        ctx = server_context(bundles, self.tls_options(bundles[0]))
        if self.settings.protocol == "tcp":
            tcp_mode.adapt_context(ctx, self.settings)   # part of building, before any handshake
        return ctx, bundles

    def load_certificates(self) -> Generation:
        """Startup load through the reloader (so it knows which material is live). Raises CertError."""
        return self.served.load_now()

    async def _every_worker_metrics(self, own) -> bytes:
        assert self.worker is not None
        return await self.worker.metrics(await own())

    # ------------------------------------------------------------------ readiness
    def _install_checks(self) -> None:
        async def ca_check() -> str | None:
            gen = self.store.generation
            return ca_problem(gen and gen.context, dt.datetime.now(dt.UTC))

        if self.mtls.enabled:
            self.health.add_check("client_ca", ca_check)
        if self.settings.upstream.scheme in ("http", "h2c", "tcp"):
            up = self.settings.upstream

            async def upstream_check() -> str | None:
                reason = await upstream_mod.probe(up, min(1.0, self.settings.upstream_connect_timeout_s))
                return f"upstream {up}: {reason}" if reason else None

            self.health.add_check("upstream", upstream_check)

    # ------------------------------------------------------------------ the program
    def limits(self) -> Limits:
        s = self.settings
        return Limits(max_head_bytes=s.max_head_bytes, max_body_bytes=s.max_body_bytes,
                      head_timeout_s=s.head_timeout_s, body_timeout_s=s.body_timeout_s,
                      idle_timeout_s=s.idle_timeout_s,
                      upstream_response_timeout_s=s.upstream_response_timeout_s,
                      min_body_rate_bps=float(s.min_body_rate), min_body_rate_grace_s=s.min_body_rate_grace_s)

    def _plain_enabled(self) -> bool:
        return self.settings.http_listen is not None and self.settings.http_mode != "off"

    @property
    def drain_started_at(self) -> float | None:
        return self.runtime.drain_started_at

    def request_drain(self, reason: str = "signal") -> None:
        """Start the drain (idempotent): readiness turns 503 now; the runtime does the rest."""
        self.runtime.request_drain(reason)

    async def on_sighup(self) -> None:
        await self.runtime.on_sighup()

    async def start_listeners(self, accepting: trio.Nursery, handlers: trio.Nursery) -> None:
        """Bind the TLS listener, the plain-HTTP one and the outbound ones (``runtime.Program``)."""
        s = self.settings
        if self.worker is not None and self.bound.admin is not None:
            self.worker.announce_admin(self.bound.admin)
        if self._pool is None:
            self._pool = Pool(upstream_mod.tcp_opener(s.upstream, s.upstream_connect_timeout_s))
        pool = self._pool
        route = Route(name="inbound", pool=pool, limits=self.limits(), access_log=s.access_log,
                      upstream_label=str(s.upstream))
        tls_cfg = TLSListenerConfig(name="inbound", addr=s.listen, handshake_timeout_s=s.handshake_timeout_s,
                                    max_connections=s.max_connections, reuse_port=s.workers > 1,
                                    first_byte_timeout_s=None if s.protocol == "tcp" else s.head_timeout_s)
        if s.protocol == "tcp":     # the same listener; the handshaken stream goes to a byte relay
            serve = tcp_mode.make_serve(tcp_mode.TCPConfig.from_settings(s), self.metrics)
        else:
            serve = self._http_serve(Forwarder(route, self.metrics, self.drain))
        handler = ConnectionHandler(tls_cfg, self.store, self.metrics, serve,
                                    peer_policy=mtls.make_policy(self.mtls), protocol=s.protocol,
                                    drain=self.drain)
        self.bound.tls = await accepting.start(net.serve, handler.listener(), handler, handlers)
        plain = self._plain_handler(pool)
        if plain is not None:
            self.bound.extra["http"] = await accepting.start(net.serve, plain.listener(), plain, handlers)
        if self.outbound is not None and self.outbound.enabled:
            self.bound.extra.update(await self.outbound.start(accepting, handlers))
        self._announce()

    def _http_serve(self, fwd: Forwarder):
        """HTTP mode's connection server: HTTP/2 when the client chose ALPN h2, else HTTP/1.1.
        A plain function returning the server's coroutine: no frame of its own for the life of
        every connection (docs/performance.md, "Idle memory")."""
        def serve(stream, facts) -> Awaitable[None]:
            if stream.selected_alpn_protocol() == "h2":
                return (self._h2 or self._h2_server(fwd)).serve(stream, facts)
            return fwd.serve(stream, facts)

        return serve

    def _h2_server(self, fwd: Forwarder) -> H2Server:
        """The HTTP/2 server, made when the first client negotiates h2: a proxy no HTTP/2 client
        talks to never loads the h2 library (its idle memory budget, docs/performance.md)."""
        from .http.h2core import H2Limits
        from .http.h2server import H2Server

        s = self.settings
        self._h2 = H2Server(fwd, H2Limits(
            max_concurrent_streams=s.h2_max_concurrent_streams, stream_window_bytes=s.h2_stream_window,
            connection_window_bytes=max(1024 * 1024, s.h2_stream_window),
            max_header_list_bytes=s.max_head_bytes, max_header_block_bytes=s.h2_max_header_block,
            max_resets_per_s=s.h2_max_resets, max_control_frames_per_s=s.h2_max_control_frames), self.metrics)
        return self._h2

    def on_drain(self) -> None:
        self.drain.start()
        if self._pool is not None:
            self._pool.close_idle()
        if self.outbound is not None:
            self.outbound.close_idle()

    async def run(self, *, task_status: trio.TaskStatus[App] = trio.TASK_STATUS_IGNORED) -> None:
        self._log_summary()
        background = [self.drain.watchdog.run]
        if self._pool is not None and self._pool.http2:     # an h2c:// pool runs its connections
            background.append(self._pool.run)
        await self.runtime.run(self, background=tuple(background), task_status=task_status)

    async def run_with_signals(self) -> None:
        await self.runtime.run_with_signals(self.run)

    def _plain_handler(self, pool: Pool | H2Pool) -> PlainHandler | None:
        """The ``--http-listen`` listener's handler, or None when it is not configured (or
        ``--http-mode off``)."""
        s = self.settings
        if not self._plain_enabled():
            return None
        assert s.http_listen is not None
        cfg = PlainListenerConfig(addr=s.http_listen, mode=s.http_mode, redirect_port=s.redirect_port,
                                  max_connections=s.max_connections)
        if s.http_mode == "forward":
            route = Route(name="http", pool=pool, limits=self.limits(), access_log=s.access_log,
                          upstream_label=str(s.upstream))
        else:
            route = Route(name="http", pool=None, limits=self.limits(), access_log=s.access_log,
                          local=redirect_handler(s.redirect_port))
        forwarder = Forwarder(route, self.metrics, self.drain)
        return PlainHandler(cfg, self.metrics, forwarder)

    def _log_summary(self) -> None:
        s = self.settings
        log.info("starting", listen=str(s.listen), upstream=str(s.upstream), admin=str(s.admin),
                 protocol=s.protocol, alpn=",".join(self.tls_options().alpn),
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
        # the person-facing lines were printed first by the CLI (firstrun.py); this is the record
        log.info("standalone mode", ca=str(ca), url=f"https://localhost:{port}/",
                 **{"try": f"curl --cacert {ca} https://localhost:{port}/"}, trust="tlsproxy trust")


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

        return run_workers(settings, lambda ws, worker: run_main(App(ws, worker=worker).run_with_signals))
    return run_main(app.run_with_signals)
