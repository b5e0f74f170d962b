"""Sockets: binding listeners and the accept loop every listener (TLS, plain, admin) shares.

The accept loop is deliberately separate from the handlers it starts: it runs in the caller's
*accept* nursery and starts each handler in a *handler* nursery it is given, so a drain can close
the listeners (cancel the accept nursery) while handlers finish under their own deadline.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from .config import HostPort
from .errors import UpstreamError
from .log import get_logger

log = get_logger("net")

BACKLOG = 4096                    # nginx uses 511; the kernel clamps to net.core.somaxconn
ACCEPT_BACKOFF_MIN_S = 0.01       # first pause after running out of descriptors
ACCEPT_BACKOFF_MAX_S = 1.0        # longest pause; accepting resumes as soon as descriptors free up

# Errors that mean "this one connection died before we accepted it": just accept the next.
_TRANSIENT = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN, errno.ENOPROTOOPT,
              errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH,
              errno.EAGAIN}
# Errors that mean "out of resources": back off, the proxy recovers when resources come back.
_RESOURCE = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


def _addrinfos(addr: HostPort) -> list[tuple[int, Any]]:
    if not addr.host:
        if socket.has_ipv6:
            try:
                s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
                s.close()
                return [(socket.AF_INET6, ("::", addr.port, 0, 0))]
            except OSError:
                pass
        return [(socket.AF_INET, ("0.0.0.0", addr.port))]
    infos = socket.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    seen, out = set(), []
    for family, _type, _proto, _name, sockaddr in infos:
        if sockaddr[:2] not in seen:
            seen.add(sockaddr[:2])
            out.append((family, sockaddr))
    return out


def bind(addr: HostPort, *, reuse_port: bool = False, backlog: int = BACKLOG) -> list[trio.socket.SocketType]:
    """Bind and listen. ``:PORT`` is one dual-stack IPv6 socket (IPv4 too), or IPv4 alone where the
    machine has no IPv6. Port 0 binds every address to the same kernel-chosen port."""
    sockets: list[socket.socket] = []
    port = addr.port
    try:
        for family, sockaddr in _addrinfos(addr):
            s = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if not addr.host else 1)
            if port:
                sockaddr = (sockaddr[0], port, *sockaddr[2:])
            s.bind(sockaddr)
            s.listen(backlog)
            port = s.getsockname()[1]
    except OSError as exc:
        for s in sockets:
            s.close()
        raise OSError(exc.errno, f"cannot listen on {addr}: {exc.strerror}") from None
    return [trio.socket.from_stdlib_socket(s) for s in sockets]


def bound_address(sockets: list[trio.socket.SocketType]) -> HostPort:
    """The address to reach the first socket at (for logs and tests)."""
    name = sockets[0].getsockname()
    host = name[0]
    if host in ("::", "0.0.0.0"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    return HostPort(host, name[1])


Handler = Callable[[trio.socket.SocketType, Any], Awaitable[None]]


async def accept_loop(listen_sock: trio.socket.SocketType, handler: Handler, handlers: trio.Nursery,
                      slots: trio.Semaphore, *, name: str,
                      on_accept_error: Callable[[str], None] | None = None) -> None:
    """Accept forever; each connection runs ``handler(sock, peer)`` in ``handlers``.

    ``slots`` bounds concurrent connections: when none is free we stop accepting and the kernel
    backlog holds new connections. The handler's slot is released when it returns.
    """
    backoff = ACCEPT_BACKOFF_MIN_S
    with listen_sock:
        while True:
            await slots.acquire()
            try:
                sock, peer = await listen_sock.accept()
            except OSError as exc:
                slots.release()
                if exc.errno in _TRANSIENT:
                    continue
                if exc.errno in _RESOURCE:
                    if on_accept_error:
                        on_accept_error(errno.errorcode.get(exc.errno, str(exc.errno)))
                    log.error("accept failed; backing off", listener=name, error=exc.strerror,
                              backoff_s=backoff)
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, ACCEPT_BACKOFF_MAX_S)
                    continue
                raise
            except BaseException:
                slots.release()
                raise
            backoff = ACCEPT_BACKOFF_MIN_S
            handlers.start_soon(_run_handler, handler, sock, peer, slots, name)


async def _run_handler(handler: Handler, sock: trio.socket.SocketType, peer: Any, slots: trio.Semaphore,
                       name: str) -> None:
    try:
        await handler(sock, peer)
    except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
        pass   # the peer went away: a normal close
    except Exception as exc:   # a bug must cost one connection, never the server
        log.error("connection handler failed", listener=name, error=repr(exc))
    finally:
        slots.release()
        sock.close()


async def serve_listeners(sockets: list[trio.socket.SocketType], handler: Handler, handlers: trio.Nursery,
                          *, name: str, max_connections: int,
                          on_accept_error: Callable[[str], None] | None = None,
                          task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    slots = trio.Semaphore(max_connections)
    async with trio.open_nursery() as accepting:
        for s in sockets:
            accepting.start_soon(lambda s=s: accept_loop(s, handler, handlers, slots, name=name,
                                                          on_accept_error=on_accept_error))
        task_status.started()


def peer_host_port(peer: Any) -> tuple[str, int]:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = peer[0]
        if host.startswith("::ffff:"):
            host = host[7:]
        return host, peer[1]
    return str(peer), 0


# ---------------------------------------------------------------------------- dialling

async def connect_tcp(host: str, port: int, timeout_s: float) -> trio.SocketStream:
    """A TCP stream to ``host:port`` within ``timeout_s``, or :class:`UpstreamError` naming what went
    wrong (kind ``connect_timeout``, ``resolve`` or ``connect``). IP literals — the usual localhost
    app — skip name resolution and happy eyeballs. Inbound (the app) and outbound (peers) both dial
    through here."""
    peer = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        with trio.fail_after(timeout_s):
            return await _dial(host, port)
    except trio.TooSlowError:
        raise UpstreamError("connect_timeout", f"connect to {peer} timed out after {timeout_s:g}s") from None
    except OSError as exc:
        if isinstance(exc, socket.gaierror):
            raise UpstreamError("resolve", f"cannot resolve {host}") from None
        # trio.open_tcp_stream reports "all attempts failed" with the per-address errors as the cause
        causes = getattr(exc.__cause__, "exceptions", None) or (exc.__cause__ or exc,)
        codes = {c.errno for c in causes if isinstance(c, OSError) and c.errno}
        if codes == {errno.ECONNREFUSED}:
            raise UpstreamError("connect", f"connection to {peer} refused") from None
        names = ", ".join(sorted(errno.errorcode.get(c, str(c)) for c in codes))
        raise UpstreamError("connect", f"cannot connect to {peer}: {names or exc.strerror or exc}") from None


async def _dial(host: str, port: int) -> trio.SocketStream:
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
