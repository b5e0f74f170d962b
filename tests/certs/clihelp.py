"""Helpers shared by the ``tlsproxy certs`` CLI tests: run the real console script, check errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
