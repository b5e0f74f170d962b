"""tlsproxy against nginx, side by side, in one run: ``python -m bench.run [--smoke]`` (``make bench``).

What runs where (2 CPUs): the proxies under test (tlsproxy and nginx, one worker each) are pinned
to CPU 0; the upstream nginx and every load generator to CPU 1. Each figure is measured for
tlsproxy and nginx in turn (wrk steps in 2 s slices taken alternately, or one whole step after the
other with ``--sequential``), ``--runs`` times (3; 1 with ``--smoke``); the table shows medians.
Every load step also reads the CPU time of the proxy's process tree before and after, for the
per proxy CPU-second columns. Everything listens on 127.0.0.1 on free ports; every process is
ours and is stopped by PID at the end; every step has a timeout and the whole run a deadline.
See docs/performance.md for the figures, the like-for-like rules and how to read the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tlsproxy.certs import generate
from tlsproxy.config import Settings

from . import load, nginx, procs
from .report import Results, entry, text_table

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "performance.md"
SERVERS = ("tlsproxy", "nginx")
SLICE_S = 2.0       # interleaving slice of the wrk steps (see schedule)


@dataclass(frozen=True)
class Plan:
    runs: int = 3
    duration_s: float = 10.0          # each wrk / h2load measurement
    idle_connections: int = 2000
    fixed_rate: int = 1000
    fixed_clients: int = 10
    max_seconds: float = 1800.0
    sequential: bool = False          # wrk steps: one server after the other, not 2 s slices in turn


SMOKE = Plan(runs=1, duration_s=1.0, idle_connections=50, fixed_rate=200, fixed_clients=4, max_seconds=55.0)


class Deadline(Exception):
    pass


def schedule(names: list[str], duration_s: float, *, sequential: bool) -> list[tuple[str, float]]:
    """The wrk runs of one step, in order: (target, seconds). Interleaved, each target gets
    ``duration_s`` in slices of about ``SLICE_S`` taken in turn (a, b, a, b, …); sequential, one
    run of ``duration_s`` per target, one target after the other (a, b)."""
    n = 1 if sequential else max(1, round(duration_s / SLICE_S))
    return [(name, duration_s / n) for _ in range(n) for name in names]


@dataclass(frozen=True)
class Step:
    """A load step against one proxy: what the generator measured, and the CPU-seconds the
    proxy's process tree spent meanwhile."""
    wrk: load.WrkResult
    cpu_s: float


@dataclass
class Ports:
    upstream: int
    peer: int
    tp: int
    tp_admin: int
    tp_resume: int
    tp_resume_admin: int
    tp_log: int
    tp_log_admin: int
    tp2: int
    tp2_admin: int
    ng: int
    ng_resume: int
    ng2: int
    ng2_resume: int
    tp_out_listen: int
    tp_out_admin: int
    tp_out: int
    ng_out: int
    ng_h2: int

    @classmethod
    def pick(cls) -> Ports:
        seen: set[int] = set()
        values = []
        for _ in dataclasses.fields(cls):
            p = procs.free_port()
            while p in seen:
                p = procs.free_port()
            seen.add(p)
            values.append(p)
        return cls(*values)


