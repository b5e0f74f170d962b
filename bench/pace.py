"""Row (g): HTTP/1.1-over-TLS requests at evenly spaced times, latency counted from the planned time.

Why not h2load alone
--------------------
``h2load --rps`` gives each client a timer that ticks at most every 10 ms and sends a tick's worth
of requests at once, and the ticks of its clients start wherever their handshakes happened to
end. So "10 clients x 100 req/s" is 1,000 req/s in bursts of 1 to 10 requests at random phases:
in its logs half of all requests start within 2 µs of another. A proxy that spends 0.3 ms of CPU
per request then shows a p99 that depends mostly on how the ten timers lined up in that run.
The bench keeps h2load's figure as an extra row (``burst_p99``, row (g')), and measures the floor's row
here, at the rate the issue names: one request every ``1/rate`` seconds.

How
---
One process, one thread, ``connections`` keep-alive TLS connections and a ``select()`` loop
(``select`` takes its timeout in microseconds; ``epoll``'s is rounded up to whole milliseconds).
Request ``k`` is *planned* at ``t0 + k/rate``. At its time it goes out on an idle connection; when
none is idle it waits for the first one to free up. Its latency runs from the planned time to the
last byte of the response, so a stalled server is charged for the requests it delayed too
("coordinated omission" does not hide them). The generator's own lateness (actual send minus
planned time) is reported beside the figures, so a run where the generator fell behind shows it.

Only status line, ``Content-Length`` and chunked framing are understood: enough for the bench's own
upstream. Everything is bounded: a hard deadline, a per-response timeout, one error ends the run.
"""

from __future__ import annotations

import argparse
import gc
import json
import select
import socket
import ssl
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class PaceResult:
    requests: int            # responses counted (after the warm-up)
    failed: int              # non-2xx/3xx among them
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    achieved_rps: float
    late_p99_ms: float       # the generator's own lateness: actual send - planned time
    cipher: str


class ResponseReader:
    """Sans-IO framing of one HTTP/1.1 response after another: feed bytes, get finished statuses."""

    def __init__(self) -> None:
        self.buf = b""
        self._status: int | None = None
        self._need = -1          # body bytes still expected; -1: reading the head
        self._chunked = False

    def feed(self, data: bytes) -> list[int]:
        self.buf += data
        done = []
        while True:
            if self._need < 0:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buf) > 65536:
                        raise ValueError("response head over 64 KiB")
                    return done
                head, self.buf = self.buf[:end].decode("latin-1"), self.buf[end + 4:]
                lines = head.split("\r\n")
                parts = lines[0].split(" ", 2)
                if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
                    raise ValueError(f"not an HTTP/1.1 status line: {lines[0][:80]!r}")
                self._status = int(parts[1])
                fields = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    fields[name.strip().lower()] = value.strip()
                self._chunked = "chunked" in fields.get("transfer-encoding", "").lower()
                if self._chunked:
                    self._need = 0
                elif "content-length" in fields:
                    self._need = int(fields["content-length"])
                else:
                    raise ValueError("response without Content-Length or chunked framing")
            if self._chunked:
                end = self.buf.find(b"0\r\n\r\n")
                if end < 0:
                    return done
                self.buf = self.buf[end + 5:]
            else:
                if len(self.buf) < self._need:
                    return done
                self.buf = self.buf[self._need:]
            done.append(self._status)
            self._need = -1


class _Conn:
    __slots__ = ("sock", "reader", "planned", "sent")

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock
        self.reader = ResponseReader()
        self.planned = 0.0
        self.sent = 0.0


