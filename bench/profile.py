"""Profile tlsproxy under keep-alive small requests: ``python -m bench.profile [--seconds N]``.

Starts the upstream nginx (CPU 1) and one tlsproxy (CPU 0, access log off), drives it with
``wrk -c50`` (CPU 1) and samples it with ``py-spy record --nonblocking`` (CPU 1) meanwhile; prints
the request rate, tlsproxy's CPU time per request (user + system, from /proc: steadier than the
rate on a shared machine) and the functions with the most samples, by own and inclusive time.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from . import load, procs
from .run import Bench, Plan


def _function(frame: str) -> str:
    """``Forwarder.serve (tlsproxy/http/forward.py:176)`` → ``Forwarder.serve (tlsproxy/http/forward.py)``."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if where else name


def _package(frame: str) -> str:
    where = frame.partition(" (")[2].rstrip(")")
    path = where.rsplit(":", 1)[0]
    if "/" not in path:
        return path.removesuffix(".py") or "?"
    return path.split("/")[0]


def summarize(collapsed: str, top: int = 25) -> str:
    """py-spy raw (collapsed) stacks of the main thread → top functions by own and inclusive
    samples, and own samples by package (ssl, trio, h11, tlsproxy…)."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    pkg: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit() or stack.startswith("Thread._bootstrap"):
            continue   # worker threads (the certificate watcher) wait in native code, not on the hot path
        n = int(count)
        frames = [_function(f.strip()) for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        total += n
        own[frames[-1]] += n
        pkg[_package(stack.split(";")[-1].strip())] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        return "no samples"
    out = [f"{total} samples of the main thread", "", "own time by package:"]
    out += [f"  {100 * c / total:5.1f}%  {p}" for p, c in pkg.most_common(12)]
    out += ["", "own time by function:"]
    out += [f"  {100 * c / total:5.1f}%  {f}" for f, c in own.most_common(top)]
    out += ["", "inclusive time by function:"]
    out += [f"  {100 * c / total:5.1f}%  {f}" for f, c in incl.most_common(top)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--path", default="/small")
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--close", action="store_true", help="Connection: close (a full handshake per request)")
    ap.add_argument("--no-profile", action="store_true", help="only measure the rate")
    ap.add_argument("--keep-raw", help="write py-spy's collapsed stacks to this file")
    args = ap.parse_args(argv)
    if shutil.which("py-spy") is None and not Path(sys.executable).with_name("py-spy").exists():
        print("bench: error: py-spy is not installed", file=sys.stderr)
        return 2
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    work = Path(tempfile.mkdtemp(prefix="tlsproxy-bench-"))
    b = Bench(Plan(runs=1, duration_s=args.seconds), work)
    try:
        b.setup_upstream()
        pt = b.ports
        b._tlsproxy("tp", pt.tp, pt.tp_admin, procs.CPU_PROXY, "--tls-session-tickets", "0")
        load.wrk(b.url(pt.tp, args.path), connections=args.connections, duration_s=1, env=b.env)  # warm up
        raw = Path(args.keep_raw).resolve() if args.keep_raw else work / "profile.txt"
        spy = None
        if not args.no_profile:
            spy = threading.Thread(target=subprocess.run, args=(procs.pinned(procs.CPU_LOAD, [
                pyspy, "record", "--pid", str(b.p.running["tp"].pid), "--duration", str(int(args.seconds)),
                "--rate", "250", "--nonblocking", "--format", "raw", "-o", str(raw)]),),
                kwargs={"capture_output": True, "timeout": args.seconds + 60})
            spy.start()
        pid = b.p.running["tp"].pid
        cpu0 = procs.cpu_seconds(pid)
        r = load.wrk(b.url(pt.tp, args.path), connections=args.connections, duration_s=args.seconds,
                     env=b.env, close=args.close)
        cpu = procs.cpu_seconds(pid) - cpu0
        print(f"wrk -c{args.connections} {args.path}: {r.rps:.0f} req/s, p50 {r.p50_ms} ms, "
              f"p99 {r.p99_ms} ms, {r.mib_s:.1f} MiB/s, errors {r.errors}; tlsproxy CPU "
              f"{1e6 * cpu / max(r.requests, 1):.0f} µs per request ({cpu:.2f} s for {r.requests} requests)")
        if spy is not None:
            spy.join(args.seconds + 60)
            print(summarize(raw.read_text() if raw.exists() else "", args.top))
    finally:
        b.p.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
