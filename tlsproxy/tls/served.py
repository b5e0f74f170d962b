"""One served TLS identity: certificate source → validated bundles → context → store → reloader.

Theory of operation
-------------------
Inbound, the webhook and every outbound client-certificate source are each one :class:`ServedTLS`.
They differ only in ``build``, the function that turns the material a
:class:`~tlsproxy.certs.source.CertSource` read into a *new* ``SSLContext``: every TLS option
(versions, tickets, ALPN, client CA, tcp mode's EOF handling and SNI callback) is decided there,
before the context reaches the store. Nothing changes a stored context; a change is a new context.

A source is either files (:class:`~tlsproxy.certs.source.CertSource`: watched here, directory
watch plus periodic re-check) or a *followed* source with a service of its own
(``--provision-secret``: ``source.serve(reload)`` follows a Secret through the Kubernetes API and
calls ``reload`` on every change; its ``material`` is None until the first read).

The rest is shared: the store (the one reference listeners and dialers read per connection), the
reloader (``reload.py``: on failure the old state is kept), the reload service (directory watch
plus periodic re-check), and what every swap publishes — the expiry gauge of each certificate
(``tlsproxy_certificate_not_after_seconds{role,...}``, a rotated-out one's series removed) and the
time of the last successful load.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Sequence
from pathlib import Path

import trio

from ..certs.bundle import Bundle
from ..certs.source import CertSource, Material
from ..errors import CertError
from ..metrics import Metrics
from .reload import Reloader, serve_reloads
from .store import ContextStore, Generation

Build = Callable[[Material], tuple[ssl.SSLContext, Sequence[Bundle]]]


class ServedTLS:
    def __init__(self, source: CertSource, build: Build, metrics: Metrics | None = None, *,
                 role: str = "server", describe: str | None = None) -> None:
        self.source = source
        self.role = role
        self.metrics = metrics
        self.store = ContextStore()
        self.reloader = Reloader(self.store, source.read, build, metrics, role=role,
                                 describe=describe or source.describe())
        self.store.subscribe(self._publish)

    # ------------------------------------------------------------------ reading the current state
    @property
    def ready(self) -> bool:
        return self.store.ready

    @property
    def generation(self) -> Generation | None:
        return self.store.generation

    def current(self) -> ssl.SSLContext:
        """The context for a new handshake (LookupError before the first load)."""
        return self.store.current

    @property
    def watch_paths(self) -> tuple[Path, ...]:
        return self.source.watch_paths

    def subscribe(self, callback: Callable[[Generation | None, Generation], None]) -> None:
        """``callback(old, new)`` after every swap (logging, flushing pooled connections...)."""
        self.store.subscribe(callback)

    # ------------------------------------------------------------------ loading
    def load_now(self) -> Generation:
        """Startup load, synchronously: raises CertError (and changes nothing) on bad material.
        A followed source with nothing read yet raises at once, logging nothing: its material
        comes later, from its own service (``--wait-for-cert`` bounds the wait)."""
        if not isinstance(self.source, CertSource) and self.source.material is None:
            raise CertError(self.source.describe(), "not read yet")
        return self.reloader.load_now()

    async def serve_reloads(self, interval_s: float, *,
                            task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The reload service for this identity: runs until cancelled."""
        if not isinstance(self.source, CertSource):        # a followed source runs its own
            await self.source.serve(self.reloader.reload, task_status=task_status)
            return
        await serve_reloads(self.reloader, self.watch_paths, interval_s=interval_s, task_status=task_status)

    def _publish(self, old: Generation | None, new: Generation) -> None:
        m = self.metrics
        if m is None:
            return
        for b in new.bundles:
            info = b.info
            m.cert_not_after.labels(self.role, info.subject, info.serial).set(info.not_after.timestamp())
        if old is not None:
            live = {b.info.serial for b in new.bundles}
            for b in old.bundles:
                if b.info.serial not in live:
                    try:
                        m.cert_not_after.remove(self.role, b.info.subject, b.info.serial)
                    except KeyError:
                        pass
        m.last_reload.labels(self.role).set(new.loaded_at)
