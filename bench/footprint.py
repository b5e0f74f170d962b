"""What one sidecar costs a pod: start-up time and idle memory of ``tlsproxy serve``.

``python -m bench.footprint [--starts N] [--json]``

``--tlsproxy PATH`` (repeatable) picks the installs to start, in turn (A B A B…).

- **start-up**: ``N`` times (default 10), exec ``tlsproxy serve --cert-dir DIR`` and measure the time
  from ``Popen`` to the first completed TLS 1.3 handshake on its port (a connect is retried every
  couple of milliseconds, so the figure includes at most that much polling slack), then to the
  first ``/readyz`` 200. The median and the worst of the runs are reported.
- **idle memory**: the RSS (``VmRSS`` from ``/proc``) of one ``tlsproxy serve`` once it is ready and
  has answered one proxied request, after ``IDLE_S`` of quiet.
- **what each dependency costs**: the RSS an interpreter gains by importing each dependency on top
  of the ones a ``serve`` process needs anyway (trio, h11, ssl), and its import time.

Every process is started here and ended by its PID; every wait is bounded.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

STARTS = 10
START_TIMEOUT_S = 20.0
POLL_S = 0.002
IDLE_S = 2.0
TLSPROXY = str(Path(sys.executable).parent / "tlsproxy")
# (label, modules): measured on top of BASE_MODULES, the floor of any serve process.
BASE_MODULES = ("trio", "h11", "ssl")
DEPENDENCIES = (
    ("trio", ("trio",)),
    ("cryptography (x509)", ("cryptography.x509", "cryptography.hazmat.primitives.serialization")),
    ("prometheus-client", ("prometheus_client",)),
    ("watchfiles", ("watchfiles",)),
    ("h11", ("h11",)),
    ("yaml", ("yaml",)),
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _App(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"ok\n")

    def log_message(self, *args) -> None:
        pass


def _pki(work: Path) -> tuple[Path, Path]:
    from tlsproxy.certs import generate

    ca = generate.make_ca("footprint CA")
    leaf = generate.issue(ca, "localhost", dns=("localhost",), ips=("127.0.0.1",))
    certs = work / "certs"
    certs.mkdir()
    (certs / "tls.crt").write_bytes(leaf.cert_pem)
    (certs / "tls.key").write_bytes(leaf.key_pem)
    (work / "ca.pem").write_bytes(ca.cert_pem)
    return certs, work / "ca.pem"


def _handshake(port: int, ctx: ssl.SSLContext) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            return tls.version() == "TLSv1.3"
    except OSError:
        return False


def _get(port: int, path: str, ctx: ssl.SSLContext | None = None) -> int:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as raw:
            s = ctx.wrap_socket(raw, server_hostname="localhost") if ctx else raw
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
            head = s.recv(64)
            return int(head.split()[1]) if head.startswith(b"HTTP/1.") else 0
    except (OSError, ValueError, IndexError):
        return 0


_TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the process has used: the start-up's own work, whatever the load."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * _TICK_S


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class _Serve:
    """One ``tlsproxy serve`` process, started now, stopped by PID."""

    def __init__(self, certs: Path, app_port: int, work: Path, tlsproxy: str = TLSPROXY) -> None:
        self.port, self.admin = _free_port(), _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("TLSPROXY_")}
        self.log = (work / "serve.log").open("ab")
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [tlsproxy, "serve", "--cert-dir", str(certs), "--listen", f"127.0.0.1:{self.port}",
             "--admin", f"127.0.0.1:{self.admin}", "--upstream", f"http://127.0.0.1:{app_port}",
             "--drain-delay", "0", "--log-format", "json"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait(self, ctx: ssl.SSLContext) -> tuple[float, float, float]:
        """Seconds from exec to the first TLS 1.3 handshake, and to the first /readyz 200; and the
        CPU seconds the process had used by the handshake."""
        deadline = self.t0 + START_TIMEOUT_S
        while not _handshake(self.port, ctx):
            if self.proc.poll() is not None or time.perf_counter() > deadline:
                raise RuntimeError(f"tlsproxy serve did not accept TLS (exit {self.proc.poll()})")
            time.sleep(POLL_S)
        tls_s = time.perf_counter() - self.t0
        cpu_s = _cpu_s(self.proc.pid)
        while _get(self.admin, "/readyz") != 200:
            if self.proc.poll() is not None or time.perf_counter() > deadline:
                raise RuntimeError("tlsproxy serve never became ready")
            time.sleep(POLL_S)
        return tls_s, time.perf_counter() - self.t0, cpu_s

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


def _import_cost(modules: tuple[str, ...], base: tuple[str, ...]) -> tuple[float, float]:
    """(MiB, ms) an interpreter gains by importing ``modules`` after ``base``: the median RSS and the
    fastest time of 5 tries (other jobs' load only ever adds time)."""
    code = ("import time\n" + "".join(f"import {m}\n" for m in base)
            + "r0 = [l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1]\n"
            + "t0 = time.perf_counter()\n" + "".join(f"import {m}\n" for m in modules)
            + "t1 = time.perf_counter()\n"
            + "r1 = [l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1]\n"
            + "print(int(r1) - int(r0), t1 - t0)\n")
    runs = []
    for _ in range(5):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        kib, secs = out.stdout.split()
        runs.append((int(kib) / 1024, float(secs) * 1000))
    return statistics.median(r[0] for r in runs), min(r[1] for r in runs)


def _summary(tlsproxy: str, tls: list[float], ready: list[float], cpu: list[float], rss_kib: int) -> dict:
    delays = [r - t for t, r in zip(tls, ready, strict=True)]
    return {
        "tlsproxy": tlsproxy,
        "starts": len(tls),
        "first_tls_ms_median": round(statistics.median(tls) * 1000, 1),
        "first_tls_ms_max": round(max(tls) * 1000, 1),
        "first_tls_cpu_ms_median": round(statistics.median(cpu) * 1000),
        "ready_after_tls_ms_median": round(statistics.median(delays) * 1000, 1),
        "ready_after_tls_ms_max": round(max(delays) * 1000, 1),
        "idle_rss_mib": round(rss_kib / 1024, 1),
    }


def measure(starts: int = STARTS, installs: tuple[str, ...] = (TLSPROXY,), deps: bool = True) -> dict:
    """Start each install ``starts`` times, interleaved (A B A B…: load from other jobs falls on all
    alike), then the dependency costs."""
    app = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _App)
    threading.Thread(target=app.serve_forever, daemon=True).start()
    runs = {t: ([], [], [], 0) for t in installs}
    try:
        with tempfile.TemporaryDirectory(prefix="footprint-") as tmp:
            work = Path(tmp)
            certs, ca = _pki(work)
            ctx = ssl.create_default_context(cafile=str(ca))
            for i in range(starts):
                for tlsproxy in installs:
                    tls_times, ready_times, cpu_times, rss = runs[tlsproxy]
                    serve = _Serve(certs, app.server_address[1], work, tlsproxy)
                    try:
                        tls_s, ready_s, cpu_s = serve.wait(ctx)
                        tls_times.append(tls_s)
                        ready_times.append(ready_s)
                        cpu_times.append(cpu_s)
                        if i == starts - 1:      # the last start also gives the idle memory
                            assert _get(serve.port, "/", ctx) == 200, "a proxied request failed"
                            time.sleep(IDLE_S)
                            runs[tlsproxy] = (tls_times, ready_times, cpu_times, _rss_kib(serve.proc.pid))
                    finally:
                        serve.stop()
    finally:
        app.shutdown()
    costs = {}
    for label, modules in DEPENDENCIES if deps else ():
        base = () if label == "trio" else tuple(m for m in BASE_MODULES if m not in modules)
        mib, ms = _import_cost(modules, base)
        costs[label] = {"rss_mib": round(mib, 1), "import_ms": round(ms, 1)}
    bare = subprocess.run([sys.executable, "-c", "print([l for l in open('/proc/self/status') "
                           "if l.startswith('VmRSS')][0].split()[1])"], capture_output=True, text=True)
    return {
        "installs": [_summary(t, *runs[t]) for t in installs],
        "python_rss_mib": round(int(bare.stdout) / 1024, 1),
        "dependencies": costs,
        "python": sys.version.split()[0],
        "loadavg": round(os.getloadavg()[0], 2),
    }


