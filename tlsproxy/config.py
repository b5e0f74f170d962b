"""Settings: parsed once from flags, environment and a YAML file into one frozen value.

Every setting is a field of :class:`Settings`. Its metadata names the flag (``--head-timeout``), the
parser that turns text into a typed value, and the help text; the CLI, the ``TLSPROXY_*`` environment
variables and the ``--config`` YAML keys are all derived from that one table, so they cannot drift.

Precedence, highest first: command-line flags > environment > config file > defaults.
Nothing below this module reads ``os.environ``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError

ENV_PREFIX = "TLSPROXY_"

# --------------------------------------------------------------------------- value parsers
# Each parser takes the raw value (str from flags/env; str/int/float/bool/list from YAML) and
# returns the typed value, or raises ValueError with a short reason.

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


def parse_duration(raw: Any) -> float:
    """``30``, ``30s``, ``500ms``, ``5m``, ``2h``, ``14d`` → seconds (float)."""
    if isinstance(raw, bool):
        raise ValueError(f"{raw!r} is not a duration (e.g. 30, 30s, 5m, 14d)")
    if isinstance(raw, int | float):
        if raw < 0:
            raise ValueError(f"{raw!r} is negative")
        return float(raw)
    m = _DURATION_RE.match(str(raw))
    if not m:
        raise ValueError(f"{raw!r} is not a duration (e.g. 30, 30s, 5m, 14d)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2) or "s"]


_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(raw: Any) -> int:
    """``65536``, ``64KiB``, ``1MiB``, ``10MB`` → bytes (int)."""
    if isinstance(raw, bool):
        raise ValueError(f"{raw!r} is not a size (e.g. 65536, 64KiB, 1MiB)")
    if isinstance(raw, int):
        if raw < 0:
            raise ValueError(f"{raw!r} is negative")
        return raw
    m = _SIZE_RE.match(str(raw))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _SIZE_UNITS:
        raise ValueError(f"{raw!r} is not a size (e.g. 65536, 64KiB, 1MiB)")
    return int(m.group(1)) * _SIZE_UNITS[unit]


def parse_optional_duration(raw: Any) -> float | None:
    """A duration, or ``0``/``off``/``none`` for "not at all"."""
    if raw is None or str(raw).strip().lower() in ("", "0", "off", "none"):
        return None
    value = parse_duration(raw)
    return value or None


def parse_optional_size(raw: Any) -> int | None:
    """A size, or ``0``/``unlimited``/``none`` for no limit."""
    if raw is None or str(raw).strip().lower() in ("", "0", "unlimited", "none", "off"):
        return None
    return parse_size(raw)


def parse_int(raw: Any) -> int:
    if isinstance(raw, bool):
        raise ValueError(f"{raw!r} is not a whole number")
    try:
        value = int(str(raw).strip())
    except ValueError:
        raise ValueError(f"{raw!r} is not a whole number") from None
    if value < 0:
        raise ValueError(f"{raw!r} is negative")
    return value


def parse_positive_int(raw: Any) -> int:
    value = parse_int(raw)
    if value < 1:
        raise ValueError(f"{raw!r} must be at least 1")
    return value


def parse_on_off(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("on", "true", "yes", "1"):
        return True
    if text in ("off", "false", "no", "0"):
        return False
    raise ValueError(f"{raw!r} is not on or off")


_DNS_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def parse_dev_ca_name(raw: Any) -> str:
    """A name the development CA may sign for: a DNS name (``myapp.test``: it and the names under
    it), ``.suffix`` (only the names under it), an IP address or a network (``10.0.0.0/8``)."""
    text = str(raw).strip().lower()
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        pass
    labels = text.removeprefix(".").split(".")
    if not text or len(text) > 253 or not all(_DNS_LABEL_RE.match(label) for label in labels):
        raise ValueError(f"{raw!r} is not a DNS name, .suffix, IP address or network")
    return text


def choice(*allowed: str) -> Callable[[Any], str]:
    def parse(raw: Any) -> str:
        text = str(raw).strip().lower()
        if text not in allowed:
            raise ValueError(f"{raw!r} is not one of {', '.join(allowed)}")
        return text

    parse.choices = allowed  # type: ignore[attr-defined]
    return parse


def parse_tls_version(raw: Any) -> str:
    text = str(raw).strip().lower().removeprefix("tlsv").removeprefix("tls")
    if text in ("1.3", "13"):
        return "1.3"
    if text in ("1.2", "12"):
        return "1.2"
    raise ValueError(f"{raw!r} is not allowed (1.3, or 1.2 as an opt-in; nothing lower)")


@dataclass(frozen=True, slots=True)
class HostPort:
    """A listening or dialling address. ``host == ""`` means every IPv4 and IPv6 address."""

    host: str
    port: int

    def __str__(self) -> str:
        if not self.host:
            return f":{self.port}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_hostport(raw: Any) -> HostPort:
    """``:9443``, ``9443``, ``127.0.0.1:9443``, ``[::1]:9443``, ``localhost:9443``."""
    text = str(raw).strip()
    if text.isdigit():
        host, port_text = "", text
    elif text.startswith("["):
        end = text.find("]")
        if end < 0 or not text[end + 1 :].startswith(":"):
            raise ValueError(f"{raw!r} is not HOST:PORT (IPv6 as [::1]:9443)")
        host, port_text = text[1:end], text[end + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{raw!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"{raw!r} is not HOST:PORT (e.g. :9443 or 127.0.0.1:9443)")
        if ":" in host:
            raise ValueError(f"{raw!r}: write IPv6 addresses in brackets, e.g. [::1]:9443")
    if host in ("*", "0.0.0.0/0"):
        host = ""
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{raw!r}: port must be a number from 0 to 65535")
    return HostPort(host, int(port_text))


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where requests go: ``scheme`` is ``http`` (HTTP/1.1), ``h2c`` (HTTP/2 with prior knowledge),
    ``https`` or ``tcp``/``tls`` (byte relay)."""

    scheme: str
    host: str
    port: int

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = {"http": 80, "https": 443}.get(self.scheme)
        return host if self.port == default else f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.authority}"


