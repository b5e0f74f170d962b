"""Bounded soak of a real ``tlsproxy serve`` process: mixed traffic for a few minutes, then figures.

    .venv/bin/python bench/soak.py --duration 180 [--json out.json]

Not part of the test run. It starts three processes it owns and stops them at the end: the proxy
(``tlsproxy serve``), a small keep-alive upstream app (this file with ``--upstream``), and runs the
clients itself on one trio loop:

* keep-alive clients: GETs of 1 KiB .. 256 KiB bodies on long-lived TLS connections;
* new-connection clients: one full TLS handshake per request (``Connection: close``);
* upload clients: 64 KiB POSTs, Content-Length and chunked;
* a hostile client: smuggling attempts, bad heads, oversized heads (each must get its 4xx),
  and slowloris connections (each must get a 408).

Every answer is checked (status, body length or echo); anything else is an error. Printed at the
end: requests served by kind, errors, the proxy's RSS at start (after start-up), after warm-up and
at the end, its open descriptors at the end (after clients closed), and the load average (the
machine may be shared). Every loop is bounded by ``--duration``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h11
import trio

ROOT = Path(__file__).resolve().parent.parent
TLSPROXY = str(Path(sys.executable).parent / "tlsproxy")


# ---------------------------------------------------------------------------- upstream app (child process)

async def _serve_upstream(port: int) -> None:
    """Keep-alive app: GET /bytes/N → N bytes; POST → the body length; anything → 200."""
    block = b"x" * (256 * 1024)

    async def handle(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                body = 0
                req = None
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        with trio.move_on_after(120):
                            conn.receive_data(await stream.receive_some(65536))
                            continue
                        return
                    if isinstance(event, h11.Request):
                        req = event
                    elif isinstance(event, h11.Data):
                        body += len(event.data)
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    else:
                        return
                assert req is not None
                if req.target.startswith(b"/bytes/"):
                    payload = block[: int(req.target.split(b"/")[2])]
                else:
                    payload = b"%d" % body
                head = h11.Response(status_code=200, headers=[("Content-Length", str(len(payload)))])
                out = conn.send(head)
                out += conn.send(h11.Data(data=payload)) + conn.send(h11.EndOfMessage())
                await stream.send_all(out)
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return
        finally:
            await trio.aclose_forcefully(stream)

    await trio.serve_tcp(handle, port, host="127.0.0.1")


# ---------------------------------------------------------------------------- helpers for the proxy process

def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stats:
    def __init__(self) -> None:
        self.ok: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.first_errors: list[str] = []
        self.latencies: list[float] = []

    def good(self, kind: str, latency: float | None = None) -> None:
        self.ok[kind] = self.ok.get(kind, 0) + 1
        if latency is not None and len(self.latencies) < 200_000:
            self.latencies.append(latency)

    def bad(self, kind: str, why: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        if len(self.first_errors) < 20:
            self.first_errors.append(f"{kind}: {why}")


# ---------------------------------------------------------------------------- clients

async def _connect(port: int, ctx: ssl.SSLContext) -> trio.SSLStream:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    s = trio.SSLStream(tcp, ctx, server_hostname="localhost", https_compatible=True)
    await s.do_handshake()
    return s


async def _exchange(stream: trio.SSLStream, conn: h11.Connection, method: str, target: str,
                    headers: list[tuple[str, str]], body: bytes | None, chunked: bool = False
                    ) -> tuple[int, bytes]:
    out = conn.send(h11.Request(method=method, target=target, headers=[("Host", "localhost"), *headers]))
    if body is not None:
        if chunked:
            for i in range(0, len(body), 16384):
                out += conn.send(h11.Data(data=body[i:i + 16384]))
        else:
            out += conn.send(h11.Data(data=body))
    out += conn.send(h11.EndOfMessage())
    await stream.send_all(out)
    status, data = 0, bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            data += event.data
        elif isinstance(event, h11.EndOfMessage):
            return status, bytes(data)
        else:
            raise RuntimeError(f"unexpected {event!r}")


async def keepalive_client(port: int, ctx: ssl.SSLContext, stats: Stats, until: float, seed: int) -> None:
    sizes = [1024, 16384, 65536, 262144]
    i = seed
    while trio.current_time() < until:
        try:
            with trio.fail_after(30):
                stream = await _connect(port, ctx)
            conn = h11.Connection(h11.CLIENT)
            async with stream:
                for _ in range(200):                  # a fresh connection now and then
                    if trio.current_time() >= until:
                        break
                    size = sizes[i % len(sizes)]
                    i += 1
                    t0 = trio.current_time()
                    with trio.fail_after(30):
                        status, data = await _exchange(stream, conn, "GET", f"/bytes/{size}", [], None)
                    if status == 200 and len(data) == size:
                        stats.good("keepalive_get", trio.current_time() - t0)
                    else:
                        stats.bad("keepalive_get", f"{status} {len(data)}")
                    conn.start_next_cycle()
        except Exception as exc:  # noqa: BLE001 - counted, then a new connection
            stats.bad("keepalive_get", repr(exc)[:200])


async def new_connection_client(port: int, ctx: ssl.SSLContext, stats: Stats, until: float) -> None:
    while trio.current_time() < until:
        t0 = trio.current_time()
        try:
            with trio.fail_after(30):
                stream = await _connect(port, ctx)
                async with stream:
                    status, data = await _exchange(stream, h11.Connection(h11.CLIENT), "GET", "/bytes/1024",
                                                   [("Connection", "close")], None)
            if status == 200 and len(data) == 1024:
                stats.good("new_connection_get", trio.current_time() - t0)
            else:
                stats.bad("new_connection_get", f"{status} {len(data)}")
        except Exception as exc:  # noqa: BLE001
            stats.bad("new_connection_get", repr(exc)[:200])


async def upload_client(port: int, ctx: ssl.SSLContext, stats: Stats, until: float) -> None:
    body = os.urandom(65536)
    n = 0
    while trio.current_time() < until:
        try:
            with trio.fail_after(30):
                stream = await _connect(port, ctx)
            conn = h11.Connection(h11.CLIENT)
            async with stream:
                for _ in range(50):
                    if trio.current_time() >= until:
                        break
                    chunked = n % 2 == 1
                    n += 1
                    headers = [("Transfer-Encoding", "chunked")] if chunked else \
                        [("Content-Length", str(len(body)))]
                    t0 = trio.current_time()
                    with trio.fail_after(30):
                        status, data = await _exchange(stream, conn, "POST", "/upload", headers, body,
                                                       chunked)
                    if status == 200 and data == b"65536":
                        stats.good("upload_post", trio.current_time() - t0)
                    else:
                        stats.bad("upload_post", f"{status} {data[:50]!r}")
                    conn.start_next_cycle()
        except Exception as exc:  # noqa: BLE001
            stats.bad("upload_post", repr(exc)[:200])


HOSTILE = [
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
    (b"GET / HTTP/1.1\nHost: a\n\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    (b"GET /" + b"a" * 40000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: y\r\n" * 150 + b"\r\n", 431),
]


async def hostile_client(port: int, ctx: ssl.SSLContext, stats: Stats, until: float) -> None:
    i = 0
    while trio.current_time() < until:
        raw, expected = HOSTILE[i % len(HOSTILE)]
        i += 1
        try:
            with trio.fail_after(30):
                stream = await _connect(port, ctx)
                async with stream:
                    await stream.send_all(raw)
                    data = b""
                    while b"\r\n" not in data:
                        chunk = await stream.receive_some(65536)
                        if not chunk:
                            break
                        data += chunk
            if data.startswith(b"HTTP/1.1 %d " % expected):
                stats.good("hostile_refused")
            else:
                stats.bad("hostile_refused", f"{raw[:40]!r} -> {data[:60]!r}")
        except Exception as exc:  # noqa: BLE001
            stats.bad("hostile_refused", repr(exc)[:200])
        await trio.sleep(0.05)


async def slowloris_client(port: int, ctx: ssl.SSLContext, stats: Stats, until: float) -> None:
    """One byte every 200 ms; the proxy runs with --head-timeout 2s, so each gets 408 in ~2 s."""
    head = b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"s" * 100 + b"\r\n\r\n"
    while trio.current_time() < until:
        try:
            with trio.fail_after(30):
                stream = await _connect(port, ctx)
                got = b""
                async with stream, trio.open_nursery() as nursery:
                    async def dribble(stream: trio.SSLStream = stream) -> None:
                        for b in head:
                            try:
                                await stream.send_all(bytes([b]))
                            except (trio.BrokenResourceError, trio.ClosedResourceError):
                                return
                            await trio.sleep(0.2)

                    nursery.start_soon(dribble)
                    while True:
                        try:
                            chunk = await stream.receive_some(65536)
                        except trio.BrokenResourceError:
                            break
                        if not chunk:
                            break
                        got += chunk
                    nursery.cancel_scope.cancel()
            if got.startswith(b"HTTP/1.1 408 "):
                stats.good("slowloris_408")
            else:
                stats.bad("slowloris_408", repr(got[:60]))
        except Exception as exc:  # noqa: BLE001
            stats.bad("slowloris_408", repr(exc)[:200])


# ---------------------------------------------------------------------------- the run

def _make_certs(directory: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from tlsproxy.certs import generate

    ca = generate.make_ca("soak CA")
    leaf = generate.issue(ca, "localhost", dns=("localhost",), ips=("127.0.0.1",))
    secret = directory / "secret"
    secret.mkdir()
    (secret / "tls.crt").write_bytes(leaf.cert_pem)
    (secret / "tls.key").write_bytes(leaf.key_pem)
    (secret / "ca.crt").write_bytes(ca.cert_pem)
    (directory / "ca.pem").write_bytes(ca.cert_pem)
    return secret


def _wait_port(port: int, timeout: float = 20) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {port}")


def _metrics(admin_port: int) -> dict[str, float]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10) as r:
        for family in text_string_to_metric_families(r.read().decode()):
            for s in family.samples:
                if s.name in ("tlsproxy_requests_total", "tlsproxy_handshake_failures_total",
                              "tlsproxy_upstream_errors_total", "tlsproxy_client_errors_total",
                              "tlsproxy_connections_total", "tlsproxy_connections_active"):
                    key = s.name + "{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}"
                    out[key] = s.value
    return out


def run(duration: float, keepalive: int, fresh: int, uploads: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="tlsproxy-soak-"))
    secret = _make_certs(tmp)
    up_port, port, admin = _free_port(), _free_port(), _free_port()
    upstream = subprocess.Popen([sys.executable, __file__, "--upstream", str(up_port)])
    log = open(tmp / "proxy.log", "wb")  # noqa: SIM115 - open for the child's whole life
    proxy = subprocess.Popen([TLSPROXY, "serve", "--listen", f"127.0.0.1:{port}",
                              "--admin", f"127.0.0.1:{admin}", "--upstream", f"http://127.0.0.1:{up_port}",
                              "--cert-dir", str(secret), "--access-log", "off", "--log-format", "json",
                              "--head-timeout", "2s", "--drain-delay", "0"], stderr=log)
    result: dict = {"duration_s": duration}
    try:
        _wait_port(up_port)
        _wait_port(port)
        time.sleep(1)
        result["load_avg_start"] = os.getloadavg()
        result["rss_kib_start"] = _rss_kib(proxy.pid)
        result["fds_start"] = _fds(proxy.pid)
        upstream_fds0 = _fds(upstream.pid)
        ctx = ssl.create_default_context(cafile=str(tmp / "ca.pem"))
        stats = Stats()
        samples: list[tuple[float, int, int]] = []

        async def main() -> None:
            t0 = trio.current_time()
            until = t0 + duration
            async with trio.open_nursery() as nursery:
                for i in range(keepalive):
                    nursery.start_soon(keepalive_client, port, ctx, stats, until, i)
                for _ in range(fresh):
                    nursery.start_soon(new_connection_client, port, ctx, stats, until)
                for _ in range(uploads):
                    nursery.start_soon(upload_client, port, ctx, stats, until)
                nursery.start_soon(hostile_client, port, ctx, stats, until)
                nursery.start_soon(slowloris_client, port, ctx, stats, until)
                while trio.current_time() < until:
                    await trio.sleep(min(10, max(0.1, until - trio.current_time())))
                    samples.append((round(trio.current_time() - t0, 1), _rss_kib(proxy.pid), _fds(proxy.pid)))
                    print(f"  t={samples[-1][0]:6.1f}s rss={samples[-1][1]} KiB fds={samples[-1][2]} "
                          f"ok={sum(stats.ok.values())} errors={sum(stats.errors.values())}", flush=True)

        trio.run(main)
        result["load_avg_end"] = os.getloadavg()
        result["rss_kib_after_warmup"] = next((s[1] for s in samples if s[0] >= 10), samples[0][1])
        result["rss_kib_end"] = _rss_kib(proxy.pid)
        result["rss_kib_max"] = max(s[1] for s in samples)
        deadline = time.monotonic() + 10               # clients are closed; let the proxy notice
        while time.monotonic() < deadline and _fds(proxy.pid) > result["fds_start"]:
            time.sleep(0.2)
        result["fds_end"] = _fds(proxy.pid)
        # the proxy keeps idle keep-alive connections to the app (pool.MAX_IDLE): the app's side of them
        result["pooled_upstream_connections_end"] = _fds(upstream.pid) - upstream_fds0
        result["served"] = stats.ok
        result["served_total"] = sum(stats.ok.values())
        result["errors"] = stats.errors
        result["errors_total"] = sum(stats.errors.values())
        result["first_errors"] = stats.first_errors
        lat = sorted(stats.latencies)
        if lat:
            result["latency_ms"] = {"p50": round(lat[len(lat) // 2] * 1000, 2),
                                    "p99": round(lat[int(len(lat) * 0.99)] * 1000, 2),
                                    "max": round(lat[-1] * 1000, 2)}
        result["samples"] = samples
        result["proxy_metrics"] = _metrics(admin)
        result["proxy_alive"] = proxy.poll() is None
        result["cpus"] = os.cpu_count()
    finally:
        for p in (proxy, upstream):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        result["proxy_exit_code"] = proxy.returncode
        log.close()
        result["proxy_log"] = str(tmp / "proxy.log")
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=180.0, help="seconds of load (default 180, max 900)")
    ap.add_argument("--keepalive", type=int, default=4, help="keep-alive GET clients")
    ap.add_argument("--fresh", type=int, default=2, help="one-handshake-per-request clients")
    ap.add_argument("--uploads", type=int, default=1, help="POST clients")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--upstream", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.upstream:
        trio.run(_serve_upstream, args.upstream)
        return 0
    duration = min(max(args.duration, 5.0), 900.0)
    result = run(duration, args.keepalive, args.fresh, args.uploads)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0 if result["errors_total"] == 0 and result["proxy_alive"] else 1


if __name__ == "__main__":
    sys.exit(main())
