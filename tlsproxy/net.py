"""Sockets: binding listeners, the one serve function and accept loop every listener (TLS, plain,
outbound, admin, webhook) shares, dialling, and the connection streams (:class:`FdStream`).

The accept loop is deliberately separate from the handlers it starts: it runs in the caller's
*accept* nursery and starts each handler in a *handler* nursery it is given, so a drain can close
the listeners (cancel the accept nursery) while handlers finish under their own deadline.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import select
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
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
    seen: set[Any] = set()
    out: list[tuple[int, Any]] = []
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


Handler = Callable[[socket.socket, Any], Awaitable[None]]


class _Acceptor:
    """Accepts on a listening socket taken out of its trio wrapper and hands out plain stdlib
    socket objects (blocking mode; each handler sets the mode it needs). The TLS listener wraps
    the socket in an ``SSLSocket`` as it is; the others ask :func:`socket_stream` for a
    stream. A TLS connection so costs one Python socket object, not three (trio's wrapper, the
    stdlib socket under it, and the copy the handler detached from it): two ``getsockname`` calls
    (CPython checks every socket built from a descriptor) and two ``ioctl`` calls fewer."""

    def __init__(self, listen_sock: trio.socket.SocketType) -> None:
        self.sock = socket.socket(listen_sock.family, listen_sock.type, listen_sock.proto,
                                  fileno=listen_sock.detach())
        self.sock.setblocking(False)

    async def accept(self) -> tuple[socket.socket, Any]:
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                return self.sock.accept()
            except (BlockingIOError, InterruptedError):
                await park(trio.lowlevel.wait_readable, self.sock.fileno())

    def close(self) -> None:
        release_fd(self.sock.fileno())
        self.sock.close()


def socket_stream(sock: socket.socket) -> PlainStream:
    """The stream of an accepted plain connection (plain listeners, outbound, admin)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass    # not TCP (a test's Unix socket), or already gone: the first send says so
    return PlainStream(sock)


async def accept_loop(listen_sock: trio.socket.SocketType, handler: Handler, handlers: trio.Nursery,
                      slots: trio.Semaphore, *, name: str,
                      on_accept_error: Callable[[str], None] | None = None) -> None:
    """Accept forever; each connection runs ``handler(sock, peer)`` in ``handlers``, ``sock`` a
    plain ``socket.socket`` (:class:`_Acceptor`).

    ``slots`` bounds concurrent connections: when none is free we stop accepting and the kernel
    backlog holds new connections. The handler's slot is released when it returns. Every accept
    passes a checkpoint (``slots.acquire``), so a flood of connections cannot starve other tasks.
    """
    backoff = ACCEPT_BACKOFF_MIN_S
    with contextlib.closing(_Acceptor(listen_sock)) as acceptor:
        while True:
            await slots.acquire()
            try:
                sock, peer = await acceptor.accept()
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