def render(r: dict) -> str:
    lines = []
    for i in r["installs"]:
        lines += [
            f"{i['tlsproxy']} ({i['starts']} starts):",
            f"  first TLS 1.3 handshake {i['first_tls_ms_median']} ms median ({i['first_tls_ms_max']} ms "
            f"worst), {i['first_tls_cpu_ms_median']} ms of CPU by then",
            f"  /readyz 200 {i['ready_after_tls_ms_median']} ms later "
            f"({i['ready_after_tls_ms_max']} ms worst)",
            f"  idle RSS {i['idle_rss_mib']} MiB",
        ]
    lines += [
        f"a bare python: {r['python_rss_mib']} MiB",
        "dependency             RSS MiB  import ms   (on top of trio, h11 and ssl; trio on a bare python)",
    ]
    for name, d in r["dependencies"].items():
        lines.append(f"{name:<22} {d['rss_mib']:>7}  {d['import_ms']:>9}")
    lines.append(f"python {r['python']}, load average {r['loadavg']:.2f}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.footprint", description=__doc__.split("\n")[0])
    p.add_argument("--starts", type=int, default=STARTS, help=f"starts to time [default: {STARTS}]")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--no-deps", action="store_true", help="skip the per-dependency costs")
    p.add_argument("--tlsproxy", action="append", metavar="PATH",
                   help="a tlsproxy to start, e.g. one installed as the image installs it; repeat it "
                   f"to compare installs, started in turn [default: {TLSPROXY}]")
    ns = p.parse_args(argv)
    if ns.starts < 1:
        p.error("--starts must be at least 1")
    r = measure(ns.starts, tuple(ns.tlsproxy or (TLSPROXY,)), deps=not ns.no_deps)
    sys.stdout.write(json.dumps(r, indent=2) + "\n" if ns.json else render(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
