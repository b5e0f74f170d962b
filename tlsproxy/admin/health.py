"""Readiness as a set of named checks, plus the drain latch.

``/healthz`` says the event loop answers. ``/readyz`` is 200 only when every check passes and no
drain has started; the moment a drain starts it answers 503, before any listener closes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

Check = Callable[[], Awaitable[str | None]]   # None = ready, else the reason it is not


class Health:
    def __init__(self) -> None:
        self.draining = False
        self._checks: dict[str, Check] = {}

    def add_check(self, name: str, check: Check) -> None:
        self._checks[name] = check

    async def not_ready(self) -> dict[str, str]:
        """Name → reason for every failing check (empty when ready)."""
        problems: dict[str, str] = {}
        if self.draining:
            problems["drain"] = "draining: shutting down"
        for name, check in self._checks.items():
            try:
                reason = await check()
            except Exception as exc:  # a broken check is a failing check, never a crash
                reason = f"check failed: {exc!r}"
            if reason:
                problems[name] = reason
        return problems
