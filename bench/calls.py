"""Count what one request costs, in measures the machine's load does not change:
``python -m bench.calls [--mode keepalive|close|resumed|outbound] [--seconds N] [--strace]``.

Starts the upstream nginx (CPU 1) and one tlsproxy (CPU 0, access log off) under a small wrapper
(``bench/_profiled.py``) that turns ``cProfile`` on and off on SIGUSR1/SIGUSR2, drives it with
``wrk -c50`` (CPU 1) while profiling is on, and prints **Python function calls per request**
(cProfile counts every Python function and builtin call: deterministic, unlike a rate or a CPU
time on a shared machine) with the functions that make them. ``--strace`` instead attaches
``strace -c -f`` for the load and prints **syscalls per request**. ``--no-profile`` measures the
unprofiled CPU µs per request only (as ``bench.profile --no-profile``).

``--proxy nginx`` loads nginx instead, configured as in the full run (``bench/nginx.py``), for
``--no-profile``, ``--strace`` and ``--perf``: the same load, on the same machine a minute apart, so
the two proxies' CPU per request compare directly. ``--perf`` records the proxy with ``perf record``
during the load and splits its CPU per request by shared object (the interpreter, libcrypto, the
kernel…).

Modes: ``keepalive`` (small requests on 50 kept-alive connections), ``close`` (``Connection:
close``: one full TLS 1.3 handshake per request), ``resumed`` (the same with session tickets on:
wrk resumes), ``outbound`` (plain HTTP → tlsproxy ``--outbound`` → the upstream nginx's TLS port).
"""

from __future__ import annotations

import argparse
import os
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from . import load, nginx, procs
from .run import Bench, Plan

ROOT = Path(__file__).resolve().parent.parent


def _start(b: Bench, mode: str, stats: Path, profiled: bool, callgrind: bool = False) -> tuple[int, str]:
    """Start tlsproxy for ``mode``; its pid and the URL to load."""
    pt = b.ports
    wrapper = [sys.executable, "-m", "bench._profiled", str(stats)] if profiled \
        else [sys.executable, "-m", "tlsproxy"]
    if callgrind:
        wrapper = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={stats}",
                   *wrapper]
    argv = [*wrapper, "serve", "--cert", str(b.cert), "--key", str(b.key),
            "--admin", f"127.0.0.1:{pt.tp_admin}", "--upstream", f"http://127.0.0.1:{pt.upstream}",
            "--access-log", "off", "--log-format", "json", "--drain-delay", "0", "--drain-timeout", "2"]
    if mode == "outbound":
        argv += ["--listen", f"127.0.0.1:{pt.tp_out_listen}",
                 "--outbound", f"127.0.0.1:{pt.tp_out}=https://127.0.0.1:{pt.peer}",
                 "--outbound-ca", str(b.ca)]
        port, url = pt.tp_out, f"http://127.0.0.1:{pt.tp_out}/small"
    else:
        argv += ["--listen", f"127.0.0.1:{pt.tp}"]
        if mode != "resumed":
            argv += ["--tls-session-tickets", "0"]
        port, url = pt.tp, b.url(pt.tp, "/small")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = b.p.start("tp", argv, cpu=procs.CPU_PROXY, env=env)
    procs.wait_port(port, 300 if callgrind else 30, proc)
    return proc.pid, url


def _start_nginx(b: Bench, mode: str) -> tuple[int, str]:
    """Start nginx as the proxy for ``mode`` (as the full run configures it); its master's pid and
    the URL to load. Its CPU is the process tree's (master and worker)."""
    pt, w = b.ports, b.work
    if mode == "outbound":
        conf = nginx.outbound_conf(w, port=pt.ng_out, peer_port=pt.peer, ca=b.ca)
        port, url = pt.ng_out, f"http://127.0.0.1:{pt.ng_out}/small"
    else:
        conf = nginx.proxy_conf(w, port=pt.ng, resume_port=pt.ng_resume, upstream_port=pt.upstream,
                                cert=b.cert, key=b.key)
        port = pt.ng_resume if mode == "resumed" else pt.ng
        url = b.url(port, "/small")
    path = w / "proxy.conf"
    path.write_text(conf)
    proc = b.p.start("proxy", ["nginx", "-p", str(w), "-e", str(w / "proxy.error.log"), "-c", str(path)],
                     cpu=procs.CPU_PROXY)
    procs.wait_port(port, 20, proc)
    return proc.pid, url


def _perf_by_object(data: Path, cpu_us: float) -> list[tuple[str, float, float]]:
    """``perf report`` of ``data`` by shared object: (object, share %, µs per request)."""
    out = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--sort", "dso", "--stdio"],
                         capture_output=True, text=True, timeout=300).stdout
    return parse_dso_report(out, cpu_us)


