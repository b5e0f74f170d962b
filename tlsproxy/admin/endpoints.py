"""Admin endpoints beyond the probes: ``/certs`` (what is loaded) and ``POST /shutdown`` (start a drain).

``/certs`` reports certificate *metadata* only (subject, SANs, serial, validity, fingerprint) and the
last reload's outcome; key material never leaves the store. ``/shutdown`` lets a Job's app end a
classic sidecar when it is done; it answers only loopback callers (the admin listener binds every
address so that kubelet's probes reach it, and a drain must not be something the network can ask for).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Callable
from urllib.parse import unquote

from ..tls.store import ContextStore
from .health import Health
from .server import AdminRequest, Handler, Reply


def is_loopback(ip: str) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback; False for anything unparsable."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def _iso(ts: float | None) -> str | None:
    return None if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC).isoformat()


def certs_report(store: ContextStore, now: dt.datetime) -> dict:
    """The ``/certs`` document: loaded certificates and the last reload's result."""
    gen = store.generation
    certs = []
    if gen is not None:
        for b in gen.bundles:
            entry = {"role": "server", **b.info.as_dict(),
                     "expires_in_s": round((b.info.not_after - now).total_seconds()),
                     "cert_file": b.cert_path, "ca_file": b.ca_path}
            certs.append(entry)
    return {
        "generation": gen.number if gen else None,
        "loaded_at": _iso(gen.loaded_at) if gen else None,
        "certificates": certs,
        "last_reload": {"ok": store.last_reload_ok, "at": _iso(store.last_reload_at),
                        "error": store.last_error},
    }


def certs_handler(store: ContextStore, clock: Callable[[], dt.datetime] | None = None) -> Handler:
    clock = clock or (lambda: dt.datetime.now(dt.UTC))

    async def certs(_req: AdminRequest) -> Reply:
        return Reply.json(200, certs_report(store, clock()))

    return certs


def readyz_exclusions(query: str, known: tuple[str, ...]) -> frozenset[str] | str:
    """The checks named by ``exclude=`` parameters of the query, or an error text for the 400."""
    names: set[str] = set()
    for part in query.split("&") if query else ():
        key, _, val = part.partition("=")
        if key != "exclude":
            return f"unknown parameter {unquote(key)!r} (only exclude=CHECK)"
        for name in unquote(val).split(","):
            if name not in known:
                return f"unknown check {name!r} (checks: {', '.join(known)})"
            names.add(name)
    return frozenset(names)


def readyz_handler(health: Health) -> Handler:
    """200 ``{"ready": true}`` or 503 with every failing check and its reason."""

    async def readyz(req: AdminRequest) -> Reply:
        exclude = readyz_exclusions(req.query, health.check_names)
        if isinstance(exclude, str):
            return Reply.json(400, {"error": exclude})
        problems = await health.not_ready(exclude)
        if problems:
            return Reply.json(503, {"ready": False, "not_ready": problems})
        return Reply.json(200, {"ready": True})

    return readyz


def shutdown_handler(request_drain: Callable[[str], None]) -> Handler:
    async def shutdown(req: AdminRequest) -> Reply:
        if not is_loopback(req.client_ip):
            return Reply.json(403, {"error": "POST /shutdown is accepted from loopback only"})
        request_drain("admin /shutdown")
        return Reply.json(202, {"draining": True})

    return shutdown