class Bench:
    def __init__(self, plan: Plan, work: Path) -> None:
        self.plan = plan
        self.work = work
        self.p = procs.Procs(work)
        self.ports = Ports.pick()
        self.results = Results()
        self.notes: list[str] = []
        self.facts: list[str] = []
        self.env = load.client_env(load.openssl_conf(work / "client-openssl.cnf"))

    # ------------------------------------------------------------------ setup
    def setup_upstream(self) -> None:
        """The certificates, the site and the upstream nginx (app and TLS peer): what every bench
        tool (this run, ``bench.calls``, ``bench.profile``) puts behind the proxy it measures."""
        w = self.work
        ca = generate.make_ca("bench CA")                   # ECDSA P-256 (generate's default)
        leaf = generate.issue(ca, "localhost", dns=("localhost",), ips=("127.0.0.1",))
        self.ca, self.cert, self.key = w / "ca.pem", w / "cert.pem", w / "key.pem"
        self.ca.write_bytes(ca.cert_pem)
        self.cert.write_bytes(leaf.cert_pem)
        self.key.write_bytes(leaf.key_pem)
        nginx.write_site(w)
        pt = self.ports
        self._nginx("upstream", nginx.upstream_conf(w, pt.upstream, pt.peer, self.cert, self.key),
                    procs.CPU_LOAD, [pt.upstream, pt.peer])

    def setup(self) -> None:
        self.setup_upstream()
        w, pt = self.work, self.ports
        self._nginx("proxy", nginx.proxy_conf(w, port=pt.ng, resume_port=pt.ng_resume,
                                              upstream_port=pt.upstream, cert=self.cert, key=self.key,
                                              h2_port=pt.ng_h2),
                    procs.CPU_PROXY, [pt.ng, pt.ng_resume, pt.ng_h2])
        self._nginx("proxy2", nginx.proxy_conf(w, port=pt.ng2, resume_port=pt.ng2_resume,
                                               upstream_port=pt.upstream, cert=self.cert, key=self.key,
                                               workers=2, name="proxy2"), None, [pt.ng2])
        self._tlsproxy("tp", pt.tp, pt.tp_admin, procs.CPU_PROXY, "--tls-session-tickets", "0")
        self._tlsproxy("tp_resume", pt.tp_resume, pt.tp_resume_admin, procs.CPU_PROXY)
        self._tlsproxy("tp_log", pt.tp_log, pt.tp_log_admin, procs.CPU_PROXY, "--access-log", "on",
                       "--tls-session-tickets", "0")
        self._tlsproxy("tp2", pt.tp2, pt.tp2_admin, None, "--tls-session-tickets", "0", "--workers", "2")
        self._outbound_setup()
        self._h2_setup()
        self._verify()

    def _h2_setup(self) -> None:
        """Row (h) needs tlsproxy to negotiate h2 on its TLS port; until it does the row says so."""
        self.h2 = load.offers_h2(self.ports.tp, self.ca)
        if not self.h2:
            self.results.missing["h2_rps"] = "n/a (tlsproxy does not negotiate h2)"
        if not load.offers_h2(self.ports.ng_h2, self.ca):
            raise RuntimeError("nginx's http2 server did not negotiate h2")

    def _nginx(self, name: str, conf: str, cpu: str | None, ports: list[int]) -> None:
        path = self.work / f"{name}.conf"
        path.write_text(conf)
        proc = self.p.start(name, ["nginx", "-p", str(self.work), "-e", str(self.work / f"{name}.error.log"),
                                   "-c", str(path)], cpu=cpu)
        for port in ports:
            procs.wait_port(port, 20, proc)

    def _tlsproxy(self, name: str, port: int, admin: int, cpu: str | None, *extra: str) -> None:
        argv = [sys.executable, "-m", "tlsproxy", "serve", "--cert", str(self.cert), "--key", str(self.key),
                "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}",
                "--upstream", f"http://127.0.0.1:{self.ports.upstream}", "--access-log", "off",
                "--log-format", "json", "--drain-delay", "0", "--drain-timeout", "2", *extra]
        proc = self.p.start(name, argv, cpu=cpu)
        procs.wait_port(port, 30, proc)

    def _outbound_setup(self) -> None:
        pt = self.ports
        self.outbound = False
        if "outbound" not in {f.name for f in dataclasses.fields(Settings)}:
            self.results.missing["outbound"] = "n/a (outbound not built)"
            return
        argv = [sys.executable, "-m", "tlsproxy", "serve", "--cert", str(self.cert), "--key", str(self.key),
                "--listen", f"127.0.0.1:{pt.tp_out_listen}", "--admin", f"127.0.0.1:{pt.tp_out_admin}",
                "--upstream", f"http://127.0.0.1:{pt.upstream}", "--access-log", "off",
                "--log-format", "json", "--drain-delay", "0", "--drain-timeout", "2",
                "--outbound", f"127.0.0.1:{pt.tp_out}=https://127.0.0.1:{pt.peer}",
                "--outbound-ca", str(self.ca)]
        proc = self.p.start("tp_out", argv, cpu=procs.CPU_PROXY)
        try:
            procs.wait_port(pt.tp_out, 10, proc)
        except RuntimeError as exc:
            self.results.missing["outbound"] = "n/a (outbound not built)"
            self.notes.append(f"(e) tlsproxy --outbound did not come up: {exc}")
            self.p.stop("tp_out")
            return
        self._nginx("outbound", nginx.outbound_conf(self.work, port=pt.ng_out, peer_port=pt.peer, ca=self.ca),
                    procs.CPU_PROXY, [pt.ng_out])
        self.outbound = True

    def _verify(self) -> None:
        """Resumption really off where it must be (and on where it must be), and what was negotiated."""
        pt = self.ports
        checks = {"tlsproxy": (pt.tp, pt.tp_resume), "nginx": (pt.ng, pt.ng_resume)}
        for server, (off, on) in checks.items():
            rc_off, rc_on = (load.reconnect_check(p, self.ca, self.env) for p in (off, on))
            rs_off, rs_on = (load.resumption_check(p, self.ca, self.env, self.work) for p in (off, on))
            self.facts.append(
                f"{server}: resumption-off port: `s_client -reconnect` {rc_off[0]} new / {rc_off[1]} reused, "
                f"`s_client -sess_out`/`-sess_in` {rs_off[0]} new / {rs_off[1]} reused; resumption-on port: "
                f"`-reconnect` {rc_on[0]} new / {rc_on[1]} reused, `-sess_in` {rs_on[0]} new / {rs_on[1]} "
                f"reused; negotiated {load.negotiated(off, self.ca, self.env)}")
            if rc_off[1] or rs_off[1]:
                raise RuntimeError(f"{server} resumed sessions with resumption off: "
                                   "(b) would measure resumptions")
            if not rs_on[1]:
                self.notes.append(f"{server}: no resumption seen on the resumption-on port either: "
                                  "the check may be blind")

    # ------------------------------------------------------------------ figures
    def url(self, port: int, path: str = "/small", scheme: str = "https") -> str:
        return f"{scheme}://127.0.0.1:{port}{path}"

    def measure(self) -> None:
        plan, pt, d = self.plan, self.ports, self.plan.duration_s
        self._progress(f"wrk steps: {_method(plan)}")
        for run in range(plan.runs):
            self._progress(f"run {run + 1}/{plan.runs}")
            r = self._wrk_step({"tlsproxy": (self.url(pt.tp), "tp"), "log": (self.url(pt.tp_log), "tp_log"),
                                "nginx": (self.url(pt.ng), "proxy")}, connections=50)
            for server in SERVERS:
                self._add_wrk("ka_rps", server, r[server])
                self.results.add("ka_p50", server, r[server].wrk.p50_ms or 0.0)
                self.results.add("ka_p99", server, r[server].wrk.p99_ms or 0.0)
            self._add_wrk("ka_rps_log", "tlsproxy", r["log"])
            self._progress("handshakes")
            r = self._wrk_step({"tlsproxy": (self.url(pt.tp), "tp"), "nginx": (self.url(pt.ng), "proxy")},
                               connections=50, close=True)
            for server in SERVERS:
                self._add_wrk("hs", server, r[server])
            r = self._wrk_step({"tlsproxy": (self.url(pt.tp_resume), "tp_resume"),
                                "nginx": (self.url(pt.ng_resume), "proxy")}, connections=50, close=True)
            for server in SERVERS:
                self._add_wrk("resumed", server, r[server])
            self._progress("bulk")
            for server, port, proc in (("tlsproxy", pt.tp, "tp"), ("nginx", pt.ng, "proxy")):
                mib_s, cpu_s = self._on_cpu(proc, load.curl_download_mib_s, self.url(port, "/64m"), self.ca,
                                            self.env)
                self.results.add_step("dl64", server, mib_s, count=_mib("64m"), cpu_s=cpu_s)
            r = self._wrk_step({"tlsproxy": (self.url(pt.tp, "/1m"), "tp"),
                                "nginx": (self.url(pt.ng, "/1m"), "proxy")}, connections=8)
            for server in SERVERS:
                self._add_wrk("ka1m", server, r[server], mib_each=_mib("1m"))
            self._progress("idle connections")
            for server in SERVERS:
                self.results.add("idle_rss", server, self._idle_rss(server))
            if self.outbound:
                self._progress("outbound")
                r = self._wrk_step({"tlsproxy": (self.url(pt.tp_out, scheme="http"), "tp_out"),
                                    "nginx": (self.url(pt.ng_out, scheme="http"), "outbound")},
                                   connections=50)
                for server in SERVERS:
                    self._add_wrk("outbound", server, r[server])
            self._progress("2 workers")
            r = self._wrk_step({"tlsproxy": (self.url(pt.tp2), "tp2"), "nginx": (self.url(pt.ng2), "proxy2")},
                               connections=50)
            for server in SERVERS:
                self._add_wrk("w2_rps", server, r[server])
                w1 = self.results.samples[("ka_rps", server)][-1]     # row (a), this run
                self.results.add("w2_gain", server, r[server].wrk.rps / w1)
            self._progress("http/2")
            h2_targets = {"tlsproxy": (self.url(pt.tp), "tp"), "nginx": (self.url(pt.ng_h2), "proxy")}
            if not self.h2:
                del h2_targets["tlsproxy"]       # the row says why; nginx's side is still measured
            r2 = self._h2_step(h2_targets)
            for server, res in r2.items():
                self.results.add_step("h2_rps", server, res[0].rps, count=res[0].requests, cpu_s=res[1])
                if res[0].errors:
                    self.notes.append(f"(h) {server}: h2load reported {res[0].errors} failed requests")
                if res[0].protocol != "h2":
                    raise RuntimeError(f"(h) {server}: h2load negotiated {res[0].protocol}, not h2")
            self._progress("fixed rate")
            fixed_s = max(d, 1.0)
            for server, port, proc in (("tlsproxy", pt.tp, "tp"), ("nginx", pt.ng, "proxy")):
                pr, cpu_s = self._on_cpu(proc, load.paced, port, rate=plan.fixed_rate,
                                         connections=plan.fixed_clients, duration_s=fixed_s, ca=self.ca,
                                         env=self.env)
                # the CPU was read around the whole generator run, warm-up included
                self.results.add_step("fixed_p99", server, pr.p99_ms, cpu_s=cpu_s,
                                      count=pr.achieved_rps * (fixed_s + load.WARMUP_S))
                self.results.add("fixed_p50", server, pr.p50_ms)
                if pr.failed:
                    self.notes.append(f"(g) {server}: {pr.failed} failed requests")
                if pr.late_p99_ms > 1.0:
                    self.notes.append(f"(g) {server}: the generator sent 1 % of its requests over "
                                      f"{pr.late_p99_ms:.1f} ms late (the load CPU stalled)")
                rr, cpu_s = self._on_cpu(proc, load.h2load_fixed_rate, self.url(port), rate=plan.fixed_rate,
                                         clients=plan.fixed_clients, duration_s=fixed_s, env=self.env,
                                         log_file=self.work / "h2load.log")
                self.results.add_step("burst_p99", server, rr.p99_ms, cpu_s=cpu_s,
                                      count=rr.achieved_rps * (fixed_s + load.WARMUP_S))
                if rr.failed:
                    self.notes.append(f"(g') {server}: {rr.failed} failed requests")
                if rr.achieved_rps < 0.9 * plan.fixed_rate:
                    self.notes.append(f"(g') {server}: achieved only {rr.achieved_rps:.0f} req/s")
        self._check_no_resumption()

    def _wrk_step(self, targets: dict[str, tuple[str, str]], *, connections: int, close: bool = False
                  ) -> dict[str, Step]:
        """wrk against each target (name → (url, the name of the proxy process serving it)) for
        ``duration_s`` in all, by :func:`schedule`. Interleaved (the default), the slices of about
        ``SLICE_S`` are taken in turn, so that a drift in the machine's speed — the CPU time of the
        same work moved by ±25 % over tens of seconds here — hits every target alike instead of
        whichever ran during it; ``--sequential`` runs one whole step per target, one after the
        other. Each target's slices → :func:`load.combine`, their proxy CPU-seconds summed."""
        got: dict[str, list[load.WrkResult]] = {name: [] for name in targets}
        cpu: dict[str, float] = dict.fromkeys(targets, 0.0)
        for name, seconds in schedule(list(targets), self.plan.duration_s, sequential=self.plan.sequential):
            url, proc = targets[name]
            result, cpu_s = self._on_cpu(proc, load.wrk, url, connections=connections, duration_s=seconds,
                                         env=self.env, close=close)
            got[name].append(result)
            cpu[name] += cpu_s
        return {name: Step(load.combine(slices), cpu[name]) for name, slices in got.items()}

    def _h2_step(self, targets: dict[str, tuple[str, str]]) -> dict[str, tuple[load.H2Result, float]]:
        """h2load ``-c10 -m10`` against each target, scheduled as the wrk steps are; each target's
        combined result and the proxy CPU-seconds it cost."""
        got: dict[str, list[load.H2Result]] = {name: [] for name in targets}
        cpu: dict[str, float] = dict.fromkeys(targets, 0.0)
        for name, seconds in schedule(list(targets), self.plan.duration_s, sequential=self.plan.sequential):
            url, proc = targets[name]
            result, cpu_s = self._on_cpu(proc, load.h2load, url, clients=10, streams=10, duration_s=seconds,
                                         env=self.env)
            got[name].append(result)
            cpu[name] += cpu_s
        return {name: (load.combine_h2(slices), cpu[name]) for name, slices in got.items()}

    def _on_cpu(self, proc: str, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` → (its result, CPU-seconds the process tree of our process
        ``proc`` spent meanwhile)."""
        process = self.p.running[proc]
        before = procs.tree_cpu_seconds(process.pid)
        result = fn(*args, **kwargs)
        if process.poll() is not None:
            raise RuntimeError(f"{proc} exited with {process.returncode} during the step "
                               f"(its output: {self.p.output(proc)[-500:]!r})")
        return result, procs.tree_cpu_seconds(process.pid) - before

    def _add_wrk(self, key: str, server: str, step: Step, *, mib_each: float | None = None) -> None:
        """A wrk figure: req/s, and per proxy CPU-second the requests wrk completed; with
        ``mib_each`` (the body's MiB), MiB/s and the MiB of the completed responses instead."""
        w = step.wrk
        if mib_each is None:
            self.results.add_step(key, server, w.rps, count=w.requests, cpu_s=step.cpu_s)
        else:
            self.results.add_step(key, server, w.mib_s, count=w.requests * mib_each, cpu_s=step.cpu_s)
        if w.errors:
            self.notes.append(f"{key} {server}: wrk reported {w.errors} errors/non-2xx in one run")

    def _idle_rss(self, server: str) -> float:
        """KiB of RSS per idle handshaken connection, on a *fresh* proxy process each time (a process
        that already held connections reuses the memory it freed, and would show ~0)."""
        n = self.plan.idle_connections
        port = procs.free_port()
        if server == "tlsproxy":
            self._tlsproxy("idle_tp", port, procs.free_port(), procs.CPU_PROXY, "--tls-session-tickets", "0")
            pid, name = self.p.running["idle_tp"].pid, "idle_tp"
        else:
            self._nginx("idle_ng", nginx.proxy_conf(self.work, port=port, resume_port=procs.free_port(),
                                                    upstream_port=self.ports.upstream, cert=self.cert,
                                                    key=self.key, name="idle_ng"), procs.CPU_PROXY, [port])
            name = "idle_ng"
            workers = procs.children(self.p.running[name].pid)
            if len(workers) != 1:
                raise RuntimeError(f"expected one nginx worker, found {workers}")
            pid = workers[0]
        try:
            load.curl_download_mib_s(self.url(port), self.ca, self.env)     # warm: first request done
            return self._hold_idle(pid, port, n, server)
        finally:
            self.p.stop(name)

    def _hold_idle(self, pid: int, port: int, n: int, server: str) -> float:
        time.sleep(0.5)
        before = procs.rss_kib(pid)
        argv = [sys.executable, "-m", "bench.idle", str(port), str(n), str(self.ca)]
        client = subprocess.Popen(procs.pinned(procs.CPU_LOAD, argv),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=self.env,
                                  cwd=ROOT)
        try:
            line = _readline(client, 120)
            m = re.match(r"holding (\d+) failed (\d+)", line)
            if not m:
                raise RuntimeError(f"idle client said {line!r}")
            held = int(m.group(1))
            if held < 0.98 * n:
                self.notes.append(f"(d) {server}: only {held}/{n} idle connections were established")
            time.sleep(1.0)          # let the server finish the handshakes it is still reading
            after = procs.rss_kib(pid)
        finally:
            client.stdin.close()
            try:
                client.wait(30)
            except subprocess.TimeoutExpired:
                client.kill()
                client.wait(5)
        return (after - before) / max(held, 1)

    def _check_no_resumption(self) -> None:
        """tlsproxy's own count: no resumed handshake on the tickets-0 instance, some on the other."""
        for admin, want in ((self.ports.tp_admin, False), (self.ports.tp_resume_admin, True)):
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
                text = r.read().decode()
            yes = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                      if line.startswith("tlsproxy_handshakes_total{") and 'resumed="yes"' in line)
            no = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                     if line.startswith("tlsproxy_handshakes_total{") and 'resumed="no"' in line)
            self.facts.append(f"tlsproxy {'resumption-on' if want else 'resumption-off'} instance counted "
                              f"{no:.0f} full and {yes:.0f} resumed handshakes")
            if not want and yes:
                raise RuntimeError("tlsproxy resumed handshakes with --tls-session-tickets 0")

    def _progress(self, what: str) -> None:
        print(f"bench: {what}", file=sys.stderr, flush=True)


def _readline(p: subprocess.Popen, timeout_s: float) -> str:
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)
    if not sel.select(timeout_s):
        raise RuntimeError(f"no answer in {timeout_s:g}s")
    return p.stdout.readline().strip()


def _mib(name: str) -> float:
    return nginx.FILES[name] / (1 << 20)


def _method(plan: Plan) -> str:
    runs = schedule(list(SERVERS), plan.duration_s, sequential=plan.sequential)
    if len(runs) == len(SERVERS):
        return f"sequential, one {plan.duration_s:g} s run per server"
    return f"interleaved, {len(runs) // len(SERVERS)} slices of {runs[0][1]:g} s per server taken in turn"


def _git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "tlsproxy"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + (" + uncommitted changes in tlsproxy/" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def _alarm(_signum, _frame) -> None:
    raise Deadline("the benchmark ran past --max-seconds")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Plan]:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true",
                    help="tiny durations, one run (CI); not recorded by default")
    ap.add_argument("--runs", type=int, help="runs per figure (median reported)")
    ap.add_argument("--duration", type=float, help="seconds per wrk/h2load measurement")
    ap.add_argument("--sequential", action="store_true",
                    help="run each wrk step against one server, then the other (a whole --duration "
                         "each), instead of 2 s slices taken in turn")
    ap.add_argument("--record", action=argparse.BooleanOptionalAction, default=None,
                    help="append the run to docs/performance.md (default: on, off with --smoke)")
    ap.add_argument("--note", action="append", default=[], help="a note recorded with the run")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    args = ap.parse_args(argv)
    if args.runs is not None and args.runs < 1:
        ap.error("--runs must be at least 1")
    if args.duration is not None and args.duration < 1:
        ap.error("--duration must be at least 1 (seconds)")
    plan = SMOKE if args.smoke else Plan()
    if args.runs:
        plan = dataclasses.replace(plan, runs=args.runs)
    if args.duration:
        plan = dataclasses.replace(plan, duration_s=args.duration)
    if args.sequential:
        plan = dataclasses.replace(plan, sequential=True)
    return args, plan


def main(argv: list[str] | None = None) -> int:
    args, plan = parse_args(argv)
    record = (not args.smoke) if args.record is None else args.record
    missing = [t for t in ("nginx", "wrk", "h2load", "taskset", "openssl", "curl") if shutil.which(t) is None]
    if missing:
        print(f"bench: error: missing tools: {', '.join(missing)} (make bench installs them)",
              file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="tlsproxy-bench-"))
    print(f"bench: work directory {work}", file=sys.stderr, flush=True)
    bench = Bench(plan, work)
    started = dt.datetime.now(dt.UTC)
    load_before = procs.loadavg()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(int(plan.max_seconds))
    t0 = time.monotonic()
    failed: str | None = None
    try:
        bench.setup()
        bench.measure()
    except (Deadline, RuntimeError, subprocess.TimeoutExpired, OSError, ValueError) as exc:
        failed = f"{type(exc).__name__}: {exc}"
    finally:
        signal.alarm(0)
        bench.p.stop_all()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    elapsed = time.monotonic() - t0
    table = text_table(bench.results)
    print(table)
    for fact in bench.facts:
        print("  " + fact)
    for note in bench.notes:
        print("  note: " + note)
    if failed:
        print(f"bench: error: {failed}" + (f" (work dir kept: {work})" if args.keep else ""), file=sys.stderr)
        return 1
    if record:
        nginx_v = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
        facts = [f"machine: {procs.machine()}",
                 f"load average before / after: {load_before} / {procs.loadavg()}",
                 f"tlsproxy {_git_rev()}; {nginx_v}; Python {sys.version.split()[0]} "
                 f"({os.path.realpath(sys.executable)})",
                 f"{plan.runs} run(s) per figure (median shown), {plan.duration_s:g} s per load step, "
                 f"{plan.idle_connections} idle connections, fixed rate {plan.fixed_rate} req/s; "
                 f"whole run {elapsed:.0f} s",
                 f"wrk steps: {_method(plan)}; per CPU-s: per CPU-second of the proxy's process tree",
                 *bench.facts]
        title = (f"Run of {started:%Y-%m-%d %H:%M} UTC" + (" (smoke)" if args.smoke else "")
                 + (" (sequential)" if plan.sequential else ""))
        with DOC.open("a") as f:
            f.write(entry(bench.results, title=title, facts=facts, notes=[*args.note, *bench.notes]))
        print(f"bench: appended to {DOC.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
