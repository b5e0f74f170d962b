"""Connections to the local app: plain TCP with a connect deadline, errors named for the 502 body."""

from __future__ import annotations

import trio

from ..config import Upstream
from ..errors import UpstreamError
from ..net import PlainStream, connect_tcp


def tcp_opener(upstream: Upstream, connect_timeout_s: float):
    """An opener for :class:`~tlsproxy.http.pool.Pool`: a new TCP stream to ``upstream``."""
    host, port = upstream.host, upstream.port

    async def open_stream() -> PlainStream:
        return await connect_tcp(host, port, connect_timeout_s)

    return open_stream


async def probe(upstream: Upstream, timeout_s: float = 1.0) -> str | None:
    """None when the upstream accepts a TCP connection, else the reason (for /readyz)."""
    try:
        stream = await connect_tcp(upstream.host, upstream.port, timeout_s)
    except UpstreamError as exc:
        return exc.reason
    await trio.aclose_forcefully(stream)
    return None