def _connect(ctx: ssl.SSLContext, host: str, port: int, server_name: str) -> ssl.SSLSocket:
    raw = socket.create_connection((host, port), timeout=5)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock = ctx.wrap_socket(raw, server_hostname=server_name)
    sock.setblocking(False)
    return sock


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile by nearest rank (the bench's one definition; bench.load re-exports it)."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def run(host: str, port: int, *, path: str = "/small", rate: int = 1000, connections: int = 10,
        duration_s: float = 10.0, warmup_s: float = 1.0, ca: str | None = None,
        server_name: str = "localhost", response_timeout_s: float = 5.0,
        dump: list[tuple[float, float, float]] | None = None) -> PaceResult:
    """``dump``, if given, receives (planned s since the first counted request, send lateness ms,
    latency ms) per counted request."""
    ctx = ssl.create_default_context(cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    conns = [_connect(ctx, host, port, server_name) for _ in range(connections)]
    cipher = conns[0].cipher()[0]
    request = f"GET {path} HTTP/1.1\r\nHost: {server_name}\r\n\r\n".encode()
    idle = deque(_Conn(c) for c in conns)
    busy: dict[ssl.SSLSocket, _Conn] = {}
    waiting: deque[float] = deque()          # planned times with no idle connection yet
    lat: list[float] = []
    late: list[float] = []
    failed = 0
    interval = 1.0 / rate
    clock = time.perf_counter
    t0 = clock() + 0.05
    counted_from = t0 + warmup_s
    stop_planning = counted_from + duration_s
    hard_end = stop_planning + response_timeout_s
    k = 0
    planned = t0
    gc.disable()              # the generator's own pauses would be charged to the server
    try:
        while True:
            now = clock()
            if now > hard_end:
                raise TimeoutError(f"{len(busy)} responses missing {response_timeout_s:g} s after the end")
            while planned <= now and planned < stop_planning:
                waiting.append(planned)
                k += 1
                planned = t0 + k * interval
            while waiting and idle:
                c = idle.popleft()
                c.planned, c.sent = waiting.popleft(), clock()
                c.sock.send(request)         # 40 bytes into an empty socket buffer: never short
                busy[c.sock] = c
            if planned >= stop_planning and not waiting and not busy:
                break
            for c in busy.values():
                if now - c.planned > response_timeout_s:
                    raise TimeoutError(f"no response within {response_timeout_s:g} s")
            timeout = max(0.0, planned - clock()) if planned < stop_planning else 0.05
            readable, _, _ = select.select(list(busy), [], [], timeout)
            for sock in readable:
                c = busy[sock]
                while True:
                    try:
                        data = sock.recv(65536)
                    except ssl.SSLWantReadError:
                        break
                    if not data:
                        raise ConnectionError("the server closed a keep-alive connection")
                    statuses = c.reader.feed(data)
                    if statuses:
                        if len(statuses) > 1 or c.reader.buf:
                            raise ValueError("more response bytes than one request asked for")
                        if c.planned >= counted_from:
                            lat.append((clock() - c.planned) * 1000.0)
                            late.append((c.sent - c.planned) * 1000.0)
                            failed += not 200 <= statuses[0] < 400
                            if dump is not None:
                                dump.append((c.planned - counted_from, late[-1], lat[-1]))
                        del busy[sock]
                        idle.append(c)
                        break
                    if not sock.pending():
                        break
    finally:
        gc.enable()
        for s in conns:
            s.close()
    if not lat:
        raise ValueError("no request was counted")
    return PaceResult(len(lat), failed, percentile(lat, 50), percentile(lat, 99), percentile(lat, 99.9),
                      max(lat), len(lat) / duration_s, percentile(late, 99), cipher)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.pace", description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", default="/small")
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--connections", type=int, default=10)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--cafile")
    ap.add_argument("--dump", metavar="FILE", help="write planned time, lateness, latency per request (TSV)")
    a = ap.parse_args(argv)
    if a.host not in ("127.0.0.1", "::1", "localhost"):
        ap.error("the bench only talks to 127.0.0.1 / ::1")
    rows: list[tuple[float, float, float]] | None = [] if a.dump else None
    try:
        r = run(a.host, a.port, path=a.path, rate=a.rate, connections=a.connections,
                duration_s=a.duration, warmup_s=a.warmup, ca=a.cafile, dump=rows)
        if a.dump:
            with open(a.dump, "w") as f:
                f.writelines(f"{t:.6f}\t{late:.3f}\t{ms:.3f}\n" for t, late, ms in rows)
    except (OSError, ValueError, TimeoutError) as exc:
        print(f"bench.pace: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(asdict(r)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