_DEFAULT_PORTS = {"http": 80, "https": 443}


def parse_url(raw: Any, schemes: Iterable[str] = ("http",)) -> Upstream:
    text = str(raw).strip()
    allowed = tuple(schemes)
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{raw!r} is not a URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in allowed:
        raise ValueError(f"{raw!r}: scheme must be {' or '.join(s + '://' for s in allowed)}")
    if not parts.hostname:
        raise ValueError(f"{raw!r} has no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"{raw!r}: only scheme://host:port is allowed here (no path, query or user)")
    if port is None:
        port = _DEFAULT_PORTS.get(scheme)
        if port is None:
            raise ValueError(f"{raw!r} needs a port")
    return Upstream(scheme, parts.hostname, port)


def parse_upstream(raw: Any) -> Upstream:
    return parse_url(raw, ("http", "h2c", "tcp"))


def parse_alpn(raw: Any) -> tuple[str, ...]:
    """``h2,http/1.1`` → ("h2", "http/1.1"): printable ASCII protocol IDs of 1-255 bytes (RFC 7301)."""
    out = parse_csv(raw)
    for proto in out:
        if not 1 <= len(proto) <= 255 or not all(33 <= ord(c) <= 126 for c in proto):
            raise ValueError(f"{proto!r} is not an ALPN protocol ID (e.g. h2, http/1.1)")
    if len(set(out)) != len(out):
        raise ValueError(f"{raw!r} names a protocol twice")
    return out


def parse_path(raw: Any) -> Path:
    text = str(raw).strip()
    if not text:
        raise ValueError("empty path")
    return Path(text).expanduser()


def parse_str(raw: Any) -> str:
    return str(raw).strip()


def parse_csv(raw: Any) -> tuple[str, ...]:
    if isinstance(raw, list | tuple):
        return tuple(str(x).strip() for x in raw if str(x).strip())
    return tuple(x.strip() for x in str(raw).split(",") if x.strip())


def parse_mapping(raw: Any) -> tuple[tuple[str, Any], ...]:
    """A flat mapping (a YAML mapping, or ``{key: value, ...}`` text from a flag) as sorted
    ``(key, value)`` pairs; list values become tuples of strings. Meaning is checked by its user."""
    if isinstance(raw, str):
        import yaml

        try:
            raw = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ValueError(f"{raw!r} is not a mapping like {{listen: ..., url: ...}}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{raw!r} is not a mapping like {{listen: ..., url: ...}}")
    out = []
    for key, value in raw.items():
        if isinstance(value, dict):
            raise ValueError(f"{key}: nested mappings are not allowed")
        if isinstance(value, list | tuple):
            value = tuple(str(v).strip() for v in value)
        elif value is not None:
            value = str(value).strip()
        out.append((str(key).replace("-", "_"), value))
    return tuple(sorted(out))


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """``NAMESPACE/NAME`` of a Kubernetes object; no namespace: the pod's own (or the kubeconfig's)."""

    namespace: str | None
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name

    def resolved(self, default_namespace: str) -> ObjectRef:
        return self if self.namespace else ObjectRef(default_namespace, self.name)


_K8S_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_K8S_SUBDOMAIN = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_SAN = re.compile(r"^(\*\.)?(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?$")


def parse_object_ref(raw: Any) -> ObjectRef:
    """``NAME`` or ``NAMESPACE/NAME`` (lowercase Kubernetes names)."""
    text = str(raw).strip()
    parts = text.split("/")
    if len(parts) == 1 and _K8S_SUBDOMAIN.match(parts[0]):
        return ObjectRef(None, parts[0])
    if len(parts) == 2 and _K8S_LABEL.match(parts[0]) and _K8S_SUBDOMAIN.match(parts[1]):
        return ObjectRef(parts[0], parts[1])
    raise ValueError(f"{text!r} is not NAME or NAMESPACE/NAME (lowercase Kubernetes names)")


def parse_k8s_name(raw: Any) -> str:
    text = str(raw).strip()
    if not _K8S_LABEL.match(text):
        raise ValueError(f"{text!r} is not a Kubernetes name (lowercase letters, digits, '-')")
    return text


def parse_dns_name(raw: Any) -> str:
    text = str(raw).strip()
    if len(text) > 253 or not _DNS_SAN.match(text):
        raise ValueError(f"{text!r} is not a DNS name")
    return text


# --------------------------------------------------------------------------- the settings table


def opt(default: Any, parse: Callable[[Any], Any], help: str, *, flag: str | None = None,
        metavar: str | None = None, repeat: bool = False, group: str = "general") -> Any:
    """Declare one setting. ``repeat=True`` makes a list setting (flag given several times)."""
    meta = {"parse": parse, "help": help, "flag": flag, "metavar": metavar, "repeat": repeat,
            "group": group}
    if repeat:
        return field(default_factory=lambda: tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


# Defaults, each with its reason.
DEFAULT_LISTEN = HostPort("", 9443)          # the port the Flux/Knative/Tekton designs use; Service maps 443
DEFAULT_ADMIN = HostPort("", 9901)           # Envoy's admin port; all addresses so kubelet probes reach it
DEFAULT_UPSTREAM = Upstream("http", "127.0.0.1", 8080)
MAX_HEAD_BYTES = 32 * 1024                   # nginx large_client_header_buffers 4x8k; Envoy 60 KiB
HANDSHAKE_TIMEOUT_S = 10.0                   # Envoy transport_socket_connect_timeout 15 s; ghostunnel 10 s
HEAD_TIMEOUT_S = 10.0                        # Envoy request_headers_timeout; node headersTimeout is 60 s
BODY_TIMEOUT_S = 30.0                        # inactivity between body reads (nginx client_body_timeout 60 s)
MIN_BODY_RATE = 1024                         # bytes/s averaged: below it a body is an attack, not a client
MIN_BODY_RATE_GRACE_S = 10.0                 # before the rate counts (a slow start, a 100-continue wait)
IDLE_TIMEOUT_S = 60.0                        # keep-alive idle (nginx keepalive_timeout 75 s, Envoy 1 h)
UPSTREAM_CONNECT_TIMEOUT_S = 5.0             # localhost app: a connect that takes longer is a dead app
UPSTREAM_RESPONSE_TIMEOUT_S = 60.0           # nginx proxy_read_timeout 60 s
DRAIN_TIMEOUT_S = 20.0                       # under Kubernetes' default 30 s grace period
RELOAD_CHECK_INTERVAL_S = 60.0               # kubelet's own sync period; events normally arrive in < 1 s
MAX_CONNECTIONS = 10_000                     # beyond it, accept() waits; the kernel backlog holds the rest
TCP_IDLE_TIMEOUT_S = 3600.0                  # tcp mode: no byte either way this long (Envoy tcp_proxy 1 h;
                                             # gRPC/xDS streams idle for minutes between pushes)
PROVISION_WAIT_S = 600.0                     # --provision-secret: the API server may be slow to answer at
                                             # first; a pod without a certificate restarts after this
TCP_CLOSE_TIMEOUT_S = 5.0                    # after one side ended, the other may finish (ghostunnel 1 s)


@dataclass(frozen=True)
class Settings:
    # listeners
    listen: HostPort = opt(DEFAULT_LISTEN, parse_hostport, "TLS listener address", metavar="HOST:PORT",
                           group="listeners")
    upstream: Upstream = opt(DEFAULT_UPSTREAM, parse_upstream,
                             "the app: http://HOST:PORT (HTTP/1.1), h2c://HOST:PORT (HTTP/2 with prior "
                             "knowledge, e.g. a gRPC server), or tcp://HOST:PORT with --protocol tcp",
                             metavar="URL", group="listeners")
    admin: HostPort = opt(DEFAULT_ADMIN, parse_hostport, "plain-HTTP admin listener (/healthz, /readyz, "
                          "/metrics)", metavar="HOST:PORT", group="listeners")
    # certificates
    cert_dir: Path | None = opt(None, parse_path, "a kubernetes.io/tls Secret directory (tls.crt, tls.key, "
                                "optional ca.crt)", metavar="DIR", group="certificates")
    cert: Path | None = opt(None, parse_path, "certificate chain PEM (with --key)", metavar="FILE",
                            group="certificates")
    key: Path | None = opt(None, parse_path, "private key PEM (with --cert)", metavar="FILE",
                           group="certificates")
    state_dir: Path | None = opt(None, parse_path, "where standalone mode keeps its development CA "
                                 "(default: $XDG_STATE_HOME/tlsproxy or ~/.local/state/tlsproxy)",
                                 metavar="DIR", group="certificates")
    dev_ca_names: tuple[str, ...] = opt((), parse_dev_ca_name, "standalone mode: a further name the "
                                        "development CA may sign for and its certificate covers (a DNS "
                                        "name, .suffix, IP address or network); the CA is otherwise "
                                        "limited to localhost, *.localhost, 127.0.0.0/8 and ::1",
                                        flag="dev-ca-name", metavar="NAME", repeat=True,
                                        group="certificates")
    cert2: Path | None = opt(None, parse_path, "a second certificate chain PEM of the other key type "
                             "(RSA beside ECDSA), with --key2; default: tls2.crt in --cert-dir if present",
                             metavar="FILE", group="certificates")
    key2: Path | None = opt(None, parse_path, "private key PEM of --cert2", metavar="FILE",
                            group="certificates")
    wait_for_cert_s: float | None = opt(None, parse_optional_duration, "start without a usable certificate "
                                        "(admin up, not ready) and wait this long for one to appear "
                                        "before giving up; default: exit at once", flag="wait-for-cert",
                                        metavar="DURATION", group="certificates")
    reload_check_interval_s: float = opt(RELOAD_CHECK_INTERVAL_S, parse_duration, "re-read the "
                                         "certificate files this often even without a file event "
                                         "(backstop for a missed event; 0 disables)",
                                         flag="reload-interval", metavar="DURATION", group="certificates")
    # TLS
    tls_min_version: str = opt("1.3", parse_tls_version, "lowest TLS version accepted: 1.3, or 1.2 as an "
                               "opt-in", metavar="VERSION", group="tls")
    tls_session_tickets: int = opt(2, parse_int, "TLS 1.3 session tickets issued per handshake "
                                   "(0 disables resumption; OpenSSL's default is 2)", metavar="N",
                                   group="tls")
    # HTTP/2 (docs/http2.md)
    h2_max_concurrent_streams: int = opt(100, parse_positive_int, "HTTP/2: streams a client may have open "
                                         "at once (SETTINGS_MAX_CONCURRENT_STREAMS; RFC 9113 suggests at "
                                         "least 100)", metavar="N", group="http2")
    h2_stream_window: int = opt(256 * 1024, parse_size, "HTTP/2: receive window per stream: request body "
                                "bytes one stream may buffer here (memory per connection is at most "
                                "streams x window)", metavar="SIZE", group="http2")
    h2_max_header_block: int = opt(64 * 1024, parse_size, "HTTP/2: largest encoded header block across "
                                   "HEADERS and CONTINUATION frames (GOAWAY beyond); the decoded list is "
                                   "bounded by --max-head-size", metavar="SIZE", group="http2")
    h2_max_resets: int = opt(100, parse_positive_int, "HTTP/2: stream resets a client may send per second "
                             "before GOAWAY ENHANCE_YOUR_CALM (rapid reset, CVE-2023-44487)", metavar="N",
                             group="http2")
    h2_max_control_frames: int = opt(100, parse_positive_int, "HTTP/2: SETTINGS, PING, PRIORITY and empty "
                                     "DATA frames a client may send per second before GOAWAY "
                                     "ENHANCE_YOUR_CALM", metavar="N", group="http2")
    # limits and timeouts
    max_head_bytes: int = opt(MAX_HEAD_BYTES, parse_size, "largest request line + headers (431/414 "
                              "beyond)", flag="max-head-size", metavar="SIZE", group="limits")
    max_body_bytes: int | None = opt(None, parse_optional_size, "largest request body (413 beyond); "
                                     "default unlimited", flag="max-body-bytes", metavar="SIZE",
                                     group="limits")
    workers: int = opt(1, parse_positive_int, "worker processes sharing the listening port "
                       "(SO_REUSEPORT); 1 runs in this process (docs/performance.md)", metavar="N",
                       group="limits")
    max_connections: int = opt(MAX_CONNECTIONS, parse_positive_int, "concurrent client connections; "
                               "beyond it new connections wait in the kernel backlog", metavar="N",
                               group="limits")
    handshake_timeout_s: float = opt(HANDSHAKE_TIMEOUT_S, parse_duration, "TLS handshake deadline",
                                     flag="handshake-timeout", metavar="DURATION", group="limits")
    head_timeout_s: float = opt(HEAD_TIMEOUT_S, parse_duration, "deadline for a whole request head "
                                "once its first byte arrived (408 beyond)", flag="head-timeout",
                                metavar="DURATION", group="limits")
    body_timeout_s: float = opt(BODY_TIMEOUT_S, parse_duration, "inactivity allowed while a body "
                                "streams; the connection is cut beyond", flag="body-timeout",
                                metavar="DURATION", group="limits")
    min_body_rate: int = opt(MIN_BODY_RATE, parse_size, "slowest average request body rate in bytes/s "
                             "(408, or a close once the response started); 0: no minimum",
                             flag="min-body-rate", metavar="BYTES", group="limits")
    min_body_rate_grace_s: float = opt(MIN_BODY_RATE_GRACE_S, parse_duration, "time a request body may "
                                       "take before --min-body-rate applies", flag="min-body-rate-grace",
                                       metavar="DURATION", group="limits")
    idle_timeout_s: float = opt(IDLE_TIMEOUT_S, parse_duration, "keep-alive idle time between requests",
                                flag="idle-timeout", metavar="DURATION", group="limits")
    upstream_connect_timeout_s: float = opt(UPSTREAM_CONNECT_TIMEOUT_S, parse_duration,
                                            "deadline to connect to the upstream (502 beyond)",
                                            flag="upstream-connect-timeout", metavar="DURATION",
                                            group="limits")
    upstream_response_timeout_s: float = opt(UPSTREAM_RESPONSE_TIMEOUT_S, parse_duration,
                                             "deadline for the upstream's response head, counted from "
                                             "the end of the request body (504 beyond)",
                                             flag="upstream-response-timeout", metavar="DURATION",
                                             group="limits")
    drain_timeout_s: float = opt(DRAIN_TIMEOUT_S, parse_duration, "on SIGTERM, time for in-flight "
                                 "requests to finish, counted from the signal", flag="drain-timeout",
                                 metavar="DURATION", group="limits")
    # client certificates (mTLS) and peer identity
    client_ca: Path | None = opt(None, parse_path, "CA bundle PEM that signs client certificates: mutual "
                                 "TLS, a verified client certificate is required (reloads like the "
                                 "server certificate)", metavar="FILE", group="client certificates")
    require_client_cert: bool = opt(False, parse_on_off, "mutual TLS with the ca.crt of --cert-dir as the "
                                    "client CA (implied by --client-ca)", metavar="on|off",
                                    group="client certificates")
    client_cert_header: str = opt("xfcc", choice("xfcc", "rfc9440", "both", "none"), "how the verified "
                                  "client identity reaches the app: X-Forwarded-Client-Cert (xfcc), RFC "
                                  "9440 Client-Cert/Client-Cert-Chain (rfc9440), both, or none",
                                  metavar="MODE", group="client certificates")
    allow_uri: tuple[str, ...] = opt((), parse_str, "admit only clients whose certificate has this URI SAN "
                                     "(e.g. spiffe://...)", metavar="URI", repeat=True,
                                     group="client certificates")
    allow_dns: tuple[str, ...] = opt((), parse_str, "admit only clients whose certificate has this DNS SAN",
                                     metavar="NAME", repeat=True, group="client certificates")
    allow_cn: tuple[str, ...] = opt((), parse_str, "admit only clients whose certificate has this subject CN",
                                    metavar="CN", repeat=True, group="client certificates")
    allow_ou: tuple[str, ...] = opt((), parse_str, "admit only clients whose certificate has this subject OU",
                                    metavar="OU", repeat=True, group="client certificates")
    # plain HTTP, protocol, outbound
    http_listen: HostPort | None = opt(None, parse_hostport, "plain-HTTP listener (see --http-mode)",
                                       metavar="HOST:PORT", group="listeners")
    http_mode: str = opt("redirect", choice("redirect", "forward", "off"), "what the plain-HTTP listener "
                         "does: redirect to https, forward to the app, or off", metavar="MODE",
                         group="listeners")
    redirect_port: int = opt(443, parse_int, "port written in https:// redirects (the Service's port)",
                             metavar="PORT", group="listeners")
    protocol: str = opt("http", choice("http", "tcp"), "http (HTTP/1.1 proxy) or tcp (byte relay after "
                        "the handshake)", metavar="PROTO", group="listeners")
    alpn: tuple[str, ...] = opt((), parse_alpn, "ALPN protocols offered to clients, in order of "
                                "preference. tcp mode: any (e.g. h2,http/1.1), default none. HTTP mode: "
                                "h2 and/or http/1.1, default h2,http/1.1 (http/1.1 alone turns HTTP/2 off)",
                                metavar="LIST", group="listeners")
    proxy_protocol: str = opt("off", choice("off", "v2"), "tcp mode: send a PROXY protocol v2 header (client "
                              "address, TLS version, SNI, client identity) to the upstream first",
                              metavar="off|v2", group="tcp mode")
    tcp_idle_timeout_s: float | None = opt(TCP_IDLE_TIMEOUT_S, parse_optional_duration, "tcp mode: close a "
                                           "relay after this long without a byte either way (0: never)",
                                           flag="tcp-idle-timeout", metavar="DURATION", group="tcp mode")
    tcp_close_timeout_s: float = opt(TCP_CLOSE_TIMEOUT_S, parse_duration, "tcp mode: once one side ended "
                                     "its stream, time the other direction gets to finish before both "
                                     "are closed", flag="tcp-close-timeout", metavar="DURATION",
                                     group="tcp mode")
    tcp_max_lifetime_s: float | None = opt(None, parse_optional_duration, "tcp mode: close a relay this "
                                           "long after it started, busy or not; default never",
                                           flag="tcp-max-lifetime", metavar="DURATION", group="tcp mode")
    outbound: tuple[str, ...] = opt((), parse_str, "plain local listener that originates TLS to a peer: "
                                    "LISTEN=https://HOST:PORT", metavar="LISTEN=URL", repeat=True,
                                    group="outbound")
    outbound_ca: Path | None = opt(None, parse_path, "CA bundle PEM that verifies peers (default: the "
                                   "ca.crt of --outbound-cert-dir, else the system trust store); "
                                   "reloaded when it changes", metavar="FILE", group="outbound")
    outbound_cert_dir: Path | None = opt(None, parse_path, "client certificate presented to peers: a "
                                         "kubernetes.io/tls Secret directory (tls.crt, tls.key, "
                                         "optional ca.crt); reloaded when it changes", metavar="DIR",
                                         group="outbound")
    outbound_proxy: HostPort | None = opt(None, parse_hostport, "forward-proxy listener (HTTP_PROXY) "
                                          "that sends allow-listed http:// requests to peers over TLS; "
                                          "a bare :PORT binds 127.0.0.1", metavar="HOST:PORT",
                                          group="outbound")
    outbound_allow: tuple[str, ...] = opt(("*.svc", "*.svc.cluster.local"), parse_str,
                                          "destination the forward proxy accepts: a name or *.suffix; "
                                          "replaces the default *.svc, *.svc.cluster.local",
                                          metavar="PATTERN", repeat=True, group="outbound")
    outbound_routes: tuple[tuple[tuple[str, Any], ...], ...] = opt(
        (), parse_mapping, "an outbound route with its own settings, usually in the --config YAML: "
        "{listen, url, ca, cert_dir, server_name, allow_uri, allow_dns}", metavar="MAPPING",
        repeat=True, group="outbound")
    # certificates kept in Secrets through the Kubernetes API (docs/certificates.md, "Self-provisioned")
    provision_secret: ObjectRef | None = opt(None, parse_object_ref, "fill this Secret with a CA and a "
                                             "serving certificate when it is empty, invalid or due for "
                                             "renewal, serve it, and follow it through the Kubernetes API "
                                             "(instead of --cert-dir); NAME is in the pod's own namespace",
                                             metavar="[NAMESPACE/]NAME", group="kubernetes")
    provision_service: tuple[str, ...] = opt((), parse_k8s_name, "a Service whose names go in the "
                                             "provisioned certificate (NAME, NAME.NS, NAME.NS.svc, "
                                             "NAME.NS.svc.cluster.local); default: the Secret's name "
                                             "without -tls", metavar="NAME", repeat=True, group="kubernetes")
    provision_dns: tuple[str, ...] = opt((), parse_dns_name, "another DNS name for the provisioned "
                                         "certificate", metavar="NAME", repeat=True, group="kubernetes")
    provision_cert_validity_s: float = opt(90 * 86400.0, parse_duration, "lifetime of a provisioned "
                                           "serving certificate; renewed with a third of it left",
                                           flag="provision-cert-validity", metavar="DURATION",
                                           group="kubernetes")
    provision_ca_validity_s: float = opt(3650 * 86400.0, parse_duration, "lifetime of a provisioned CA; "
                                         "rolled over (old and new CA both in ca.crt) with a third left",
                                         flag="provision-ca-validity", metavar="DURATION", group="kubernetes")
    provision_rollover_delay_s: float = opt(300.0, parse_duration, "CA rollover: time callers get to load "
                                            "a new ca.crt before a certificate signed by the new CA is "
                                            "served, and before the old CA leaves ca.crt (> the kubelet's "
                                            "Secret refresh)", flag="provision-rollover-delay",
                                            metavar="DURATION", group="kubernetes")
    outbound_ca_secret: ObjectRef | None = opt(None, parse_object_ref, "trust the ca.crt of this Secret "
                                               "for outbound routes, followed through the Kubernetes API "
                                               "(instead of --outbound-ca)", metavar="[NAMESPACE/]NAME",
                                               group="kubernetes")
    kubeconfig: Path | None = opt(None, parse_path, "kubeconfig for the Kubernetes API (default: "
                                  "$KUBECONFIG, else the pod's service account)", metavar="FILE",
                                  group="kubernetes")
    drain_delay_s: float = opt(5.0, parse_duration, "on SIGTERM, keep accepting this long so endpoints "
                               "can stop sending traffic", flag="drain-delay", metavar="DURATION",
                               group="limits")
    expiry_warning_s: float = opt(14 * 86400.0, parse_duration, "log a warning when a loaded certificate "
                                  "expires within this long", flag="expiry-warning", metavar="DURATION",
                                  group="logging")
    # logging
    access_log: bool = opt(True, parse_on_off, "one line per request: on or off", metavar="on|off",
                           group="logging")
    log_format: str = opt("auto", choice("auto", "json", "text"), "json, text, or auto (text for a "
                          "person: stdout and stderr both terminals; json otherwise)", metavar="FORMAT",
                          group="logging")
    log_level: str = opt("info", choice("debug", "info", "warning", "error"), "lowest level logged",
                         metavar="LEVEL", group="logging")
    config: Path | None = opt(None, parse_path, "YAML file of settings (keys are the flag names)",
                              metavar="FILE", group="general")

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, slots=True)
class Option:
    """One row of the settings table, as the CLI and the loaders see it."""

    name: str          # field name, e.g. head_timeout_s
    flag: str          # e.g. head-timeout (no dashes in front)
    parse: Callable[[Any], Any]
    help: str
    metavar: str | None
    repeat: bool
    group: str
    default: Any

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.flag.upper().replace("-", "_")


def options() -> tuple[Option, ...]:
    rows = []
    for f in dataclasses.fields(Settings):
        m = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = m["flag"] or f.name.replace("_", "-")
        rows.append(Option(f.name, flag, m["parse"], m["help"], m["metavar"], m["repeat"], m["group"],
                           default))
    return tuple(rows)


_BY_FLAG: dict[str, Option] = {}


def _by_flag() -> dict[str, Option]:
    if not _BY_FLAG:
        _BY_FLAG.update({o.flag: o for o in options()})
    return _BY_FLAG


def _parse_value(o: Option, raw: Any, where: str) -> Any:
    try:
        if o.repeat:
            items = raw if isinstance(raw, list | tuple) else [raw]
            return tuple(o.parse(item) for item in items)
        return o.parse(raw)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a YAML settings file into ``{flag: raw value}``; unknown keys are an error."""
    import yaml

    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"--config: {path} is not valid YAML{at}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must be a mapping of setting names to values")
    known = _by_flag()
    out: dict[str, Any] = {}
    for key, value in data.items():
        flag = str(key).replace("_", "-")
        if flag not in known or flag == "config":
            raise ConfigError(f"{path}: unknown key {key!r}")
        o = known[flag]
        if not o.repeat and isinstance(value, list | dict):
            raise ConfigError(f"{path}: {key}: expected a single value, not a {type(value).__name__}")
        if o.repeat and isinstance(value, dict):
            raise ConfigError(f"{path}: {key}: expected a list")
        out[flag] = value
    return out


def build_settings(flags: Mapping[str, Any], env: Mapping[str, str],
                   base: Settings | None = None) -> Settings:
    """Merge layers into Settings. ``flags`` maps flag names to raw values given on the command line."""
    known = _by_flag()
    values: dict[str, Any] = {}
    config_raw = flags.get("config", env.get(ENV_PREFIX + "CONFIG"))
    if config_raw:
        config_path = _parse_value(known["config"], config_raw, "--config")
        for flag, raw in read_config_file(config_path).items():
            values[known[flag].name] = _parse_value(known[flag], raw, f"{config_path}: {flag}")
        values["config"] = config_path
    for o in known.values():
        if o.repeat or o.env not in env:
            continue
        values[o.name] = _parse_value(o, env[o.env], o.env)
    for flag, raw in flags.items():
        o = known[flag]
        values[o.name] = _parse_value(o, raw, f"--{flag}")
    settings = dataclasses.replace(base or Settings(), **values)
    if settings.provision_secret is not None and settings.wait_for_cert_s is None:
        # the first certificate comes from the API, not from disk: wait for it (not ready meanwhile)
        settings = dataclasses.replace(settings, wait_for_cert_s=PROVISION_WAIT_S)
    check_settings(settings)
    return settings


def check_settings(s: Settings) -> None:
    """Cross-field rules, each a one-line error."""
    if (s.cert is None) != (s.key is None):
        raise ConfigError("--cert and --key go together: give both or neither")
    if s.cert_dir is not None and s.cert is not None:
        raise ConfigError("--cert-dir and --cert/--key are alternatives: give one of them")
    if (s.cert2 is None) != (s.key2 is None):
        raise ConfigError("--cert2 and --key2 go together: give both or neither")
    if s.cert2 is not None and s.cert is None and s.cert_dir is None:
        raise ConfigError("--cert2/--key2 add a second pair: give the first with --cert/--key or --cert-dir")
    if s.require_client_cert and s.client_ca is None and s.cert is not None:
        raise ConfigError("--require-client-cert: with --cert/--key there is no ca.crt to use; "
                          "give --client-ca FILE")
    mtls = s.client_ca is not None or s.require_client_cert
    for flag, values in (("allow-cn", s.allow_cn), ("allow-dns", s.allow_dns),
                         ("allow-uri", s.allow_uri), ("allow-ou", s.allow_ou)):
        if values and not mtls:
            raise ConfigError(f"--{flag} needs mutual TLS: give --client-ca FILE (or "
                              "--require-client-cert on with a ca.crt in --cert-dir)")
    if s.provision_secret is not None and (s.cert_dir is not None or s.cert is not None):
        raise ConfigError("--provision-secret and --cert-dir/--cert are alternatives: give one of them")
    if (s.provision_service or s.provision_dns) and s.provision_secret is None:
        raise ConfigError("--provision-service/--provision-dns name the provisioned certificate: they need "
                          "--provision-secret")
    if s.outbound_ca_secret is not None and s.outbound_ca is not None:
        raise ConfigError("--outbound-ca-secret and --outbound-ca are alternatives: give one of them")
    if s.provision_ca_validity_s < s.provision_cert_validity_s:
        raise ConfigError("--provision-ca-validity must be at least --provision-cert-validity (a "
                          "certificate never outlives its CA)")
    if not 1 <= s.redirect_port <= 65535:
        raise ConfigError(f"--redirect-port: {s.redirect_port} is not a port (1 to 65535)")
    if s.http_listen is not None and s.http_mode == "forward" and s.protocol != "http":
        raise ConfigError("--http-mode forward proxies HTTP requests: it needs --protocol http")
    if s.protocol == "tcp" and s.upstream.scheme != "tcp":
        raise ConfigError(f"--protocol tcp relays bytes: give --upstream tcp://HOST:PORT (not {s.upstream})")
    if s.protocol == "http" and s.upstream.scheme == "tcp":
        raise ConfigError(f"--upstream {s.upstream} is a byte relay: it needs --protocol tcp")
    if s.protocol == "http" and set(s.alpn) - {"h2", "http/1.1"}:
        raise ConfigError("--alpn in HTTP mode: h2 and/or http/1.1 (other protocols need --protocol tcp)")
    if s.h2_stream_window < 65535 or s.h2_stream_window > 2**31 - 1:
        raise ConfigError("--h2-stream-window: between 64KiB (65535 bytes) and 2GiB")
    if s.h2_max_header_block < 1024:
        raise ConfigError("--h2-max-header-block: at least 1KiB (browsers send 1-8 KiB of headers)")
    if s.protocol == "http" and s.proxy_protocol != "off":
        raise ConfigError("--proxy-protocol is for --protocol tcp (HTTP mode sends X-Forwarded-For)")
