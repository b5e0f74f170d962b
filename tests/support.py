"""Test support: real PKI on disk, a real upstream app, the proxy running in its own thread.

Tests talk to the proxy with real clients (curl, openssl, Python ssl/httpx) over 127.0.0.1. The
proxy runs its own trio loop in a thread, so synchronous clients can be used directly.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import logging
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import trio

from tlsproxy.app import App
from tlsproxy.certs import generate
from tlsproxy.config import HostPort, Settings, Upstream

ROOT = Path(__file__).resolve().parent.parent
TLSPROXY = str(Path(sys.executable).parent / "tlsproxy")


@dataclass
class PKI:
    dir: Path
    ca: generate.Issued
    ca_file: Path
    cert_dir: Path          # Secret layout: tls.crt, tls.key, ca.crt

    def issue(self, name: str, **kw) -> generate.Issued:
        return generate.issue(self.ca, name, **kw)

    def write_pair(self, directory: Path, issued: generate.Issued, ca: bool = True) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "tls.crt").write_bytes(issued.cert_pem)
        (directory / "tls.key").write_bytes(issued.key_pem)
        if ca:
            (directory / "ca.crt").write_bytes(self.ca.cert_pem)
        return directory


def make_pki(tmp: Path) -> PKI:
    ca = generate.make_ca("test CA")
    ca_file = tmp / "ca.pem"
    ca_file.write_bytes(ca.cert_pem)
    pki = PKI(tmp, ca, ca_file, tmp / "secret")
    leaf = generate.issue(ca, "localhost", dns=("localhost",), ips=("127.0.0.1", "::1"))
    pki.write_pair(pki.cert_dir, leaf)
    return pki


# ---------------------------------------------------------------------------- the upstream app

@dataclass
class Seen:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body_len: int

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


@dataclass
class AppServer:
    port: int
    seen: list[Seen] = field(default_factory=list)
    server: http.server.ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class _EchoHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    app: AppServer

    def log_message(self, *args) -> None:  # quiet
        pass

    def _body(self, hasher=None) -> int:
        total = 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                remaining = size
                while remaining:
                    chunk = self.rfile.read(min(remaining, 1 << 20))
                    if hasher is not None:
                        hasher.update(chunk)
                    remaining -= len(chunk)
                    total += len(chunk)
                self.rfile.readline()
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining:
                chunk = self.rfile.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                if hasher is not None:
                    hasher.update(chunk)
                remaining -= len(chunk)
                total += len(chunk)
        return total

    def _handle(self) -> None:
        hasher = hashlib.sha256() if self.path == "/sha256" else None
        n = self._body(hasher)
        self.app.seen.append(Seen(self.command, self.path, list(self.headers.items()), n))
        path = self.path
        if path.startswith("/bytes/"):
            size = int(path.split("/")[2])
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            if self.command != "HEAD":
                block = b"x" * (1 << 20)
                left = size
                while left:
                    part = block[: min(left, len(block))]
                    self.wfile.write(part)
                    left -= len(part)
            return
        if hasher is not None:          # the SHA-256 of the request body, in hex
            digest = hasher.hexdigest().encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(digest)))
            self.end_headers()
            self.wfile.write(digest)
            return
        if path.startswith("/status/"):
            code = int(path.split("/")[2])
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if path.startswith("/sleep/"):
            time.sleep(float(path.split("/")[2]))
        payload = json.dumps({"method": self.command, "path": path, "body_len": n,
                              "headers": dict(self.headers.items())}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Connection", "keep-alive")
        self.send_header("Keep-Alive", "timeout=5")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _handle


@contextlib.contextmanager
def app_server(port: int = 0) -> Iterator[AppServer]:
    """The echo app on 127.0.0.1 (``port`` to have it come back on the same one)."""
    app = AppServer(port)
    handler = type("Handler", (_EchoHandler,), {"app": app})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    app.port = server.server_address[1]
    app.server = server
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield app
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def captured_logs(logger: str = "tlsproxy", level: int = logging.INFO) -> Iterator[list[logging.LogRecord]]:
    """Every record ``logger`` (and its children) emits while the block runs, from any thread."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level)
    handler.emit = records.append
    log = logging.getLogger(logger)
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(level)
    try:
        yield records
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)


# ---------------------------------------------------------------------------- the proxy in a thread

