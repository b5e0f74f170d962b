"""The current TLS context generation.

Listeners read :attr:`ContextStore.current` on every accept, so swapping one reference is all a
reload needs: new handshakes use the new context, connections already open keep the one they began
with. The store never mutates a context; it only replaces the reference, and only with a context
that was fully built and validated.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..certs.bundle import Bundle


@dataclass(frozen=True)
class Generation:
    context: ssl.SSLContext
    bundles: tuple[Bundle, ...]
    loaded_at: float = field(default_factory=time.time)
    number: int = 1


class ContextStore:
    """Holds the current :class:`Generation`; ``on_swap`` callbacks run after each swap."""

    def __init__(self, initial: Generation | None = None) -> None:
        self._gen = initial
        self.last_error: str | None = None
        self.last_reload_at: float | None = None
        self.last_reload_ok: bool | None = None
        self._on_swap: list[Callable[[Generation | None, Generation], None]] = []

    @property
    def ready(self) -> bool:
        return self._gen is not None

    @property
    def generation(self) -> Generation | None:
        return self._gen

    @property
    def current(self) -> ssl.SSLContext:
        gen = self._gen
        if gen is None:
            raise LookupError("no certificate loaded yet")
        return gen.context

    def subscribe(self, callback: Callable[[Generation | None, Generation], None]) -> None:
        self._on_swap.append(callback)

    def swap(self, context: ssl.SSLContext, bundles: Sequence[Bundle]) -> Generation:
        old = self._gen
        new = Generation(context, tuple(bundles), number=(old.number + 1) if old else 1)
        self._gen = new
        self.last_error = None
        self.last_reload_ok = True
        self.last_reload_at = new.loaded_at
        for cb in self._on_swap:
            cb(old, new)
        return new

    def record_failure(self, reason: str) -> None:
        self.last_error = reason
        self.last_reload_ok = False
        self.last_reload_at = time.time()
