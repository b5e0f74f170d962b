"""Certificate rotation under load: does a swap ever fail a request, and how soon do new
handshakes see the new certificate?

    .venv/bin/python bench/rotation.py [--duration 30] [--clients 4] [--rotate-every 1] [--style kubelet]

What it does (everything on 127.0.0.1, bounded in time):

* makes a CA and a server certificate and publishes them in a Secret-style directory, written the
  way ``--style`` says: ``kubelet`` (the AtomicWriter's ``..data`` swap, also cert-manager's CSI
  driver), ``cp`` (files rewritten in place one after the other: half-written pairs happen) or
  ``mv`` (each file renamed into place);
* starts a small HTTP app and ``tlsproxy serve --cert-dir`` in front of it (a subprocess);
* runs ``--clients`` threads, each making one request per *new* TLS connection (a fresh handshake
  every time, verified against the CA), counting every failure;
* every ``--rotate-every`` seconds issues a new certificate, writes it, and probes with new
  handshakes until the served serial is the new one: that delay is "swap → new handshake".

It prints the figures and exits 1 if any request failed or a rotation was not seen within 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cryptography import x509  # noqa: E402

from tests.secret_writers import atomic_write, copy_files, move_files, pair_payload  # noqa: E402
from tests.support import app_server  # noqa: E402
from tlsproxy.certs import generate  # noqa: E402

TLSPROXY = str(Path(sys.executable).parent / "tlsproxy")
PROBE_BOUND_S = 5.0       # give up waiting for one rotation to show after this long
REQUEST_TIMEOUT_S = 10.0  # one request (connect + handshake + response)


@dataclass
class Figures:
    duration_s: float = 0.0
    clients: int = 0
    style: str = "kubelet"
    requests: int = 0
    failures: int = 0
    failure_samples: list[str] = field(default_factory=list)
    rotations: int = 0
    rotations_seen: int = 0
    swap_to_handshake_s: list[float] = field(default_factory=list)
    reloads_success: float = 0.0
    reloads_failure: float = 0.0

    def summary(self) -> dict:
        lat = sorted(self.swap_to_handshake_s)
        def pct(p: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))], 3) if lat else None
        return {
            "style": self.style, "duration_s": round(self.duration_s, 1), "clients": self.clients,
            "requests": self.requests, "failed_requests": self.failures,
            "requests_per_s": round(self.requests / self.duration_s, 1) if self.duration_s else 0,
            "rotations": self.rotations, "rotations_seen_by_new_handshakes": self.rotations_seen,
            "swap_to_new_handshake_s": {
                "min": round(lat[0], 3) if lat else None,
                "median": round(statistics.median(lat), 3) if lat else None,
                "p95": pct(0.95), "max": round(lat[-1], 3) if lat else None},
            "proxy_reloads": {"success": self.reloads_success, "failure": self.reloads_failure},
            "failure_samples": self.failure_samples[:5],
        }

    @property
    def ok(self) -> bool:
        return (self.failures == 0 and self.rotations_seen == self.rotations
                and all(s <= 1.0 for s in self.swap_to_handshake_s))


class Proxy:
    """``tlsproxy serve`` as a subprocess; its JSON log lines are read from stderr."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([TLSPROXY, "serve", "--log-format", "json", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[dict] = queue.Queue()
        self.events: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            try:
                self.lines.put(json.loads(line))
            except ValueError:
                self.lines.put({"event": "unparsed", "line": line.rstrip()})

    def wait_event(self, pred, timeout: float = 15) -> dict:
        for ev in self.events:
            if pred(ev):
                return ev
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None and self.lines.empty():
                break
            try:
                ev = self.lines.get(timeout=0.1)
            except queue.Empty:
                continue
            self.events.append(ev)
            if pred(ev):
                return ev
        raise RuntimeError(f"tlsproxy: no such log line; saw {self.events[-10:]}")

    def port_of(self, event: str) -> int:
        ev = self.wait_event(lambda e: e.get("event") == event and "bound" in e)
        return int(ev["bound"].rsplit(":", 1)[1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def served_serial(port: int, ctx: ssl.SSLContext, timeout: float = REQUEST_TIMEOUT_S) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as s:
        der = s.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


def one_request(port: int, ctx: ssl.SSLContext) -> None:
    """A new TCP connection, a new handshake, one GET; raises on anything but a 200."""
    with socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT_S) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    if not data.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"unexpected response: {data[:60]!r}")


def _write(style: str, directory: Path, payload: dict[str, bytes], staging: Path) -> None:
    if style == "kubelet":
        atomic_write(directory, payload)
    elif style == "cp":
        copy_files(directory, payload)
    else:
        move_files(directory, payload, staging=staging)


