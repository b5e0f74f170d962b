"""Readiness as a set of named checks, plus the drain latch; certificate policy as pure functions.

``/healthz`` says the event loop answers. ``/readyz`` is 200 only when every check passes and no
drain has started; the moment a drain starts it answers 503, before any listener closes, so
Kubernetes takes the pod out of its endpoints while the proxy still serves.

The certificate rules (:func:`certificate_problem`, :func:`ca_problem`, :func:`expiring`) take
plain values and a ``now`` and return a reason or a list: no I/O, tested directly.
"""

from __future__ import annotations

import datetime as dt
import ssl
from collections.abc import Awaitable, Callable, Iterable

from ..certs.bundle import CertInfo

Check = Callable[[], Awaitable[str | None]]   # None = ready, else the reason it is not


class Health:
    def __init__(self) -> None:
        self.draining = False
        self._checks: dict[str, Check] = {}

    def add_check(self, name: str, check: Check) -> None:
        self._checks[name] = check

    @property
    def check_names(self) -> tuple[str, ...]:
        return ("drain", *self._checks)

    async def not_ready(self, exclude: frozenset[str] = frozenset()) -> dict[str, str]:
        """Name → reason for every failing check (empty when ready); ``exclude`` skips checks by
        name (``/readyz?exclude=upstream``, as kube-apiserver's ``/readyz?exclude=etcd``)."""
        problems: dict[str, str] = {}
        if self.draining and "drain" not in exclude:
            problems["drain"] = "draining: shutting down"
        for name, check in self._checks.items():
            if name in exclude:
                continue
            try:
                reason = await check()
            except Exception as exc:  # a broken check is a failing check, never a crash
                reason = f"check failed: {exc!r}"
            if reason:
                problems[name] = reason
        return problems


def certificate_problem(infos: Iterable[CertInfo] | None, now: dt.datetime) -> str | None:
    """Why the loaded serving certificates cannot serve (None when they can)."""
    if infos is None:
        return "no valid certificate loaded"
    infos = list(infos)
    if not infos:
        return "no valid certificate loaded"
    for info in infos:
        if info.not_after <= now:
            return f"certificate {info.serial} ({info.subject}) expired at {info.not_after.isoformat()}"
        if info.not_before > now:
            return (f"certificate {info.serial} ({info.subject}) is not valid before "
                    f"{info.not_before.isoformat()}")
    return None


def ca_problem(context: ssl.SSLContext | None, now: dt.datetime) -> str | None:
    """With a client CA configured: None when the serving context trusts at least one unexpired CA."""
    if context is None:
        return "no TLS context loaded"
    cas = context.get_ca_certs()
    if not cas:
        return "client CA bundle configured but not loaded"
    for ca in cas:
        not_after = _openssl_time(ca.get("notAfter"))
        if not_after is None or not_after > now:
            return None
    return "every certificate in the client CA bundle has expired"


def expiring(infos: Iterable[CertInfo], now: dt.datetime, window_s: float) -> list[CertInfo]:
    """The certificates that expire within ``window_s`` of ``now`` (already expired ones included)."""
    limit = now + dt.timedelta(seconds=window_s)
    return [info for info in infos if info.not_after <= limit]


def _openssl_time(text: object) -> dt.datetime | None:
    if not isinstance(text, str):
        return None
    try:
        return dt.datetime.fromtimestamp(ssl.cert_time_to_seconds(text), dt.UTC)
    except ValueError:
        return None
