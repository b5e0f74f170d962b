"""Connections to the local app: plain TCP with a connect deadline, errors named for the 502 body."""

from __future__ import annotations

import errno
import ipaddress
import socket

import trio

from ..config import Upstream
from ..errors import UpstreamError


def tcp_opener(upstream: Upstream, connect_timeout_s: float):
    """An opener for :class:`~tlsproxy.http.pool.Pool`: a new TCP stream to ``upstream``."""
    host, port = upstream.host, upstream.port

    async def open_stream() -> trio.SocketStream:
        return await connect_tcp(host, port, connect_timeout_s)

    return open_stream


async def connect_tcp(host: str, port: int, timeout_s: float) -> trio.SocketStream:
    try:
        with trio.fail_after(timeout_s):
            return await _connect(host, port)
    except trio.TooSlowError:
        raise UpstreamError("connect_timeout", f"connect to {host}:{port} timed out after {timeout_s:g}s") \
            from None
    except OSError as exc:
        root = _root_os_error(exc)
        if root.errno == errno.ECONNREFUSED:
            raise UpstreamError("connect", f"connection to {host}:{port} refused") from None
        if isinstance(root, socket.gaierror):
            raise UpstreamError("connect", f"cannot resolve {host}") from None
        reason = root.strerror or errno.errorcode.get(root.errno or 0) or str(root)
        raise UpstreamError("connect", f"cannot connect to {host}:{port}: {reason}") from None


async def _connect(host: str, port: int) -> trio.SocketStream:
    """IP literals (the usual localhost app) skip name resolution and happy-eyeballs."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return await trio.open_tcp_stream(host, port)
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


def _root_os_error(exc: OSError) -> OSError:
    """trio.open_tcp_stream raises "all attempts failed" with the real errors as the cause."""
    cause = exc.__cause__
    while cause is not None:
        if isinstance(cause, BaseExceptionGroup):
            leaves = [e for e in cause.exceptions if isinstance(e, OSError)]
            if leaves:
                return leaves[0]
        elif isinstance(cause, OSError) and cause.errno:
            return cause
        cause = cause.__cause__
    return exc


async def probe(upstream: Upstream, timeout_s: float = 1.0) -> str | None:
    """None when the upstream accepts a TCP connection, else the reason (for /readyz)."""
    try:
        stream = await connect_tcp(upstream.host, upstream.port, timeout_s)
    except UpstreamError as exc:
        return exc.reason
    await trio.aclose_forcefully(stream)
    return None
