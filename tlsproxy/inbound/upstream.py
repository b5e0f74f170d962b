"""Connections to the local app: plain TCP with a connect deadline, errors named for the 502 body."""

from __future__ import annotations

import errno
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
            stream = await trio.open_tcp_stream(host, port)
    except trio.TooSlowError:
        raise UpstreamError("connect_timeout", f"connect to {host}:{port} timed out after {timeout_s:g}s") \
            from None
    except OSError as exc:
        code = errno.errorcode.get(exc.errno or 0, "")
        if exc.errno == errno.ECONNREFUSED or "refused" in str(exc).lower():
            raise UpstreamError("connect", f"connection to {host}:{port} refused") from None
        if isinstance(exc, socket.gaierror):
            raise UpstreamError("connect", f"cannot resolve {host}") from None
        raise UpstreamError("connect", f"cannot connect to {host}:{port}: {code or exc}") from None
    return stream


async def probe(upstream: Upstream, timeout_s: float = 1.0) -> str | None:
    """None when the upstream accepts a TCP connection, else the reason (for /readyz)."""
    try:
        stream = await connect_tcp(upstream.host, upstream.port, timeout_s)
    except UpstreamError as exc:
        return exc.reason
    await trio.aclose_forcefully(stream)
    return None
