"""The runtime ``tlsproxy serve`` and ``tlsproxy webhook`` both run on: one root nursery, the admin
listener, certificate reloads, signals and the drain.

Theory of operation
-------------------
A program (the proxy's :class:`~tlsproxy.app.App`, the :class:`~tlsproxy.webhook.server.Webhook`)
is a served TLS identity (:class:`~tlsproxy.tls.served.ServedTLS`) plus the listeners that use it.
The runtime owns everything around them, once::

    root        admin listener, signals, certificate reloads, expiry warnings     (cancelled last)
      handlers  one task per client connection                                   (deadline on drain)
        accept  every listener's accept loop (``net.serve``)                      (cancelled first)

Startup: the admin listener binds (``/healthz`` answers, ``/readyz`` says why not ready yet) → the
reload service starts → with ``--wait-for-cert``, the runtime waits for a first certificate → the
program binds every listener (:meth:`Program.start_listeners`) → only then does the ``listeners``
readiness check pass (a latch), and ``task_status.started`` is called.

Drain: readiness turns 503 at once → ``drain_delay_s`` of normal service (endpoint controllers stop
sending traffic) → the accept nursery is cancelled (listeners close) → :meth:`Program.on_drain`
(wake idle keep-alive connections, close idle pools) → in-flight requests get until
``drain_timeout_s`` after the drain started → the handlers nursery is cancelled → return (exit 0).

Signals (:meth:`Runtime.run_with_signals`): SIGTERM or SIGINT starts the drain, a second one stops
at once (exit 1); SIGHUP forces a certificate reload (rebuilt even when the files look unchanged).
"""

from __future__ import annotations

import datetime as dt
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from . import net
from .admin import endpoints as admin_endpoints
from .admin.health import Health, certificate_problem, expiring
from .admin.server import AdminHandler, AdminRequest, AdminRoutes, Reply, admin_listener
from .config import HostPort, Settings
from .errors import CertError, ConfigError
from .log import get_logger
from .metrics import Metrics
from .tls.served import ServedTLS
from .tls.store import Generation

log = get_logger("")

EXPIRY_CHECK_INTERVAL_S = 3600.0   # a certificate that was fine at load may enter --expiry-warning later


@dataclass
class Bound:
    """Where each listener ended up (port 0 picks a free port; tests read this)."""

    tls: HostPort | None = None
    admin: HostPort | None = None
    extra: dict[str, HostPort] = field(default_factory=dict)


class Program(Protocol):
    """What a runtime runs."""

    async def start_listeners(self, accepting: trio.Nursery, handlers: trio.Nursery) -> None:
        """Bind every listener (``accepting.start(net.serve, ...)``) and record it in ``bound``;
        return once all are bound."""

    def on_drain(self) -> None:
        """The listeners are closed: wake idle connections so they close (synchronous)."""


MetricsText = Callable[[], Awaitable[bytes]]


