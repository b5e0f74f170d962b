"""Shared pieces of the HTTP/2 tests: a proxy process, a fast upstream, a raw h2 client on a TLS socket."""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.events

from tests.support import PKI, TLSPROXY, accepts, curl, free_port, stop_process, wait_for


@dataclass
class ProxyProcess:
    port: int
    admin: int
    proc: subprocess.Popen

    def rss_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def metrics(self) -> str:
        return curl(f"http://127.0.0.1:{self.admin}/metrics").stdout.decode()


@contextlib.contextmanager
def proxy_process(pki: PKI, upstream: str, *extra: str, log=subprocess.DEVNULL) -> Iterator[ProxyProcess]:
    """A real ``tlsproxy serve`` process (its own interpreter: load tests do not share our GIL)."""
    port, admin = free_port(), free_port()
    proc = subprocess.Popen([TLSPROXY, "serve", "--listen", f"127.0.0.1:{port}",
                             "--admin", f"127.0.0.1:{admin}", "--cert-dir", str(pki.cert_dir),
                             "--upstream", upstream, "--drain-delay", "0",
                             *extra], stdout=log, stderr=log)
    try:
        assert wait_for(lambda: accepts(port), 20), "proxy did not start"
        yield ProxyProcess(port, admin, proc)
    finally:
        stop_process(proc, 30)


class FastApp:
    """A small HTTP/1.1 keep-alive upstream on raw threads: answers ``ok`` to every request (bodies
    with Content-Length are read and dropped). Enough for h2load, far cheaper than http.server."""

    RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.port = self.sock.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        conn.settimeout(60)
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buf) < length:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                buf = buf[length:]
                conn.sendall(self.RESPONSE)
        except OSError:
            return
        finally:
            conn.close()

    def close(self) -> None:
        self._stop = True
        self.sock.close()


@contextlib.contextmanager
def fast_app() -> Iterator[FastApp]:
    app = FastApp()
    try:
        yield app
    finally:
        app.close()


# ---------------------------------------------------------------------------- a raw h2 client

class H2Client:
    """A TLS socket speaking HTTP/2 through the ``h2`` library: well-behaved, or hostile on request."""

    def __init__(self, port: int, pki: PKI, *, timeout: float = 10, settings: dict | None = None) -> None:
        ctx = ssl.create_default_context(cafile=str(pki.ca_file))
        ctx.set_alpn_protocols(["h2"])
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        assert self.sock.selected_alpn_protocol() == "h2"
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = h2.connection.H2Connection(config)
        self.conn.initiate_connection()
        if settings:
            self.conn.update_settings(settings)
        self.port = port
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def headers(self, path: str, method: str = "GET", extra=(), end: bool = True) -> int:
        sid = self.conn.get_next_available_stream_id()
        hdrs = [(b":method", method.encode()), (b":path", path.encode()), (b":scheme", b"https"),
                (b":authority", b"localhost:%d" % self.port), *extra]
        self.conn.send_headers(sid, hdrs, end_stream=end)
        self.flush()
        return sid

    def events(self, timeout: float = 10) -> list | None:
        """Events from the next read: [] on a timeout, None when the connection ended."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return []
        except (ssl.SSLError, OSError):
            return None
        if not data:
            return None
        events = self.conn.receive_data(data)
        self.flush()
        return events

    def response(self, sid: int, timeout: float = 10) -> tuple[int, bytes, dict]:
        """(status, body, trailers) of stream ``sid``; acknowledges data as it comes."""
        deadline = time.monotonic() + timeout
        status, body, trailers = 0, bytearray(), {}
        while time.monotonic() < deadline:
            events = self.events(max(0.01, deadline - time.monotonic()))
            if events is None:
                break
            for ev in events:
                if getattr(ev, "stream_id", None) != sid:
                    continue
                if isinstance(ev, h2.events.ResponseReceived):
                    status = int(dict(ev.headers)[b":status"])
                elif isinstance(ev, h2.events.DataReceived):
                    body += ev.data
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                    self.flush()
                elif isinstance(ev, h2.events.TrailersReceived):
                    trailers = dict(ev.headers)
                elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                    return status, bytes(body), trailers
        return status, bytes(body), trailers

    def get(self, path: str, timeout: float = 10) -> tuple[int, bytes, dict]:
        return self.response(self.headers(path), timeout)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
