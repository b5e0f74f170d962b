"""Helpers for the hostile suite: scripted raw upstreams, a recording upstream, raw TLS clients.

Every upstream here is a real listening socket on 127.0.0.1 served by a thread; every wait is
bounded. ``ScriptedUpstream`` runs a behaviour function per accepted connection, so a test can
make the "app" misbehave in exactly one way (reset mid-body, answer twice, stall, ...) and record
what it received.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import h11

from tests.support import PKI, client_context


def status_of(data: bytes) -> int:
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0


# ---------------------------------------------------------------------------- upstreams

@dataclass
class Conn:
    """One accepted upstream connection, for a behaviour function."""

    sock: socket.socket
    index: int                                   # 0 for the first connection the upstream accepted
    received: bytearray = field(default_factory=bytearray)
    sink: bytearray | None = None                # every byte read from the proxy, for assertions
    body: bytes = b""                            # body of the last request read

    def read_request(self, timeout: float = 10) -> h11.Request | None:
        """Read one complete request (head and body) with h11; None when the connection ended
        (or the timeout passed) before the request was complete."""
        parser = h11.Connection(h11.SERVER)
        if self.received:
            parser.receive_data(bytes(self.received))
            self.received.clear()
        req = None
        body = bytearray()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            event = parser.next_event()
            if event is h11.NEED_DATA:
                self.sock.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    data = self.sock.recv(65536)
                except OSError:
                    return None
                if self.sink is not None:
                    self.sink += data
                parser.receive_data(data)
                if not data:
                    return None
                continue
            if isinstance(event, h11.Request):
                req = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                self.received.extend(parser.trailing_data[0])
                self.body = bytes(body)
                return req
            elif isinstance(event, h11.ConnectionClosed):
                return None
        return None

    def reset(self) -> None:
        """Close with RST (SO_LINGER 0) instead of FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


Behaviour = Callable[[Conn], None]


