"""Outbound routes and the forward proxy's allow-list: pure parsing and matching, no I/O.

* ``--outbound LISTEN=URL`` and each ``outbound_routes`` YAML mapping become a frozen
  :class:`OutboundRoute`: where the local plain listener binds, which peer it talks to, how the peer
  is verified (CA bundle, name checked, pinned identity) and which client certificate is presented.
* The forward proxy turns a request target (absolute-form ``http://host:port/path``, or the
  authority-form of ``CONNECT host:port``) into a :class:`Target`, and decides with
  :func:`host_allowed` — on the *name as written*, before anything is resolved or dialled.

Allow patterns: ``name`` matches that name exactly; ``*.suffix`` matches any name ending in
``.suffix`` with at least one label in front (``*.svc`` matches ``peer.ns.svc``, not ``svc``).
Matching ignores ASCII case and a trailing dot. IP literals only match an exact pattern. A bare
``*`` is refused: the forward proxy must never become an open proxy.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import HostPort, parse_alpn, parse_hostport, parse_url
from ..errors import ConfigError, HTTPError
from ..tls.identity import AllowRules

LOOPBACK = "127.0.0.1"
ROUTE_KEYS = ("listen", "url", "ca", "cert_dir", "server_name", "allow_uri", "allow_dns", "alpn")
_LABEL_RE = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")


@dataclass(frozen=True)
class OutboundRoute:
    """One local plain listener and the peer it sends every request to, over verified TLS."""

    listen: HostPort
    host: str                                  # the peer, as written in the URL
    port: int
    server_name: str | None = None             # name checked in the peer's certificate (default: host)
    ca: Path | None = None                     # None: --outbound-ca / cert_dir's ca.crt / system store
    cert_dir: Path | None = None               # None: --outbound-cert-dir (or no client certificate)
    pin: AllowRules = AllowRules()             # peer identity (URI / DNS SAN) required; empty: any
    scheme: str = "https"                      # https: HTTP through the engine; tls: bytes relayed as-is
    tls_alpn: tuple[str, ...] = ()             # tls:// routes: ALPN offered to the peer (YAML ``alpn``)

    @property
    def authority(self) -> str:
        """The peer's authority, as the Host header carries it (port omitted when 443)."""
        return authority(self.host, self.port)

    @property
    def name_checked(self) -> str:
        return self.server_name or self.host

    @property
    def label(self) -> str:
        return f"outbound:{self.authority}"

    @property
    def alpn(self) -> tuple[str, ...]:
        """ALPN offered: http/1.1 for HTTP routes, nothing for a byte relay (the protocol is unknown)."""
        return ("http/1.1",) if self.scheme == "https" else self.tls_alpn


