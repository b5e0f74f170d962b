"""``--workers N``: N processes, each a whole tlsproxy, sharing the listening port with SO_REUSEPORT.

Theory of operation
-------------------
One Python process runs one trio loop on one core, so a second core needs a second process. The
parent process forks N workers *before* any trio loop or thread exists; each worker builds its own
:class:`~tlsproxy.app.App` and binds its own listening socket on the same address with
``SO_REUSEPORT`` (``net.Listener.reuse_port``): the kernel then spreads new connections over
the workers' accept queues by a hash of the connection's addresses. No socket is shared, so there
is no thundering herd and no lock; a worker that is busy handshaking does not steal connections it
cannot serve yet from the others' queues (connections are assigned at SYN time).

Port 0 (tests): the parent reserves a port by *binding without listening* (with SO_REUSEPORT): a
socket that does not listen never receives connections, yet it keeps the port for the workers.

What only worker 0 does: the admin listener (``--admin``: /healthz, /readyz, /metrics, /shutdown)
and the plain-HTTP listener (``--http-listen``, usually redirects), and the outbound listeners
(``--outbound``, ``--outbound-proxy``: fixed local ports). The other workers put their
admin listener on an ephemeral loopback port and run no plain listener.

/metrics counts every worker. The parent makes a private directory before forking
(:class:`WorkerSet`); each worker but 0 writes its admin port there once bound. Worker 0's /metrics
scrapes the others' admin listeners over loopback (``GET /metrics``, within
``WORKER_SCRAPE_TIMEOUT_S``) and merges their samples with its own
(:func:`~tlsproxy.metrics.merge_expositions`: counters and histograms add up). A worker that does
not answer in time is left out of that one scrape, and the scrape says so in a log line.

The parent does no I/O of its own: it forwards SIGTERM, SIGINT and SIGHUP to every worker, waits
for them, and when one worker exits (a crash, or a drain started by POST /shutdown on worker 0)
it sends SIGTERM to the others so the set drains together. Exit status: 0 when every worker
exited 0, else the first non-zero status seen. Workers live in their own process group (a
terminal's Ctrl-C reaches the parent only, which forwards it once) and die with the parent
(``PR_SET_PDEATHSIG``), so a SIGKILLed parent leaves no orphan listening on the port.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from .config import HostPort, Settings
from .errors import UpstreamError
from .log import get_logger
from .metrics import merge_expositions
from .net import connect_tcp

log = get_logger("workers")

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1
WORKER_SCRAPE_TIMEOUT_S = 2.0        # a worker's /metrics is a loopback call of a few milliseconds
MAX_WORKER_METRICS_BYTES = 16 << 20  # a sane bound on one worker's exposition


@dataclass(frozen=True)
class WorkerSet:
    """What one worker knows of the set: its index and the directory the workers share."""

    index: int
    share: Path

    def announce_admin(self, admin: HostPort) -> None:
        """Workers 1..N-1: tell worker 0 where this worker's /metrics is (written atomically)."""
        if self.index == 0:
            return
        tmp = self.share / f".worker-{self.index}.admin"
        tmp.write_text(str(admin.port))
        tmp.replace(self.share / f"worker-{self.index}.admin")

    async def metrics(self, own: bytes) -> bytes:
        """Worker 0: its own exposition merged with every other worker's (see the module docstring)."""
        texts = [own.decode()]
        for path in sorted(self.share.glob("worker-*.admin")):
            try:
                port = int(path.read_text())
            except (OSError, ValueError):
                continue
            text = await _scrape(port)
            if text is None:
                log.warning("worker metrics not scraped", file=path.name, port=port,
                            timeout_s=WORKER_SCRAPE_TIMEOUT_S)
                continue
            texts.append(text)
        return merge_expositions(texts)


async def _scrape(port: int) -> str | None:
    """``GET /metrics`` from a worker's loopback admin listener; None when it does not answer."""
    with trio.move_on_after(WORKER_SCRAPE_TIMEOUT_S):
        try:
            stream = await connect_tcp("127.0.0.1", port, WORKER_SCRAPE_TIMEOUT_S)
        except UpstreamError:
            return None
        try:
            await stream.send_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            data = bytearray()
            while len(data) <= MAX_WORKER_METRICS_BYTES and (chunk := await stream.receive_some(65536)):
                data += chunk
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return None
        finally:
            stream.close_now()
        head, _, body = bytes(data).partition(b"\r\n\r\n")
        if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
            return None
        return body.decode("utf-8", "replace")
    return None