def parse_dso_report(text: str, cpu_us: float) -> list[tuple[str, float, float]]:
    """The rows of ``perf report --sort dso --stdio`` (``  59.50%  python3.11``): (object, share %,
    its part of ``cpu_us``), in the report's order (largest first)."""
    rows = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].endswith("%") and not line.startswith("#"):
            share = float(parts[0][:-1])
            rows.append((parts[1], share, cpu_us * share / 100))
    return rows


def _handshakes(admin_port: int) -> str:
    """tlsproxy's own count of full and resumed handshakes (did the client really resume?)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=30) as r:
        text = r.read().decode()
    counts = {"no": 0.0, "yes": 0.0}
    for line in text.splitlines():
        if line.startswith("tlsproxy_handshakes_total{"):
            counts["yes" if 'resumed="yes"' in line else "no"] += float(line.rsplit(" ", 1)[1])
    return f"{counts['no']:.0f} full, {counts['yes']:.0f} resumed"


def _idle(b: Bench, args) -> int:
    """KiB of RSS per idle handshaken connection (as bench.run's row (d)); with --tracemalloc, the
    Python allocations still held per connection, by line."""
    mem = b.work / "idle.mem"
    pid, url = _start(b, "keepalive", mem, args.tracemalloc)
    load.curl_download_mib_s(url, b.ca, b.env)
    if args.tracemalloc:
        b.p.running["tp"].send_signal(signal.SIGUSR1)
    kib = b._hold_idle(pid, b.ports.tp, args.idle, "tlsproxy") if not args.tracemalloc else None
    if args.tracemalloc:
        argv = [sys.executable, "-m", "bench.idle", str(b.ports.tp), str(args.idle), str(b.ca)]
        client = subprocess.Popen(procs.pinned(procs.CPU_LOAD, argv), stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=b.env, cwd=ROOT)
        held = int(client.stdout.readline().split()[1])
        time.sleep(1.0)
        b.p.running["tp"].send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + 60
        while not mem.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        client.stdin.close()
        client.wait(30)
        print(f"Python allocations held per idle connection ({held} connections), by line:")
        total = 0
        for line in mem.read_text().splitlines():
            size, count, where = line.split(" ", 2)
            total += int(size)
            print(f"  {int(size) / held:8.1f} B  {int(count) / held:5.2f} blocks  {where}")
        print(f"  total of the lines above: {total / held / 1024:.2f} KiB per connection")
    else:
        print(f"idle: {kib:.1f} KiB RSS per idle handshaken connection ({args.idle} connections)")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.calls")
    ap.add_argument("--mode", choices=("keepalive", "close", "resumed", "outbound", "idle"),
                    default="keepalive")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--strace", action="store_true", help="syscalls per request (strace -c), no profile")
    ap.add_argument("--idle", type=int, default=2000, help="idle mode: connections to hold")
    ap.add_argument("--tracemalloc", action="store_true",
                    help="idle mode: the Python allocations held per connection")
    ap.add_argument("--keep-stats", help="copy cProfile's stats file (with --perf: perf.data) here")
    ap.add_argument("--no-profile", action="store_true", help="only CPU µs per request, unprofiled")
    ap.add_argument("--proxy", choices=("tlsproxy", "nginx"), default="tlsproxy",
                    help="the proxy to load (nginx: with --no-profile, --strace or --perf)")
    ap.add_argument("--perf", action="store_true",
                    help="CPU per request by shared object (perf record during the load), no profile")
    ap.add_argument("--callgrind", action="store_true",
                    help="instructions per request: tlsproxy under valgrind's callgrind, counting only "
                         "during the load (slow: use --seconds 20 --connections 10)")
    args = ap.parse_args(argv)
    if args.proxy == "nginx" and not (args.no_profile or args.strace or args.perf):
        ap.error("--proxy nginx measures with --no-profile, --strace or --perf")
    work = Path(tempfile.mkdtemp(prefix="tlsproxy-calls-"))
    b = Bench(Plan(runs=1, duration_s=args.seconds), work)
    try:
        b.setup_upstream()
        if args.mode == "idle":
            return _idle(b, args)
        stats = work / "calls.prof"
        profiled = args.proxy == "tlsproxy" and not (args.strace or args.no_profile or args.callgrind
                                                     or args.perf)
        if args.proxy == "nginx":
            pid, url = _start_nginx(b, args.mode)
        else:
            pid, url = _start(b, args.mode, stats, profiled, args.callgrind)
        pids = procs.tree(pid)     # nginx: the master and its worker; tlsproxy: itself
        close = args.mode in ("close", "resumed")
        load.wrk(url, connections=args.connections, duration_s=1, env=b.env, close=close)   # warm up
        tracer = None
        if args.strace:
            attach = [a for p in pids for a in ("-p", str(p))]
            tracer = subprocess.Popen(procs.pinned(procs.CPU_LOAD, ["strace", "-c", "-f", *attach,
                                                                    "-o", str(work / "strace.txt")]),
                                      stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        elif args.perf:
            record = ["perf", "record", "-F", "2000", "-o", str(work / "perf.data"),
                      "-p", ",".join(map(str, pids))]
            tracer = subprocess.Popen(procs.pinned(procs.CPU_LOAD, record),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        elif profiled:
            b.p.running["tp"].send_signal(signal.SIGUSR1)
            time.sleep(0.2)
        elif args.callgrind:
            subprocess.run(["callgrind_control", "-i", "on", str(pid)], check=True, capture_output=True,
                           timeout=60)
        cpu0 = procs.tree_cpu_seconds(pid)
        r = load.wrk(url, connections=args.connections, duration_s=args.seconds, env=b.env, close=close)
        cpu = procs.tree_cpu_seconds(pid) - cpu0
        if args.mode in ("close", "resumed") and args.proxy == "tlsproxy":
            print(f"handshakes so far (tlsproxy_handshakes_total): {_handshakes(b.ports.tp_admin)}")
        n = max(r.requests, 1)
        print(f"{args.mode}: wrk -c{args.connections} {r.rps:.0f} req/s, {r.requests} requests, "
              f"errors {r.errors}; {args.proxy} CPU {1e6 * cpu / n:.0f} µs per request"
              + (" (profiled)" if profiled else " (straced)" if args.strace else
                 " (under perf)" if args.perf else ""))
        if args.callgrind:
            subprocess.run(["callgrind_control", "-i", "off", str(pid)], check=True, capture_output=True,
                           timeout=60)
            b.p.stop("tp", 120)
            if args.keep_stats:
                shutil.copy(stats, args.keep_stats)
            totals = [line for line in stats.read_text(errors="replace").splitlines()
                      if line.startswith(("summary:", "totals:"))]
            ir = int(totals[-1].split()[1])
            print(f"instructions per request (callgrind, {r.requests} requests): {ir / n:,.0f}")
        elif args.perf and tracer is not None:
            tracer.send_signal(signal.SIGINT)
            tracer.wait(60)
            if args.keep_stats:
                shutil.copy(work / "perf.data", args.keep_stats)
            print(f"{args.proxy} CPU per request by shared object (perf record -F 2000):")
            for obj, share, us in _perf_by_object(work / "perf.data", 1e6 * cpu / n)[:8]:
                print(f"  {share:5.1f} %  {us:7.1f} µs  {obj}")
        elif tracer is not None:
            tracer.send_signal(signal.SIGINT)
            tracer.wait(20)
            text = (work / "strace.txt").read_text()
            print(f"syscalls per request (strace -c -f, {r.requests} requests):")
            for line in text.splitlines():
                parts = line.split()
                if len(parts) >= 5 and parts[3].isdigit():
                    name = parts[-1]
                    print(f"  {int(parts[3]) / n:7.2f}  {name}")
        elif profiled:
            b.p.running["tp"].send_signal(signal.SIGUSR2)
            deadline = time.monotonic() + 30
            while not stats.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(0.5)
            if args.keep_stats:
                shutil.copy(stats, args.keep_stats)
            st = pstats.Stats(str(stats))
            total = sum(v[1] for v in st.stats.values())
            print(f"Python calls per request: {total / n:.1f}  ({total} calls)")
            rows = sorted(st.stats.items(), key=lambda kv: -kv[1][1])[:args.top]
            by_pkg: dict[str, int] = {}
            for (path, _line, _fn), v in st.stats.items():
                key = "builtins" if path == "~" else (
                    "tlsproxy" if "/tlsproxy/" in path else path.split("site-packages/")[-1].split("/")[0]
                    if "site-packages" in path else Path(path).name)
                by_pkg[key] = by_pkg.get(key, 0) + v[1]
            print("calls per request by package:")
            for k, c in sorted(by_pkg.items(), key=lambda kv: -kv[1])[:12]:
                print(f"  {c / n:7.1f}  {k}")
            print("top functions by calls per request (calls, own µs per request under the profiler):")
            for (path, line, fn), v in rows:
                short = path.split("/tlsproxy/")[-1].split("site-packages/")[-1]
                where = "" if path == "~" else f" ({short}:{line})"
                print(f"  {v[1] / n:7.2f}  {1e6 * v[2] / n:7.1f}  {fn}{where}")
    finally:
        b.p.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
