"""Helpers shared by the ``tlsproxy certs`` CLI tests: run the real console script, check errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support import free_port, stop_process

TLSPROXY = Path(sys.executable).parent / "tlsproxy"


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    assert TLSPROXY.exists(), "console script missing: run `.venv/bin/pip install -e .`"
    return subprocess.run([str(TLSPROXY), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def assert_usage_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 2, exactly one stderr line ``tlsproxy: error: ...`` containing every needle, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("tlsproxy: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def openssl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, timeout=30)


def handshake(server_ctx, client_ctx, server_hostname: str, timeout: float = 10.0) -> dict:
    """One real TLS handshake over 127.0.0.1 between two ``ssl`` contexts (server in a thread).

    Returns ``{"peer_der": bytes | None, "version": str, "server_error": str | None,
    "client_cert_der": bytes}``; raises the client's ``ssl.SSLError`` if the client refuses.
    """
    import socket
    import threading

    result: dict = {"peer_der": None, "server_error": None}
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(timeout)
    port = listener.getsockname()[1]

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            conn.settimeout(timeout)
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                result["peer_der"] = tls.getpeercert(binary_form=True)
                tls.sendall(b"ok")
        except Exception as exc:  # reported to the test through result
            result["server_error"] = repr(exc)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw, \
                client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
            result["version"] = tls.version()
            result["server_cert_der"] = tls.getpeercert(binary_form=True)
            result["data"] = tls.recv(16)
    finally:
        t.join(timeout)
        listener.close()
    return result


class _Echo:
    """A plain-HTTP app on 127.0.0.1 that answers every GET with its request headers as JSON."""

    def __enter__(self):
        import http.server
        import json
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


class LiveProxy:
    """``tlsproxy serve`` as a subprocess in front of an echo app; ready when /readyz says 200."""

    def __init__(self, *args: str, ready_timeout: float = 15.0) -> None:
        self.args = [str(a) for a in args]
        self.ready_timeout = ready_timeout

    def __enter__(self):
        import time
        import urllib.request

        self.app = _Echo().__enter__()
        self.port, admin = free_port(), free_port()
        self.proc = subprocess.Popen(
            [str(TLSPROXY), "serve", "--listen", f"127.0.0.1:{self.port}", "--admin", f"127.0.0.1:{admin}",
             "--upstream", f"http://127.0.0.1:{self.app.port}", "--drain-delay", "0s",
             "--drain-timeout", "2s", *self.args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.ready_timeout
        try:
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError("tlsproxy exited: " + self.proc.stdout.read().decode())
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1) as r:
                        if r.status == 200:
                            return self
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError("tlsproxy did not become ready")
                time.sleep(0.1)
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc):
        stop_process(self.proc)
        self.proc.stdout.close()
        self.app.__exit__()

    def curl(self, name: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["curl", "-sS", "--max-time", "10",
                               "--resolve", f"{name}:{self.port}:127.0.0.1",
                               *map(str, args), f"https://{name}:{self.port}/"],
                              capture_output=True, text=True, timeout=20)