class Runtime:
    def __init__(self, settings: Settings, served: ServedTLS, metrics: Metrics, health: Health, *,
                 name: str = "tlsproxy") -> None:
        self.settings = settings
        self.served = served
        self.metrics = metrics
        self.health = health
        self.name = name
        self.admin_routes = AdminRoutes()
        self.bound = Bound()
        self.started_at = time.time()
        self.drain_started_at: float | None = None
        self.listening = False                  # the latch: every listener of the program is bound
        self._drain_requested = trio.Event()
        self._cert_ready = trio.Event()
        self._expiry_warned: set[str] = set()
        self.metrics_text: MetricsText = self._own_metrics
        served.subscribe(self._on_swap)
        self._install_admin_routes()

    # ------------------------------------------------------------------ certificates
    def _on_swap(self, old: Generation | None, new: Generation) -> None:
        for b in new.bundles:
            for warning in b.warnings:
                log.warning("certificate warning", file=b.cert_path, warning=warning)
        first = new.bundles[0].info
        fields = {"source": self.served.reloader.describe, "serial": first.serial, "subject": first.subject,
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
            self._warn_expiring(self.served.generation)

    async def _wait_for_certificate(self) -> bool:
        """``--wait-for-cert``: wait (not ready, admin up) until the reloader has swapped in a first
        certificate. False when a drain was requested first; CertError after the deadline."""
        wait_s = self.settings.wait_for_cert_s or 0.0
        store = self.served.store
        log.warning("waiting for certificate", source=self.served.reloader.describe, wait_for_cert_s=wait_s,
                    reason=store.last_error)
        with trio.move_on_after(wait_s):
            async with trio.open_nursery() as nursery:
                async def until(event: trio.Event) -> None:
                    await event.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(until, self._cert_ready)
                nursery.start_soon(until, self._drain_requested)
        if store.ready:
            return True
        if self._drain_requested.is_set():
            return False
        raise CertError(self.served.reloader.describe, f"no usable certificate after waiting {wait_s:g}s "
                        f"(--wait-for-cert): {store.last_error or 'none found'}")

    # ------------------------------------------------------------------ admin
    async def _own_metrics(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.metrics.registry)

    def _install_admin_routes(self) -> None:
        # The classic text format (0.0.4): every Prometheus version parses it, and our names are
        # all legacy-valid, so nothing is lost against prometheus-client's newer 1.0.0 default.
        from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4

        async def healthz(_req: AdminRequest) -> Reply:
            return Reply.text(200, "ok")

        async def metrics(_req: AdminRequest) -> Reply:
            return Reply(200, await self.metrics_text(), CONTENT_TYPE_PLAIN_0_0_4)

        self.admin_routes.add("/healthz", healthz)
        self.admin_routes.add("/readyz", admin_endpoints.readyz_handler(self.health))
        self.admin_routes.add("/metrics", metrics)
        self.admin_routes.add("/certs", admin_endpoints.certs_handler(self.served.store))
        self.admin_routes.add("/shutdown", admin_endpoints.shutdown_handler(self.request_drain),
                              methods=("POST",))

        async def cert_check() -> str | None:
            gen = self.served.generation
            if gen is None:
                why = self.served.store.last_error
                return f"waiting for certificate ({why})" if why else "waiting for certificate"
            return certificate_problem([b.info for b in gen.bundles], dt.datetime.now(dt.UTC))

        async def listener_check() -> str | None:
            return None if self.listening else "listeners not bound yet"

        self.health.add_check("certificate", cert_check)
        self.health.add_check("listeners", listener_check)

    # ------------------------------------------------------------------ running
    def request_drain(self, reason: str = "signal") -> None:
        """Start the drain (idempotent): readiness turns 503 now; :meth:`run` does the rest."""
        if self.drain_started_at is None:
            self.drain_started_at = trio.current_time()
            self.health.draining = True
            log.info("drain started", reason=reason, drain_delay_s=self.settings.drain_delay_s,
                     drain_timeout_s=self.settings.drain_timeout_s)
        self._drain_requested.set()

    async def run(self, program: Program, *, background: tuple[Callable[[], Awaitable[None]], ...] = (),
                  task_status: trio.TaskStatus[Program] = trio.TASK_STATUS_IGNORED) -> None:
        """Run ``program`` until a drain finishes (see the module docstring); ``started`` hands back
        ``program`` once every listener is bound. ``background`` tasks run in the root nursery."""
        s = self.settings
        if not self.served.ready and self.served.store.last_error is None:   # the caller may have tried
            try:
                self.served.load_now()
            except CertError:
                if not s.wait_for_cert_s:
                    raise
        async with trio.open_nursery() as root:
            admin = AdminHandler(self.admin_routes)
            root.start_soon(admin.watchdog)
            self.bound.admin = await root.start(net.serve, admin_listener(s.admin), admin, root)
            root.start_soon(self._expiry_watch)
            for task in background:
                root.start_soon(task)
            await root.start(lambda task_status: self.served.serve_reloads(
                s.reload_check_interval_s, task_status=task_status))
            if not self.served.ready and not await self._wait_for_certificate():
                root.cancel_scope.cancel()      # drain requested while still waiting: nothing to drain
                return
            async with trio.open_nursery() as handlers:
                async with trio.open_nursery() as accepting:
                    await program.start_listeners(accepting, handlers)
                    self.listening = True
                    task_status.started(program)
                    await self._drain_requested.wait()
                    await self._drain_delay()
                    accepting.cancel_scope.cancel()
                log.info("listeners closed", in_flight=len(handlers.child_tasks))
                program.on_drain()
                assert self.drain_started_at is not None
                handlers.cancel_scope.deadline = self.drain_started_at + s.drain_timeout_s
            cut = handlers.cancel_scope.cancelled_caught
            log.info("drain finished", cut_connections=cut,
                     seconds=round(trio.current_time() - self.drain_started_at, 3))
            root.cancel_scope.cancel()

    async def _drain_delay(self) -> None:
        """Keep serving (and accepting) for ``--drain-delay`` after the drain started, so endpoint
        controllers and load balancers stop sending traffic; never past ``--drain-timeout``."""
        delay = self.settings.drain_delay_s
        if delay > 0:
            assert self.drain_started_at is not None
            await trio.sleep_until(min(self.drain_started_at + delay,
                                       self.drain_started_at + self.settings.drain_timeout_s))

    async def run_with_signals(self, run: Callable[[], Awaitable[None]]) -> None:
        """``run()`` (the program's :meth:`run`) with SIGTERM/SIGINT/SIGHUP handled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._signals, nursery.cancel_scope)
            await run()
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
        await self.served.reloader.reload("sighup", force=True)


def run_main(fn: Callable[[], Awaitable[None]]) -> int:
    """``trio.run(fn)`` with startup failures (a port in use…) turned into one line and exit 2."""
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
