"""--workers N: N real processes sharing one port with SO_REUSEPORT, supervised by the parent.

Black-box: the real ``tlsproxy serve`` binary, real TLS clients, real signals."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.support import TLSPROXY, app_server, client_context, make_pki, wait_for
from tests.support import free_port as _free_port
from tlsproxy.config import HostPort, Settings
from tlsproxy.workers import reserve_port, worker_settings


class Proc:
    """A ``tlsproxy serve --workers N`` process whose JSON log lines we read from a file."""

    def __init__(self, tmp: Path, args: list[str]) -> None:
        self.log_path = tmp / "tlsproxy.log"
        self.log_file = self.log_path.open("wb")
        self.p = subprocess.Popen([TLSPROXY, "serve", "--log-format", "json", *args],
                                  stdout=self.log_file, stderr=subprocess.STDOUT)

    def events(self, name: str | None = None) -> list[dict]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if name is None or ev.get("event") == name:
                out.append(ev)
        return out

    def children(self) -> list[int]:
        started = self.events("workers started")
        return started[0]["pids"] if started else []

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(15)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        for pid in self.children():   # only the processes this test started
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self.log_file.close()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def setup(tmp_path):
    pki = make_pki(tmp_path)
    with app_server() as app:
        yield tmp_path, pki, app


def _start(tmp_path, pki, app, workers: int = 2, *extra: str) -> tuple[Proc, int]:
    proc = Proc(tmp_path, ["--cert-dir", str(pki.cert_dir), "--listen", "127.0.0.1:0",
                           "--admin", f"127.0.0.1:{_free_port()}", "--upstream", f"http://127.0.0.1:{app.port}",
                           "--workers", str(workers), "--drain-delay", "0", "--access-log", "off", *extra])
    ok = wait_for(lambda: len(proc.events("listening")) >= workers or proc.p.poll() is not None, timeout=30)
    assert ok and proc.p.poll() is None, proc.log_path.read_text()
    port = int(proc.events("workers started")[0]["listen"].rsplit(":", 1)[1])
    return proc, port


def _listeners(port: int) -> set[int]:
    """PIDs with a listening socket on ``port`` (ss from iproute2)."""
    out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True, timeout=10)
    return {int(pid) for pid in re.findall(r"pid=(\d+)", out.stdout)}


def _handshakes(admin_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("tlsproxy_handshakes_total{"))


def _get(port: int, ctx: ssl.SSLContext) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as s:
        s.sendall(b"GET /hello HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def test_two_workers_share_the_port_and_both_serve(setup):
    tmp_path, pki, app = setup
    proc, port = _start(tmp_path, pki, app)
    try:
        children = proc.children()
        assert len(children) == 2 and proc.p.pid not in children
        assert _listeners(port) == set(children)           # each worker its own socket, parent none
        ctx = client_context(pki)
        for _ in range(40):
            assert _get(port, ctx).startswith(b"HTTP/1.1 200")
        admins = {e["addr"]: int(e["bound"].rsplit(":", 1)[1]) for e in proc.events("admin listening")}
        assert len(admins) == 2
        admin0 = next(port for addr, port in admins.items() if addr != "127.0.0.1:0")
        worker1 = admins["127.0.0.1:0"]          # worker 1's own admin (ephemeral, loopback)
        # worker 0's /metrics counts every worker: all 40 handshakes
        assert _handshakes(admin0) == 40
        # while worker 1's own admin shows its share: the kernel hashes connections over both
        # sockets (all 40 on one worker has odds 2**-39)
        assert 0 < _handshakes(worker1) < 40
    finally:
        proc.stop()


def test_sighup_reaches_every_worker_and_sigterm_drains_all(setup):
    tmp_path, pki, app = setup
    proc, port = _start(tmp_path, pki, app)
    try:
        children = proc.children()
        proc.p.send_signal(signal.SIGHUP)
        assert wait_for(lambda: len([e for e in proc.events("signal received")
                                     if e.get("signal") == "SIGHUP"]) == 2, timeout=15)
        assert proc.p.poll() is None and all(_alive(c) for c in children)
        assert _get(port, client_context(pki)).startswith(b"HTTP/1.1 200")
        proc.p.send_signal(signal.SIGTERM)
        assert proc.p.wait(30) == 0
        assert not any(_alive(c) for c in children)
        assert len(proc.events("drain finished")) == 2
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        proc.stop()


def test_a_dead_worker_stops_the_set_with_its_status(setup):
    tmp_path, pki, app = setup
    proc, _port = _start(tmp_path, pki, app)
    try:
        first, second = proc.children()
        os.kill(second, signal.SIGKILL)
        assert proc.p.wait(30) == 128 + signal.SIGKILL
        assert wait_for(lambda: not _alive(first), timeout=10)
        assert [e["worker"] for e in proc.events("a worker exited: stopping the others")] == [1]
    finally:
        proc.stop()


def test_shutdown_on_worker_0_admin_stops_every_worker(setup):
    tmp_path, pki, app = setup
    proc, _port = _start(tmp_path, pki, app)
    try:
        started = {e["pid"]: e["worker"] for e in proc.events("worker started")}
        assert sorted(started.values()) == [0, 1]
        admins = {e["addr"]: e["bound"] for e in proc.events("admin listening")}
        assert len(admins) == 2 and "127.0.0.1:0" in admins    # worker 1's admin is ephemeral
        admin0 = next(int(b.rsplit(":", 1)[1]) for a, b in admins.items() if a != "127.0.0.1:0")
        req = urllib.request.Request(f"http://127.0.0.1:{admin0}/shutdown", method="POST")
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.status in (200, 202)
        assert proc.p.wait(30) == 0
        assert not any(_alive(c) for c in started)
    finally:
        proc.stop()


def test_workers_flag_rejects_zero(tmp_path):
    r = subprocess.run([TLSPROXY, "serve", "--workers", "0"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert r.stderr.startswith("tlsproxy: error: --workers:") and "Traceback" not in r.stderr


def test_worker_settings_admin_plain_and_outbound_listeners_on_worker_0_only():
    s = Settings(workers=3, admin=HostPort("", 9901), http_listen=HostPort("", 8080),
                 outbound=("127.0.0.1:7001=https://peer:443",), outbound_proxy=HostPort("127.0.0.1", 3128))
    listen = HostPort("127.0.0.1", 4443)
    w0, w2 = worker_settings(s, 0, listen), worker_settings(s, 2, listen)
    assert w0 == s.replace(listen=listen)
    assert (w2.listen, w2.admin, w2.http_listen, w2.workers) == (listen, HostPort("127.0.0.1", 0), None, 3)
    assert (w2.outbound, w2.outbound_proxy, w2.outbound_routes) == ((), None, ())


def test_reserved_port_is_held_but_never_accepts():
    addr, held = reserve_port(HostPort("127.0.0.1", 0))
    try:
        assert addr.port != 0 and held
        with pytest.raises(ConnectionRefusedError):   # bound, not listening: no connection lands there
            socket.create_connection(("127.0.0.1", addr.port), timeout=2).close()
        plain = socket.socket()
        with pytest.raises(OSError):                  # and nobody without SO_REUSEPORT can take it
            plain.bind(("127.0.0.1", addr.port))
        plain.close()
    finally:
        for s in held:
            s.close()
    assert reserve_port(HostPort("127.0.0.1", 4443)) == (HostPort("127.0.0.1", 4443), [])
