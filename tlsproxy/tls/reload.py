"""Build, validate, swap: turn "the certificate files may have changed" into a new context, or not.

Theory of operation
-------------------
The contract fits in one sentence: *on failure the old state is kept*.

A reload attempt (a watch event, the periodic re-check, SIGHUP, or the wait for a first certificate)
runs these steps, one attempt at a time:

1. **Read** every file once, consistently (``CertSource.read``: a Secret's ``..data`` is resolved
   once, so the certificate and key come from the same published version).
2. **Compare** the hash of the bytes with the material the current context was built from. Equal
   means nothing changed: stop (SIGHUP skips this step and always rebuilds). Bytes that were
   already refused are not re-validated either; they wait for the next change.
3. **Validate and build** a *new* ``SSLContext`` from the material (parse, key matches certificate,
   not expired, key types; ``load_cert_chain`` into a fresh context). Steps 1-3 run in a worker
   thread, off the event loop, so handshakes in progress are not held up.
4. **Swap** the store's one reference (in the trio thread). New handshakes use the new context;
   connections already open keep theirs. Any failure in 1-3 leaves the store untouched: it is
   recorded (``store.record_failure``), counted (``reloads{result="failure"}``) and logged once
   with the file and the reason.

Half-written material (a ``cp`` that has written the certificate but not yet the key) fails step 3
with "private key does not match"; the second ``cp`` is another change and the next attempt succeeds.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import trio

from ..certs import watch
from ..certs.bundle import Bundle
from ..errors import CertError
from ..log import get_logger
from ..metrics import Metrics
from .store import ContextStore, Generation

log = get_logger("tls.reload")


class Snapshot(Protocol):
    """What ``read`` returns: anything with a content digest (``certs.source.Material``)."""

    @property
    def digest(self) -> str: ...


Read = Callable[[], Snapshot]
Build = Callable[[Snapshot], tuple[ssl.SSLContext, Sequence[Bundle]]]


@dataclass(frozen=True)
class Outcome:
    """What one attempt did: ``swapped``, ``unchanged``, ``failed`` or ``refused_again`` (same
    bad material or same error as last time: not logged or counted again)."""

    result: str
    generation: Generation | None = None
    error: CertError | None = None


@dataclass(frozen=True)
class _Prepared:
    digest: str
    context: ssl.SSLContext
    bundles: tuple[Bundle, ...]


@dataclass(frozen=True)
class _Refused:
    error: CertError
    digest: str | None        # None: nothing could be read (so nothing to compare next time)


class Reloader:
    """Owns the "which material is live" state for one :class:`ContextStore`."""

    def __init__(self, store: ContextStore, read: Read, build: Build, metrics: Metrics | None = None,
                 *, role: str = "server", describe: str = "") -> None:
        self.store = store
        self._read = read
        self._build = build
        self.metrics = metrics
        self.role = role
        self.describe = describe
        self.live_digest: str | None = None       # the material the current context was built from
        self._refused_digest: str | None = None   # the last material refused (not retried until it changes)
        self._last_error: str | None = None
        self._lock = trio.Lock()

    # ------------------------------------------------------------------ the steps
    def _unexpected(self, exc: Exception) -> CertError:
        # Whatever went wrong (a bug, an OpenSSL surprise) is a refusal too, never a crash.
        return CertError(self.describe or "certificate", f"unexpected error: {exc!r}")

    def _prepare(self, force: bool) -> _Prepared | _Refused | Outcome:
        """Steps 1-3. Runs in a worker thread (or directly at startup). Never raises."""
        try:
            material = self._read()
            digest = material.digest
        except CertError as exc:
            return _Refused(exc, None)
        except Exception as exc:  # noqa: BLE001
            return _Refused(self._unexpected(exc), None)
        if not force and digest == self.live_digest:
            return Outcome("unchanged", self.store.generation)
        if not force and digest == self._refused_digest:
            return Outcome("refused_again", self.store.generation)
        try:
            context, bundles = self._build(material)
        except CertError as exc:
            return _Refused(exc, digest)
        except Exception as exc:  # noqa: BLE001
            return _Refused(self._unexpected(exc), digest)
        return _Prepared(digest, context, tuple(bundles))

    def _swap(self, prepared: _Prepared) -> Outcome:
        gen = self.store.swap(prepared.context, prepared.bundles)
        self.live_digest = prepared.digest
        self._refused_digest = None
        self._last_error = None
        if self.metrics is not None:
            self.metrics.reloads.labels(self.role, "success").inc()
        return Outcome("swapped", gen)

    def _failed(self, refused: _Refused, trigger: str, force: bool) -> Outcome:
        exc = refused.error
        text = str(exc)
        self._refused_digest = refused.digest
        # New bytes that fail are always reported; a read error (no bytes to compare) only when it
        # differs from the last one, so a missing file is not logged on every periodic check.
        if not force and refused.digest is None and text == self._last_error:
            log.debug("certificate still unusable", trigger=trigger, file=exc.path, reason=exc.reason)
            return Outcome("refused_again", self.store.generation, exc)
        self._last_error = text
        # Log before publishing the failure (store, metric): whoever sees it published — /certs,
        # a scrape, a test in another thread — also finds the log line already written.
        if self.store.ready:
            log.error("certificate reload failed; keeping the current certificate", trigger=trigger,
                      file=exc.path, reason=exc.reason)
        else:
            log.error("certificate not usable; no certificate is served yet", trigger=trigger,
                      file=exc.path, reason=exc.reason)
        self.store.record_failure(text)
        if self.metrics is not None:
            self.metrics.reloads.labels(self.role, "failure").inc()
        return Outcome("failed", self.store.generation, exc)

    def _finish(self, result: _Prepared | _Refused | Outcome, trigger: str, force: bool) -> Outcome:
        if isinstance(result, _Refused):
            return self._failed(result, trigger, force)
        if isinstance(result, _Prepared):
            return self._swap(result)
        return result

    # ------------------------------------------------------------------ entry points
    def load_now(self) -> Generation:
        """Startup: read, validate, build and swap synchronously. Raises CertError (recorded)."""
        outcome = self._finish(self._prepare(force=True), "startup", force=True)
        if outcome.error is not None:
            raise outcome.error
        assert outcome.generation is not None
        return outcome.generation

    async def reload(self, trigger: str, *, force: bool = False) -> Outcome:
        """One attempt (see the module docstring). Never raises for bad material."""
        async with self._lock:
            result = await trio.to_thread.run_sync(self._prepare, force)
            return self._finish(result, trigger, force)


async def serve_reloads(reloader: Reloader, paths: Sequence[Path], *, interval_s: float,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """The reload service: watch ``paths`` and attempt a reload on every (debounced) change and
    every ``interval_s`` seconds. Runs until cancelled."""
    async def on_change(trigger: str) -> None:
        await reloader.reload(trigger)

    await watch.watch_dirs(paths, on_change, interval_s=interval_s, task_status=task_status)