class ScriptedUpstream:
    """A TCP server that runs ``behaviour(conn)`` for every connection; records request targets."""

    def __init__(self, behaviour: Behaviour, port: int = 0) -> None:
        self.behaviour = behaviour
        self.requests: list[bytes] = []          # targets of every request a behaviour read
        self.raw = bytearray()                   # every byte any connection received
        self.seen: list[tuple[h11.Request, bytes]] = []   # complete requests read, with bodies
        self.connections = 0
        self._srv = socket.socket()
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._srv.bind(("127.0.0.1", port))
        self._srv.listen(128)
        self._srv.settimeout(0.1)
        self.port = self._srv.getsockname()[1]
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._srv.accept()
            except (TimeoutError, OSError):
                continue
            conn = Conn(sock, self.connections, sink=self.raw)
            self.connections += 1
            self._socks.append(sock)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: Conn) -> None:
        orig = conn.read_request

        def recording(timeout: float = 10) -> h11.Request | None:
            req = orig(timeout)
            if req is not None:
                self.requests.append(req.target)
                self.seen.append((req, conn.body))
            return req

        conn.read_request = recording   # type: ignore[method-assign]
        try:
            self.behaviour(conn)
        except (OSError, h11.ProtocolError):
            pass            # the proxy closed or sent something h11 refuses: end this connection
        finally:
            with contextlib.suppress(OSError):
                conn.sock.close()

    def start(self) -> ScriptedUpstream:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting and close every connection (a restarted app loses them all)."""
        self._stop.set()
        self._thread.join(5)
        self._srv.close()
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()


@contextlib.contextmanager
def scripted_upstream(behaviour: Behaviour, port: int = 0) -> Iterator[ScriptedUpstream]:
    up = ScriptedUpstream(behaviour, port).start()
    try:
        yield up
    finally:
        up.stop()


def ok_response(body: bytes = b"ok", extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n" % len(body)) + extra + b"\r\n" + body


def keepalive_ok(conn: Conn) -> None:
    """A well-behaved keep-alive app: answers every request with its target as the body."""
    while True:
        req = conn.read_request()
        if req is None:
            return
        conn.sock.sendall(ok_response(req.target))


# ---------------------------------------------------------------------------- raw TLS clients

def tls_socket(port: int, pki: PKI, timeout: float = 10) -> ssl.SSLSocket:
    ctx = client_context(pki)
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return ctx.wrap_socket(raw, server_hostname="localhost")


def read_all(sock: socket.socket, timeout: float = 10, limit: int = 64 << 20) -> tuple[bytes, str]:
    """Read until EOF; returns (data, how) where how is "eof", "reset" or "timeout"."""
    chunks: list[bytes] = []
    total = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and total < limit:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except (ssl.SSLError, ConnectionError, OSError):
            return b"".join(chunks), "reset"
        if not chunk:
            return b"".join(chunks), "eof"
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks), "timeout"


def parse_responses(data: bytes) -> list[tuple[int, bytes]]:
    """Split a byte stream of responses (to GET requests) into (status, body) pairs with h11."""
    c = h11.Connection(h11.CLIENT)
    out: list[tuple[int, bytes]] = []
    c.receive_data(data)
    c.receive_data(b"")
    status, body = 0, bytearray()
    while True:
        if c.our_state is h11.IDLE:
            c.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
            c.send(h11.EndOfMessage())
        try:
            event = c.next_event()
        except h11.RemoteProtocolError:
            return out
        if isinstance(event, h11.Response):
            status, body = event.status_code, bytearray()
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            out.append((status, bytes(body)))
            if c.our_state is h11.DONE and c.their_state is h11.DONE:
                c.start_next_cycle()
            else:
                return out
        else:
            return out


# ---------------------------------------------------------------------------- the proxy as a process

class ProxyProcess:
    """``tlsproxy serve`` as a child process (JSON logs on stderr, collected by a thread), for what a
    thread cannot show: its own RSS, its own descriptors, its own ``ulimit -n``."""

    def __init__(self, args: list[str], nofile: int | None = None) -> None:
        import json
        import resource
        import subprocess

        from tests.support import TLSPROXY

        def limit() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.events: list[dict] = []
        self._json = json
        self.proc = subprocess.Popen([TLSPROXY, "serve", "--log-format", "json", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     preexec_fn=limit)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = self.admin_port = 0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (self.port and self.admin_port):
            for e in list(self.events):
                if e.get("event") == "listening" and e.get("listener") == "inbound":
                    self.port = int(e["bound"].rsplit(":", 1)[1])
                if e.get("event") == "admin listening":
                    self.admin_port = int(e["bound"].rsplit(":", 1)[1])
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        if not (self.port and self.admin_port):
            self.stop()
            raise RuntimeError(f"tlsproxy did not start: {self.events[-5:]}")

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            try:
                self.events.append(self._json.loads(line))
            except ValueError:
                self.events.append({"event": "raw", "line": line.decode(errors="replace")})

    def count(self, event: str) -> int:
        return sum(1 for e in list(self.events) if e.get("event") == event)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def fds(self) -> int:
        import os

        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def metric(self, name: str, **labels: str) -> float:
        """One sample from the admin /metrics (0 when absent)."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        return 0.0

    def stop(self) -> int | None:
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)
        return self.proc.returncode


def proxy_args(pki: PKI, upstream_port: int, *extra: str) -> list[str]:
    return ["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--upstream",
            f"http://127.0.0.1:{upstream_port}", "--cert-dir", str(pki.cert_dir), "--drain-delay", "0",
            "--access-log", "off", *extra]


@contextlib.contextmanager
def proxy_process(pki: PKI, upstream_port: int, *extra: str, nofile: int | None = None
                  ) -> Iterator[ProxyProcess]:
    proc = ProxyProcess(proxy_args(pki, upstream_port, *extra), nofile=nofile)
    try:
        yield proc
    finally:
        proc.stop()
