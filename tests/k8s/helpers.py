"""Helpers for the tests against the stand-in API server: tlsproxy processes, TLS clients that
trust a Secret's ca.crt, readiness and metrics through the admin port."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from tests.support import TLSPROXY, free_ports

NS = "demo"
SECRET = "web-tls"
NAME = "web.demo.svc"          # a name the provisioned certificate carries (Service "web")


@dataclass
class Proc:
    popen: subprocess.Popen
    port: int
    admin: int
    log: Path
    command: str = "serve"

    def ready(self) -> bool:
        # `serve` has an upstream check (no app runs in most of these tests); the webhook has none,
        # and /readyz answers 400 to an unknown check name
        query = "?exclude=upstream" if self.command == "serve" else ""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/readyz{query}",
                                        timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/metrics", timeout=5) as r:
            return r.read().decode()

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def tlsproxy(tmp: Path, *args: str, upstream_port: int | None = None, command: str = "serve",
             env: dict[str, str] | None = None) -> Iterator[Proc]:
    port, admin = free_ports(2)
    log = Path(tempfile.mkstemp(dir=tmp, prefix="tlsproxy-", suffix=".log")[1])
    argv = [TLSPROXY, command, "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}",
            "--log-format", "json", "--drain-delay", "0", *args]
    if upstream_port is not None:
        argv += ["--upstream", f"http://127.0.0.1:{upstream_port}"]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("TLSPROXY_", "KUBE"))}
    full_env.update(env or {})
    with log.open("wb") as out:
        popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=full_env)
    proc = Proc(popen, port, admin, log, command)
    try:
        yield proc
    finally:
        if popen.poll() is None:
            popen.send_signal(signal.SIGTERM)
            try:
                popen.wait(15)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait(5)


def wait_for(pred, timeout: float = 15, interval: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(interval)
    return pred()


def serial_of(pem: bytes) -> int:
    return x509.load_pem_x509_certificate(pem).serial_number


def fetch(port: int, ca_pem: bytes, name: str = NAME, path: str = "/", timeout: float = 5) -> tuple[int, int]:
    """One HTTPS request through a fresh connection that trusts only ``ca_pem`` and checks ``name``:
    (HTTP status, serial of the certificate served). Raises ssl.SSLError on an unknown CA."""
    ctx = ssl.create_default_context(cadata=ca_pem.decode())
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw, \
            ctx.wrap_socket(raw, server_hostname=name) as tls:
        serial = x509.load_der_x509_certificate(tls.getpeercert(True)).serial_number
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while b"\r\n" not in data:
            chunk = tls.recv(4096)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1]), serial


def served_serial(port: int, ca_pem: bytes, name: str = NAME) -> int | None:
    try:
        return fetch(port, ca_pem, name)[1]
    except (OSError, ssl.SSLError, ValueError, IndexError):
        return None


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total