def authority(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return shown if port == 443 else f"{shown}:{port}"


def local_listen(raw: Any, what: str) -> HostPort:
    """A listener address; a bare ``PORT`` or ``:PORT`` binds loopback (these listeners speak plain
    HTTP and act with this pod's identity: exposing one must be asked for, e.g. ``0.0.0.0:15001``)."""
    try:
        addr = parse_hostport(raw)
    except ValueError as exc:
        raise ConfigError(f"{what}: {exc}") from None
    return addr if addr.host else HostPort(LOOPBACK, addr.port)


def _peer_url(raw: Any, what: str) -> tuple[str, str, int]:
    """``https://HOST[:PORT]`` (HTTP, Host rewritten) or ``tls://HOST:PORT`` (TLS around a byte relay)."""
    try:
        url = parse_url(raw, ("https", "tls"))
    except ValueError as exc:
        raise ConfigError(f"{what}: {exc}") from None
    return url.scheme, url.host, url.port


def parse_outbound_flag(raw: str) -> OutboundRoute:
    """``LISTEN=URL``, e.g. ``127.0.0.1:15001=https://core-interceptors.tekton-pipelines.svc:8443``."""
    text = str(raw).strip()
    listen_text, sep, url_text = text.partition("=")
    if not sep or not listen_text.strip() or not url_text.strip():
        raise ConfigError(f"--outbound {raw!r}: expected LISTEN=URL, e.g. "
                          "127.0.0.1:15001=https://peer.ns.svc:8443")
    listen = local_listen(listen_text.strip(), f"--outbound {raw!r}")
    scheme, host, port = _peer_url(url_text.strip(), f"--outbound {raw!r}")
    return OutboundRoute(listen=listen, host=host, port=port, scheme=scheme)


def parse_route_mapping(items: Mapping[str, Any] | Iterable[tuple[str, Any]], index: int) -> OutboundRoute:
    """One ``outbound_routes`` entry (already a flat mapping, see ``config.parse_mapping``)."""
    data = dict(items)
    what = f"outbound_routes[{index}]"
    unknown = sorted(set(data) - set(ROUTE_KEYS))
    if unknown:
        raise ConfigError(f"{what}: unknown key {unknown[0]!r} (known: {', '.join(ROUTE_KEYS)})")
    for key in ("listen", "url"):
        if not data.get(key):
            raise ConfigError(f"{what}: {key} is required")
    listen = local_listen(data["listen"], f"{what}: listen")
    scheme, host, port = _peer_url(data["url"], f"{what}: url")
    server_name = _one(data, "server_name", what)
    if server_name is not None and not _valid_name(server_name):
        raise ConfigError(f"{what}: server_name {server_name!r} is not a DNS name or IP address")
    ca = _path(data, "ca", what)
    cert_dir = _path(data, "cert_dir", what)
    try:
        pin = AllowRules.parse(uri=_many(data, "allow_uri", what), dns=_many(data, "allow_dns", what))
    except ConfigError as exc:
        raise ConfigError(f"{what}: {exc}") from None
    alpn = _many(data, "alpn", what)
    if alpn and scheme != "tls":
        raise ConfigError(f"{what}: alpn is for tls:// routes (https:// routes always offer http/1.1)")
    try:
        alpn = parse_alpn(",".join(alpn))
    except ValueError as exc:
        raise ConfigError(f"{what}: alpn: {exc}") from None
    return OutboundRoute(listen=listen, host=host, port=port, server_name=server_name, ca=ca,
                         cert_dir=cert_dir, pin=pin, scheme=scheme, tls_alpn=alpn)


def _one(data: Mapping[str, Any], key: str, what: str) -> str | None:
    value = data.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, tuple | list):
        raise ConfigError(f"{what}: {key} takes one value, not a list")
    return str(value)


def _many(data: Mapping[str, Any], key: str, what: str) -> tuple[str, ...]:
    value = data.get(key)
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


def _path(data: Mapping[str, Any], key: str, what: str) -> Path | None:
    value = _one(data, key, what)
    return Path(value).expanduser() if value else None


def parse_routes(flags: Iterable[str], mappings: Iterable[Any]) -> tuple[OutboundRoute, ...]:
    """Every outbound route: the ``--outbound`` flags first, then the YAML mappings. Two routes may
    not share a listen address (port 0 excepted: each gets its own port)."""
    routes = [parse_outbound_flag(f) for f in flags]
    routes += [parse_route_mapping(m, i) for i, m in enumerate(mappings)]
    seen: set[HostPort] = set()
    for r in routes:
        if r.listen.port and r.listen in seen:
            raise ConfigError(f"outbound: two routes listen on {r.listen}")
        seen.add(r.listen)
    return tuple(routes)


# ---------------------------------------------------------------------------- allow-list

def _valid_name(name: str) -> bool:
    if _ip(name) is not None:
        return True
    labels = name.rstrip(".").split(".")
    return len(name) <= 253 and all(_LABEL_RE.match(label) for label in labels)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def parse_allow(patterns: Iterable[str]) -> tuple[str, ...]:
    """Validate ``--outbound-allow`` patterns; they are kept lowercased without a trailing dot."""
    out = []
    for raw in patterns:
        p = raw.strip().lower().rstrip(".")
        if p in ("*", "*.", ""):
            raise ConfigError(f"--outbound-allow {raw!r}: allowing everything would make an open proxy; "
                              "list names or *.suffix patterns")
        name = p[2:] if p.startswith("*.") else p
        if "*" in name or not _valid_name(name):
            raise ConfigError(f"--outbound-allow {raw!r}: expected a name or *.suffix (e.g. *.svc)")
        out.append(p)
    return tuple(out)