async def _run_handler(handler: Handler, sock: socket.socket, peer: Any, slots: trio.Semaphore,
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


@dataclass(frozen=True)
class Listener:
    """One listening address and what its accept loop needs to know."""

    name: str                          # the ``listener`` label of metrics and logs
    addr: HostPort
    max_connections: int
    reuse_port: bool = False           # --workers: every worker binds the same port
    on_accept_error: Callable[[str], None] | None = field(default=None, compare=False)
    log_fields: tuple[tuple[str, object], ...] = ()   # extra fields of the "listening" line
    log_event: str = "listening"       # the admin listener says "admin listening" (a stable event name)


async def serve(listener: Listener, handler: Handler, handlers: trio.Nursery, *,
                sockets: list[trio.socket.SocketType] | None = None,
                task_status: trio.TaskStatus[HostPort] = trio.TASK_STATUS_IGNORED) -> None:
    """THE serve function of every listener (TLS, plain HTTP, outbound, admin, webhook).

    Binds ``listener.addr`` (unless ``sockets`` are given), calls ``task_status.started(bound)``
    once every socket listens, then accepts forever: each connection runs ``handler(sock, peer)``
    in ``handlers`` (a nursery of the caller's, so a drain can cancel the accept loops — this
    task — and give the handlers a deadline). At most ``max_connections`` handlers run at once."""
    sockets = sockets or bind(listener.addr, reuse_port=listener.reuse_port)
    bound = bound_address(sockets)
    slots = trio.Semaphore(listener.max_connections)
    async with trio.open_nursery() as accepting:
        for s in sockets:
            accepting.start_soon(functools.partial(accept_loop, s, handler, handlers, slots,
                                                   name=listener.name,
                                                   on_accept_error=listener.on_accept_error))
        log.info(listener.log_event, listener=listener.name, addr=str(listener.addr), bound=str(bound),
                 **dict(listener.log_fields))
        task_status.started(bound)


def peer_host_port(peer: Any) -> tuple[str, int]:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = peer[0]
        if host.startswith("::ffff:"):
            host = host[7:]
        return host, peer[1]
    return str(peer), 0


# ---------------------------------------------------------------------------- dialling

async def connect_tcp(host: str, port: int, timeout_s: float) -> PlainStream:
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


async def _dial(host: str, port: int) -> PlainStream:
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return _plain_stream(await trio.open_tcp_stream(host, port))
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        await sock.connect((host, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return PlainStream(socket.socket(sock.family, sock.type, sock.proto, fileno=sock.detach()))


class FdStream(trio.abc.Stream):
    """What every connection stream of the proxy shares: one connected, non-blocking socket
    descriptor that the stream owns; :class:`PlainStream` (TCP) and
    :class:`~tlsproxy.tls.stream.TLSStream` (TLS over the same descriptor) are its two kinds.

    Theory of operation. A call tries the system call (or ``SSL_read``/``SSL_write``) first and parks
    the task on ``wait_readable``/``wait_writable`` only when it would block. A call that did not
    block yields to the scheduler every ``YIELD_EVERY`` calls only: enough for fairness (a bulk
    transfer cannot starve other tasks), without a scheduler pass per request (measured in
    docs/performance.md). Every call still raises ``trio.Cancelled`` at its start if cancelled.

    Closing has two forms, both here so no caller needs to ask which kind of stream it holds:
    :meth:`close_now` (never blocks; a healthy TLS session still sends ``close_notify``) and
    :meth:`linger_close` (after an error answer: stop writing, read and drop what the client still
    sends for a moment, so the kernel does not answer it with a RST that destroys the answer before
    the client read it — nginx's lingering close).
    """

    YIELD_EVERY = 8   # calls that did not block between two scheduler passes

    # No per-instance dict: every idle connection holds one stream (docs/performance.md, round two).
    __slots__ = ("_fd", "_closed", "_receiving", "_sending", "_unyielded", "_sent_last")

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._closed = False
        self._receiving = False
        self._sending = False
        self._unyielded = 0
        self._sent_last = False   # the last operation was a send: see the receive_some methods

    def fileno(self) -> int:
        return self._fd

    @property
    def closed(self) -> bool:
        return self._closed

    async def _park(self, wait) -> None:
        await park(wait, self._fd)

    async def _maybe_yield(self) -> None:
        self._unyielded += 1
        if self._unyielded >= self.YIELD_EVERY:
            self._unyielded = 0
            await trio.lowlevel.cancel_shielded_checkpoint()

    def _check(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream is closed")

    async def wait_send_all_might_not_block(self) -> None:
        self._check()
        await trio.lowlevel.wait_writable(self._fd)

    # ------------------------------------------------------------------ closing
    def _close_descriptor(self) -> None:
        """Close the descriptor (the subclass's socket object); called once, by :meth:`close_now`."""
        raise NotImplementedError

    def _end_writing(self) -> bool:
        """Stop writing (TLS: ``close_notify``; then FIN). False when there is nothing to linger for."""
        try:
            with _borrowed(self._fd) as raw:
                raw.shutdown(socket.SHUT_WR)
        except OSError:
            return False
        return True

    def close_now(self) -> None:
        """Close at once; never blocks. Parked tasks wake with ``ClosedResourceError``."""
        if self._closed:
            return
        self._closed = True
        release_fd(self._fd)
        self._close_descriptor()

    async def aclose(self) -> None:
        self.close_now()
        await trio.lowlevel.checkpoint()

    async def linger_close(self, timeout_s: float = 0.5, max_bytes: int = 256 * 1024) -> None:
        """Close gracefully after an error answer (see the class docstring)."""
        if self._closed:
            return
        try:
            if self._end_writing():
                with trio.move_on_after(timeout_s), _borrowed(self._fd) as raw:
                    discarded = 0
                    while discarded < max_bytes:
                        try:
                            await trio.lowlevel.wait_readable(self._fd)
                            got = raw.recv(65536, socket.MSG_DONTWAIT)
                        except (BlockingIOError, InterruptedError):
                            continue
                        except (OSError, trio.ClosedResourceError, trio.BusyResourceError):
                            break
                        if not got:
                            break
                        discarded += len(got)
        finally:
            self.close_now()


@contextlib.contextmanager
def _borrowed(fd: int):
    """A stdlib socket object over ``fd`` that does not own it (detached on exit)."""
    raw = socket.socket(fileno=fd)
    try:
        yield raw
    finally:
        raw.detach()


class PlainStream(FdStream, trio.abc.HalfCloseableStream):
    """A trio stream over a connected non-blocking stdlib TCP socket: accepted plain connections and
    every dialled TCP connection (:func:`connect_tcp`).

    ``trio.SocketStream`` costs about 60 Python calls per send or receive (conflict detectors as
    generator context managers, the socket wrapper's non-blocking helper, a scheduler pass each);
    here the system call is tried first, as :class:`FdStream` describes.
    """

    __slots__ = ("socket",)

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        super().__init__(sock.fileno())
        self.socket = sock

    def detach(self) -> socket.socket:
        """Hand the socket over (to be wrapped in TLS); this stream is closed without closing it."""
        self._closed = True
        return self.socket

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("stream is closed")
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        self._receiving = True
        try:
            recv = self.socket.recv
            size = max_bytes or 65536
            blocked = False
            if self._sent_last:
                # Right after a send (a request to the app; outbound, a response to the local
                # client) the answer is not there yet. Rather than registering for readiness at
                # once (an epoll_ctl and a park), let the other tasks run first: under load the
                # answer has come by the time they have, and the recv below takes it without a
                # readiness wait; otherwise it gets EAGAIN and parks as before. −6 % CPU per
                # keep-alive request, −9 % outbound (docs/performance.md). (The TLS stream keeps
                # waiting first: measured, it was no faster there.)
                self._sent_last = False
                blocked = True
                await trio.lowlevel.checkpoint()
            else:
                await trio.lowlevel.checkpoint_if_cancelled()
            while True:
                try:
                    data = recv(size)
                    break
                except (BlockingIOError, InterruptedError):
                    blocked = True
                    await park(trio.lowlevel.wait_readable, self._fd)
                except OSError as exc:
                    raise trio.BrokenResourceError(f"receive: {exc}") from exc
            if not blocked:
                await self._maybe_yield()
            return data
        finally:
            self._receiving = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream is closed")
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            send = self.socket.send
            blocked = False
            with memoryview(data) as view:
                while view:
                    try:
                        sent = send(view)
                    except (BlockingIOError, InterruptedError):
                        blocked = True
                        await park(trio.lowlevel.wait_writable, self._fd)
                        continue
                    except OSError as exc:
                        raise trio.BrokenResourceError(f"send: {exc}") from exc
                    view = view[sent:]
            self._sent_last = True
            if not blocked:
                await self._maybe_yield()
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream is closed")
        await trio.lowlevel.checkpoint()
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise trio.BrokenResourceError(f"shutdown: {exc}") from exc

    def _close_descriptor(self) -> None:
        self.socket.close()


async def park(wait, fd: int) -> None:
    """``await wait(fd)`` (trio's ``wait_readable``/``wait_writable``), with a clear error when the
    stream is closed meanwhile. Shared by :class:`PlainStream` and the TLS stream."""
    try:
        await wait(fd)
    except trio.ClosedResourceError:
        raise trio.ClosedResourceError("stream was closed while waiting") from None


def readable_now(fd: int) -> bool:
    """True when ``fd`` has bytes (or EOF) to read now: one ``poll`` with no wait, no scheduler pass
    (a trio wait parks even when the answer is yes)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLPRI)
    return bool(poller.poll(0))


def release_fd(fd: int) -> None:
    """Before closing ``fd``: wake any task parked on it (with ClosedResourceError)."""
    try:
        trio.lowlevel.notify_closing(fd)
    except (ValueError, OSError):
        pass


def _plain_stream(stream: trio.SocketStream) -> PlainStream:
    """Take a connected ``trio.SocketStream``'s descriptor into a :class:`PlainStream`."""
    sock = stream.socket
    return PlainStream(socket.socket(sock.family, sock.type, sock.proto, fileno=sock.detach()))