def _metric(text: str, name: str, labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and all(part in line for part in labels.split(",")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def run(duration_s: float = 30.0, clients: int = 4, rotate_every_s: float = 1.0, style: str = "kubelet",
        workdir: Path | None = None, log=print) -> Figures:
    """Run the benchmark; returns the figures (see the module docstring)."""
    own_tmp = None
    if workdir is None:
        own_tmp = tempfile.TemporaryDirectory(prefix="tlsproxy-rotation-")
        workdir = Path(own_tmp.name)
    figures = Figures(clients=clients, style=style)
    ca = generate.make_ca("rotation bench CA")
    ca_file = workdir / "ca.pem"
    ca_file.write_bytes(ca.cert_pem)
    secret = workdir / "secret"
    staging = workdir / "staging"

    def new_leaf() -> tuple[int, dict[str, bytes]]:
        leaf = generate.issue(ca, "localhost", dns=("localhost",), ips=("127.0.0.1",))
        return leaf.cert.serial_number, pair_payload(leaf.cert_pem, leaf.key_pem, ca.cert_pem)

    _serial0, payload = new_leaf()
    _write(style, secret, payload, staging)
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3

    with app_server() as app:
        proxy = Proxy("--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--upstream", app.url,
                      "--cert-dir", str(secret), "--access-log", "off", "--drain-delay", "0",
                      "--drain-timeout", "5s")
        try:
            port = proxy.port_of("listening")
            admin_port = proxy.port_of("admin listening")
            stop = threading.Event()
            lock = threading.Lock()

            def client() -> None:
                while not stop.is_set():
                    try:
                        one_request(port, ctx)
                        with lock:
                            figures.requests += 1
                    except Exception as exc:  # noqa: BLE001 - every failure is counted
                        with lock:
                            figures.requests += 1
                            figures.failures += 1
                            figures.failure_samples.append(f"{type(exc).__name__}: {exc}")

            threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
            start = time.monotonic()
            for t in threads:
                t.start()
            next_at = start + rotate_every_s
            while next_at < start + duration_s:
                time.sleep(max(0.0, next_at - time.monotonic()))
                serial, payload = new_leaf()
                _write(style, secret, payload, staging)
                swapped = time.monotonic()
                figures.rotations += 1
                while time.monotonic() - swapped < PROBE_BOUND_S:
                    try:
                        if served_serial(port, ctx) == serial:
                            figures.rotations_seen += 1
                            figures.swap_to_handshake_s.append(time.monotonic() - swapped)
                            break
                    except (OSError, ssl.SSLError):
                        pass    # the clients count failures; the probe only measures
                    time.sleep(0.01)
                next_at = max(next_at + rotate_every_s, time.monotonic())
            stop.set()
            for t in threads:
                t.join(REQUEST_TIMEOUT_S + 5)
            figures.duration_s = time.monotonic() - start
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as resp:
                text = resp.read().decode()
            name = "tlsproxy_certificate_reloads_total"
            figures.reloads_success = _metric(text, name, 'result="success"')
            figures.reloads_failure = _metric(text, name, 'result="failure"')
        finally:
            proxy.stop()
    if own_tmp is not None:
        own_tmp.cleanup()
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load (default 30, max 300)")
    p.add_argument("--clients", type=int, default=4, help="client threads (default 4)")
    p.add_argument("--rotate-every", type=float, default=1.0, help="seconds between rotations (default 1)")
    p.add_argument("--style", choices=("kubelet", "cp", "mv"), default="kubelet")
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    ns = p.parse_args(argv)
    duration = min(max(ns.duration, 2.0), 300.0)
    figures = run(duration, max(1, ns.clients), max(0.1, ns.rotate_every), ns.style)
    summary = figures.summary()
    if ns.json:
        print(json.dumps(summary))
    else:
        lat = summary["swap_to_new_handshake_s"]
        print(f"style={summary['style']} duration={summary['duration_s']}s clients={summary['clients']} "
              f"cpus={os.cpu_count()}")
        print(f"requests={summary['requests']} failed={summary['failed_requests']} "
              f"({summary['requests_per_s']} req/s, one new TLS connection per request)")
        print(f"rotations={summary['rotations']} "
              f"seen_by_new_handshakes={summary['rotations_seen_by_new_handshakes']}")
        print(f"swap -> new handshake: min={lat['min']}s median={lat['median']}s p95={lat['p95']}s "
              f"max={lat['max']}s")
        print(f"proxy reloads: success={summary['proxy_reloads']['success']:g} "
              f"failure={summary['proxy_reloads']['failure']:g}")
        for sample in summary["failure_samples"]:
            print(f"  failure: {sample}")
    return 0 if figures.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