def host_allowed(host: str, patterns: Iterable[str]) -> bool:
    """Whether the forward proxy may send to ``host`` (a name or IP literal, never resolved here)."""
    h = host.lower().rstrip(".")
    is_ip = _ip(h) is not None
    for p in patterns:
        if p.startswith("*."):
            if not is_ip and h.endswith(p[1:]) and len(h) > len(p) - 1:
                return True
        elif h == p:
            return True
    return False


# ---------------------------------------------------------------------------- forward-proxy targets

@dataclass(frozen=True)
class Target:
    host: str
    port: int
    path: bytes = b"/"          # origin-form target for the peer

    @property
    def authority(self) -> str:
        return authority(self.host, self.port)


def _split_authority(text: str) -> tuple[str, str]:
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("unclosed [")
        host, rest = text[1:end], text[end + 1:]
        if _ip(host) is None:
            raise ValueError("not an IPv6 address in []")
        if rest and not rest.startswith(":"):
            raise ValueError("junk after ]")
        return host, rest[1:]
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, ""
    return host, port


def _check_host_port(host: str, port_text: str, default: int | None, form: str) -> tuple[str, int]:
    if not host or not _valid_name(host) and _ip(host) is None:
        raise HTTPError(400, f"bad request: {form}: {host!r} is not a host name", kind="proxy_target")
    if not port_text:
        if default is None:
            raise HTTPError(400, f"bad request: {form}: a port is required", kind="proxy_target")
        return host, default
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise HTTPError(400, f"bad request: {form}: {port_text!r} is not a port", kind="proxy_target")
    return host, int(port_text)


def parse_proxy_target(target: bytes) -> Target:
    """Absolute-form ``http://host[:port]/path?query`` → Target. The peer always gets TLS; without a
    port, 443 is dialled (``http://`` only says the *client* spoke plain HTTP to us)."""
    try:
        text = target.decode("ascii")
    except UnicodeDecodeError:
        raise HTTPError(400, "bad request: non-ASCII request target", kind="proxy_target") from None
    lower = text[:8].lower()
    if lower.startswith("http://"):
        rest = text[7:]
    elif lower.startswith("https://"):
        rest = text[8:]
    else:
        raise HTTPError(400, "this is a forward proxy: send absolute URLs "
                        "(GET http://peer.ns.svc:8443/path), e.g. with HTTP_PROXY set", kind="proxy_target")
    cut = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    auth, path = rest[:cut], rest[cut:]
    if "@" in auth:
        raise HTTPError(400, "bad request: user information in the URL is not forwarded", kind="proxy_target")
    path = path.split("#", 1)[0]
    if not path.startswith("/"):
        path = "/" + path
    try:
        host, port_text = _split_authority(auth)
    except ValueError as exc:
        raise HTTPError(400, f"bad request: URL authority: {exc}", kind="proxy_target") from None
    host, port = _check_host_port(host, port_text, 443, "URL")
    return Target(host, port, path.encode("ascii"))


def parse_connect_target(target: bytes) -> Target:
    """CONNECT's authority-form ``host:port`` → Target (port required)."""
    try:
        text = target.decode("ascii")
        host, port_text = _split_authority(text)
    except (UnicodeDecodeError, ValueError):
        raise HTTPError(400, "bad request: CONNECT needs host:port", kind="proxy_target") from None
    host, port = _check_host_port(host, port_text, None, "CONNECT")
    return Target(host, port, b"")


_CONNECT_LINE = re.compile(rb"^CONNECT ([!-~]+) HTTP/1\.[01]\r?$")


def connect_request(head: bytes | bytearray) -> bytes | None:
    """The target of a ``CONNECT`` request head, None when the head is not a well-formed CONNECT."""
    line = bytes(head.split(b"\n", 1)[0])
    m = _CONNECT_LINE.match(line)
    return m.group(1) if m else None
