"""The values an exchange is made of, shared by the engine and the listeners that feed it.

An *exchange* is one request and its response, streamed both ways at once. Whatever produces it (an
HTTP/1.1 connection today, an HTTP/2 stream later) speaks in three events per direction: a head, body
data (``bytes``), and an :class:`End` that carries the trailer fields. Nothing here knows HTTP/1.1
framing or does I/O: listeners import these values without importing the engine.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import HTTPError
from .deadlines import Watchdog
from .headers import ForwardFacts

Triple = tuple[bytes, bytes, bytes]     # (raw name, lowercased name, value), as a head carries fields

IDLE = "idle"    # the phase of a connection waiting for its next request (a drain wakes it)


class Leg(Protocol):
    """What a pool lends the engine for one exchange: ``pool.UpstreamConn``, an
    ``h2pool.H2Leg`` from the h2c pool. ``h11`` is the leg's codec (``h1client.H1Client`` or the
    h2 stream's), ``stream`` what it reads and writes."""

    @property
    def stream(self) -> Any: ...
    @property
    def h11(self) -> Any: ...
    @property
    def reused(self) -> bool: ...


class UpstreamPool(Protocol):
    """What the engine needs of a pool (``pool.Pool``, ``h2pool.H2Pool``)."""

    http2: bool          # the leg speaks HTTP/2 (trailers, gRPC)
    http10: bool         # the app answered in HTTP/1.0 once (no 100 Continue to wait for)

    async def acquire(self, *, fresh: bool = False) -> Any: ...
    def release(self, conn: Any) -> None: ...
    def discard(self, conn: Any) -> None: ...


class End:
    """The end of a message, with its trailer fields (empty almost always: :data:`END`)."""

    __slots__ = ("trailers",)

    def __init__(self, trailers: tuple[Triple, ...] = ()) -> None:
        self.trailers = trailers

    def __repr__(self) -> str:
        return f"End({self.trailers!r})"


END = End()


class ResponseHead:
    """A response head as the upstream sent it: ``status``, ``reason``, ``items`` (triples)."""

    __slots__ = ("status", "reason", "items", "http_version")

    def __init__(self, status: int, reason: bytes, items: list[Triple], http_version: bytes = b"1.1") -> None:
        self.status = status
        self.reason = reason
        self.items = items
        self.http_version = http_version


@dataclass(frozen=True)
class Limits:
    max_head_bytes: int = 32 * 1024
    max_body_bytes: int | None = None
    head_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    idle_timeout_s: float = 60.0
    upstream_response_timeout_s: float = 60.0
    upgrade_close_timeout_s: float = 5.0
    # A request body slower than this on average (bytes/s, after the grace period) is cut: a byte
    # every few seconds would otherwise hold a connection and an upstream forever. 0: no minimum.
    min_body_rate_bps: float = 1024.0
    min_body_rate_grace_s: float = 10.0


@dataclass(frozen=True)
class Destination:
    """Where one request goes when the route resolves requests one by one."""

    pool: UpstreamPool
    target: bytes                                # the request target sent upstream (origin-form)
    host_override: bytes | None = None


@dataclass(frozen=True)
class LocalRequest:
    """What a local handler sees: the request, its body read up to the route's limit, the client."""

    method: str
    target: str
    headers: tuple[tuple[bytes, bytes], ...]     # (lowercased name, value)
    body: bytes
    client_ip: str
    facts: ConnFacts

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]

    def header(self, name: bytes) -> bytes | None:
        for n, value in self.headers:
            if n == name:
                return value
        return None


@dataclass
class LocalResponse:
    """What a local handler returns; the engine frames it (Content-Length, Connection)."""

    status: int = 200
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    close: bool = False                          # close the connection after this answer


LocalHandler = Callable[[LocalRequest], Awaitable[LocalResponse]]


@dataclass(frozen=True)
class Route:
    """What differs between listeners that share the engine."""

    name: str                                    # metrics/log label: "inbound", "http", "outbound:..."
    pool: UpstreamPool | None
    limits: Limits
    host_override: bytes | None = None           # outbound: Host becomes the peer's authority
    access_log: bool = True
    upstream_label: str = ""                     # for logs: where requests go
    # Per-request routing (the outbound forward proxy): (method, target) -> Destination, or raise
    # HTTPError to refuse. None: every request goes to ``pool`` with ``host_override``.
    resolve: Callable[[bytes, bytes], Destination] | None = None
    # A local handler answers instead of an upstream (the redirect port, admin, the webhook).
    local: LocalHandler | None = None
    max_local_body_bytes: int = 1024 * 1024


@dataclass
class ConnFacts:
    """Facts about one client connection, fixed once the handshake is done."""

    client: str                                  # "ip:port"
    forward: ForwardFacts
    tls_version: str = "-"
    identity: str = ""                           # verified client identity, for logs
    deny: HTTPError | None = None                # set when mTLS identity rules refuse this client
    extra_log: dict = field(default_factory=dict)


class Drain:
    """Tells connection handlers that a drain started, and wakes the ones idling between requests.
    Owns the :class:`~.deadlines.Watchdog` that enforces every client connection's deadlines (its
    ``run`` task belongs in the application's root nursery)."""

    def __init__(self) -> None:
        self.draining = False
        self.watchdog = Watchdog()

    def start(self) -> None:
        self.draining = True
        for w in list(self.watchdog.watches):
            if w.phase == IDLE:
                Watchdog.fire(w)
