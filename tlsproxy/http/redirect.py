"""Plain-HTTP → HTTPS redirects, as a pure function of the request head.

``redirect_location(host, target, https_port)`` returns the ``Location`` for a 301: the same host
(without the port the client used for plain HTTP) and the same path and query, on the HTTPS port
clients see (the Service's port, default 443, which is then left out of the URL). Bad input raises
:class:`~tlsproxy.errors.HTTPError` with status 400, never produces a redirect to somewhere else:
a Host with userinfo, a path, or characters outside a hostname/IP literal is refused, so the
listener cannot be turned into an open redirector by a crafted Host header.

An absolute-form target (``GET http://name/path``) names the host itself; RFC 9112 §3.2.2 says
the Host header is then ignored, and so do we.
"""

from __future__ import annotations

import re

from ..errors import HTTPError

DEFAULT_HTTPS_PORT = 443

# A DNS name or IPv4 address (RFC 3986 reg-name, minus the rarely used sub-delims and %-escapes),
# or a bracketed IPv6 literal. Port, if any, is digits only.
_NAME = re.compile(rb"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?\.?$")
_IPV6 = re.compile(rb"^\[[0-9A-Fa-f:.]+\]$")
_PORT = re.compile(rb"^[0-9]{1,5}$")
MAX_TARGET_BYTES = 8192            # same as the admin listener's head; a redirect never needs more


def split_host(authority: bytes) -> bytes:
    """``name[:port]`` or ``[v6][:port]`` → the host part; HTTPError(400) when malformed."""
    text = authority.strip()
    if text.startswith(b"["):
        end = text.find(b"]")
        host, rest = (text[: end + 1], text[end + 1:]) if end > 0 else (text, b"")
        if not _IPV6.match(host):
            raise HTTPError(400, "invalid Host header", kind="bad_host")
    else:
        host, sep, port = text.partition(b":")
        rest = b":" + port if sep else b""
        if not _NAME.match(host):
            raise HTTPError(400, "invalid Host header", kind="bad_host")
    if rest and not (rest.startswith(b":") and (rest == b":" or _PORT.match(rest[1:]))):
        raise HTTPError(400, "invalid Host header", kind="bad_host")
    return host.lower()


def redirect_location(host: bytes | None, target: bytes, https_port: int = DEFAULT_HTTPS_PORT) -> bytes:
    """The ``Location`` of the 301 answering ``target`` sent with ``Host: host``."""
    if len(target) > MAX_TARGET_BYTES:
        raise HTTPError(414, "request target too long", kind="target_too_long")
    lower = target[:8].lower()
    if lower.startswith((b"http://", b"https://")):
        rest = target.split(b"://", 1)[1]
        slash = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
        authority, path = rest[:slash], rest[slash:]
        if b"@" in authority or not authority:
            raise HTTPError(400, "invalid request target", kind="bad_target")
        if not path.startswith(b"/"):
            path = b"/" + path
        host = authority
    elif target.startswith(b"/"):
        path = target
    else:   # "*" (OPTIONS) and authority-form (CONNECT) have no https:// equivalent
        raise HTTPError(400, "request target cannot be redirected", kind="bad_target")
    if host is None or not host.strip():
        raise HTTPError(400, "missing Host header", kind="bad_host")
    name = split_host(host)
    port = b"" if https_port == DEFAULT_HTTPS_PORT else b":%d" % https_port
    return b"https://" + name + port + path