def reserve_port(addr: HostPort) -> tuple[HostPort, list[socket.socket]]:
    """For port 0, pick one free port for every address of ``addr`` and hold it by binding (not
    listening) with SO_REUSEPORT. Returns the concrete address and the sockets to keep open."""
    if addr.port != 0:
        return addr, []
    if addr.host:
        infos = [(i[0], i[4]) for i in socket.getaddrinfo(addr.host, 0, type=socket.SOCK_STREAM,
                                                           flags=socket.AI_PASSIVE)]
    else:
        infos = [(socket.AF_INET6, ("::", 0, 0, 0))] if socket.has_ipv6 \
            else [(socket.AF_INET, ("0.0.0.0", 0))]
    held: list[socket.socket] = []
    port = 0
    try:
        for family, sockaddr in infos:
            s = socket.socket(family, socket.SOCK_STREAM)
            held.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if addr.host else 0)
            s.bind((sockaddr[0], port, *sockaddr[2:]))
            port = s.getsockname()[1]
    except OSError as exc:
        for s in held:
            s.close()
        raise OSError(exc.errno, f"cannot listen on {addr}: {exc.strerror}") from None
    return HostPort(addr.host, port), held


def worker_settings(settings: Settings, index: int, listen: HostPort) -> Settings:
    """What worker ``index`` runs: the shared listen address; admin and plain HTTP on worker 0 only.
    ``workers`` stays N, which makes the App bind with SO_REUSEPORT."""
    if index == 0:
        return settings.replace(listen=listen)
    # Outbound listeners (plain, fixed local ports) run on worker 0 only, like the plain listener.
    return settings.replace(listen=listen, admin=HostPort("127.0.0.1", 0), http_listen=None,
                            outbound=(), outbound_routes=(), outbound_proxy=None)


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass   # not Linux: a SIGKILLed parent may leave workers behind


def run_workers(settings: Settings, run_one: Callable[[Settings, WorkerSet], int]) -> int:
    """Fork ``settings.workers`` processes, each calling ``run_one(worker_settings, WorkerSet)``
    (which runs the App and returns an exit code); supervise them as described above."""
    n = settings.workers
    listen, held = reserve_port(settings.listen)
    share = Path(tempfile.mkdtemp(prefix="tlsproxy-workers-"))
    try:
        return _fork_and_supervise(settings, run_one, n, listen, held, share)
    finally:
        shutil.rmtree(share, ignore_errors=True)


def _fork_and_supervise(settings: Settings, run_one: Callable[[Settings, WorkerSet], int], n: int,
                        listen: HostPort, held: list[socket.socket], share: Path) -> int:
    parent = os.getpid()
    children: dict[int, int] = {}          # pid -> worker index
    sys.stdout.flush()
    sys.stderr.flush()
    for index in range(n):
        pid = os.fork()
        if pid == 0:                       # the worker
            code = 1
            try:
                os.setpgid(0, 0)
                _die_with_parent()
                if os.getppid() != parent:  # the parent died before PDEATHSIG was armed
                    os._exit(1)
                for s in held:
                    s.close()
                for sig in FORWARDED_SIGNALS:
                    signal.signal(sig, signal.SIG_DFL)
                log.info("worker started", worker=index, pid=os.getpid())
                code = run_one(worker_settings(settings, index, listen), WorkerSet(index, share))
            except SystemExit as exc:
                code = int(exc.code or 0) if not isinstance(exc.code, str) else 1
            except BaseException as exc:   # noqa: BLE001 - a worker must never fall into the parent's code
                sys.stderr.write(f"tlsproxy: worker {index}: {exc!r}\n")
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = index
    log.info("workers started", workers=n, listen=str(listen), pids=sorted(children))
    return _supervise(children, held)


def _supervise(children: dict[int, int], held: list[socket.socket]) -> int:
    stopping = False
    status = 0

    def forward(signum, _frame) -> None:
        nonlocal stopping
        if signum != signal.SIGHUP:
            stopping = True
        # SIGINT becomes SIGTERM: one clean drain in every worker (a worker's second signal means "now")
        sent = signal.SIGTERM if signum == signal.SIGINT else signum
        for pid in list(children):
            _kill(pid, sent)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        while children:
            try:
                pid, wstatus = os.wait()
            except ChildProcessError:
                break
            index = children.pop(pid, None)
            if index is None:
                continue
            code = os.waitstatus_to_exitcode(wstatus)
            if code < 0:
                code = 128 - code          # killed by a signal: the shell's convention
            if code and not status:
                status = code
            log.info("worker exited", worker=index, pid=pid, code=code)
            if not stopping and children:
                stopping = True
                log.warning("a worker exited: stopping the others", worker=index, code=code)
                for other in list(children):
                    _kill(other, signal.SIGTERM)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for s in held:
            s.close()
    return status


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError as exc:
        if exc.errno != errno.ESRCH:
            raise