class ProxyThread:
    """Runs an App on its own trio loop in a thread; ``stop()`` drains it like SIGTERM would."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.token: trio.lowlevel.TrioToken | None = None
        self.error: BaseException | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        async def run() -> None:
            self.token = trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as nursery:
                await nursery.start(self.app.run)
                self._started.set()
        try:
            trio.run(run)
        except BaseException as exc:  # surfaced by start()/stop()
            self.error = exc
        finally:
            self._started.set()

    def start(self) -> ProxyThread:
        self._thread.start()
        if not self._started.wait(15):
            raise RuntimeError("proxy did not start")
        if self.error:
            raise self.error
        return self

    def call(self, fn, *args):
        """Run ``fn(*args)`` on the proxy's loop and return its result (works from any thread,
        including another trio loop's)."""
        assert self.token is not None
        done = threading.Event()
        box: list = []

        def run() -> None:
            try:
                box.append((True, fn(*args)))
            except BaseException as exc:
                box.append((False, exc))
            done.set()

        self.token.run_sync_soon(run)
        if not done.wait(10):
            raise RuntimeError("proxy loop did not answer")
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def stop(self, timeout: float = 30) -> None:
        if self._thread.is_alive() and self.token is not None:
            with contextlib.suppress(trio.RunFinishedError, RuntimeError):
                self.call(self.app.request_drain)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError("proxy did not stop")
        if self.error:
            raise self.error

    @property
    def port(self) -> int:
        return self.app.bound.tls.port

    @property
    def admin_port(self) -> int:
        return self.app.bound.admin.port

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"


def settings_for(pki: PKI, upstream_port: int, **changes) -> Settings:
    base = Settings(listen=HostPort("127.0.0.1", 0), admin=HostPort("127.0.0.1", 0),
                    upstream=Upstream("http", "127.0.0.1", upstream_port), cert_dir=pki.cert_dir,
                    log_format="text", drain_delay_s=0.0)
    return base.replace(**changes)


@contextlib.contextmanager
def running_proxy(settings: Settings) -> Iterator[ProxyThread]:
    proxy = ProxyThread(App(settings)).start()
    try:
        yield proxy
    finally:
        proxy.stop()


# ---------------------------------------------------------------------------- clients

def client_context(pki: PKI, **kw) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    for k, v in kw.items():
        setattr(ctx, k, v)
    return ctx


def tls_connect(port: int, pki: PKI, host: str = "127.0.0.1", timeout: float = 10) -> ssl.SSLSocket:
    ctx = client_context(pki)
    raw = socket.create_connection((host, port), timeout=timeout)
    return ctx.wrap_socket(raw, server_hostname="localhost")


def raw_exchange(port: int, pki: PKI, data: bytes, timeout: float = 10,
                 read_until_close: bool = True) -> bytes:
    """Send raw bytes over TLS; read until the proxy closes (or timeout)."""
    with tls_connect(port, pki, timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except (ssl.SSLError, OSError):
                break
            if not chunk:
                break
            chunks.append(chunk)
            if not read_until_close and b"\r\n\r\n" in b"".join(chunks):
                break
        return b"".join(chunks)


def curl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", str(timeout), *args], capture_output=True,
                          timeout=timeout + 5)


def free_ports(n: int) -> list[int]:
    """n distinct free ports on 127.0.0.1, all held while picking so none is handed out twice.
    Start whatever binds port 0 later only after the processes using these have bound them."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def wait_for(pred, timeout: float = 10, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


@contextlib.contextmanager
def websockets_app(handler, **kw) -> Iterator[int]:
    """A real WebSocket app (the ``websockets`` library's sync server) on 127.0.0.1 in a thread;
    yields its port. ``kw`` goes to ``websockets.sync.server.serve`` (process_request, close_timeout…)."""
    from websockets.sync.server import serve

    with serve(handler, "127.0.0.1", 0, **kw) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield server.socket.getsockname()[1]
        finally:
            server.shutdown()
            thread.join(5)


NGINX_TLS13_CONF = """
daemon off;
master_process off;
worker_processes 1;
error_log {dir}/error.log;
pid {dir}/nginx.pid;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy; fastcgi_temp_path {dir}/fcgi;
  uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_protocols TLSv1.3;
    ssl_certificate {cert_dir}/tls.crt;
    ssl_certificate_key {cert_dir}/tls.key;
    {extra}
    location / {{ proxy_pass http://127.0.0.1:{upstream}; proxy_http_version 1.1; }}
  }}
}}
"""


@contextlib.contextmanager
def nginx_tls13(cert_dir: Path, upstream_port: int, directory: Path, extra: str = "") -> Iterator[int]:
    """nginx as a TLS 1.3-only terminator with ``cert_dir``'s ``tls.crt``/``tls.key`` in front of
    ``upstream_port`` (one process, no master): the reference the scanner and conformance tests
    hold tlsproxy to. ``extra``: more ``server`` directives (a second certificate, curves). Yields
    its port; skips the test when nginx is not installed."""
    import pytest

    if shutil.which("nginx") is None:
        pytest.skip("nginx is not installed (make deps)")
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "nginx.conf"
    conf.write_text(NGINX_TLS13_CONF.format(dir=directory, port=port, cert_dir=cert_dir,
                                            upstream=upstream_port, extra=extra))
    env = {k: v for k, v in os.environ.items() if k != "OPENSSL_CONF"}   # nginx says it in its own file
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(directory)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if not wait_for(lambda: accepts(port), timeout=10):
            raise RuntimeError("nginx did not start: " + (directory / "error.log").read_text())
        yield port
    finally:
        stop_process(proc)


def accepts(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port`` now."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def stop_process(proc: subprocess.Popen, timeout: float = 10) -> None:
    """End a process a test started: SIGTERM, then SIGKILL if it has not exited in ``timeout``."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
