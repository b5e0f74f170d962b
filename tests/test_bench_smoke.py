"""The benchmark keeps working: ``python -m bench.run --smoke`` runs end to end and prints its table.

No timing asserts: figures from a shared CI machine mean nothing. What must hold is that every
row was measured for both servers (or says why not), with its proxy CPU-seconds and its count per
CPU-second, that resumption was really off where the handshake row needs it, and that the run
stopped every process it started. The pure parts (parsers, /proc reading, ratios, the slice
schedule) are tested directly below."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import calls, load, procs, report, run

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ("nginx", "wrk", "h2load", "taskset", "openssl", "curl")


def _cells(header: str, line: str) -> dict[str, str]:
    """One row of the printed table by column: the header's cells are separated by two or more
    spaces (a name holds single spaces only) and every column is padded to one width."""
    spans = [(m.group(), m.start()) for m in re.finditer(r"\S+(?: \S+)*", header)]
    ends = [start for _, start in spans[1:]] + [None]
    return {name: line[start:end].strip() for (name, start), end in zip(spans, ends, strict=True)}


def _positive(cell: str) -> float:
    value = float(cell.replace(",", ""))
    assert value > 0, cell
    return value


def _mentioning(text: str) -> set[int]:
    """PIDs of processes whose command line mentions ``text`` (the run's own work directory)."""
    out = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text.encode() in (d / "cmdline").read_bytes():
                    out.add(int(d.name))
            except OSError:
                pass
    return out


@pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS) or (os.cpu_count() or 1) < 2,
                    reason="needs nginx, wrk, h2load (make deps) and 2 CPUs")
def test_smoke_run_prints_the_whole_table(tmp_path):
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "bench.run", "--smoke", "--no-record"], cwd=ROOT,
                       capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    assert time.monotonic() - t0 < 90
    lines = r.stdout.splitlines()
    header = lines[0]
    assert list(_cells(header, header)) == report.HEADER
    for fig in report.FIGURES:
        row = next((line for line in lines if line.startswith(fig.label)), None)
        assert row is not None, f"missing row {fig.label!r}:\n{r.stdout}"
        if "n/a" in row:
            # the only rows allowed to be absent: outbound, and HTTP/2 while tlsproxy offers no h2
            assert fig.key == "outbound" or (fig.key == "h2_rps" and "does not negotiate h2" in row), row
            continue
        c = _cells(header, row)
        assert c["figure"] == fig.label and c["unit"] == fig.units, row
        servers = ("tlsproxy",) if fig.key == "ka_rps_log" else ("tlsproxy", "nginx")   # (a') has no nginx
        for server in servers:
            float(c[server].replace(",", ""))                  # a number, not "—"
        if not fig.per_cpu:
            assert c["tlsproxy per CPU-s"] == c["proxy CPU-s (tlsproxy / nginx)"] == "", row
            continue
        cpu_s = c["proxy CPU-s (tlsproxy / nginx)"].split(" / ")
        spent = dict(zip(("tlsproxy", "nginx"), cpu_s, strict=True))
        for server in servers:
            _positive(c[server])
            _positive(c[f"{server} per CPU-s"])
            _positive(spent[server])
        if len(servers) == 2:
            _positive(c["ratio per CPU-s"])
    assert "resumption-off port: `s_client -reconnect`" in r.stdout
    assert "instance counted" in r.stdout and " 0 resumed handshakes" in r.stdout
    work = re.search(r"bench: work directory (\S+)", r.stderr).group(1)
    assert not Path(work).exists()                       # removed without --keep
    time.sleep(0.5)
    assert _mentioning(work) == set(), "the benchmark left processes running"


def test_calls_measures_nginx_under_the_same_load():
    """``bench.calls --proxy nginx`` loads nginx as the full run configures it and reads its CPU
    from its process tree (master and worker): a worker's CPU not counted would print 0 µs."""
    r = subprocess.run([sys.executable, "-m", "bench.calls", "--proxy", "nginx", "--mode", "keepalive",
                        "--no-profile", "--seconds", "1", "--connections", "4"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    m = re.search(r"keepalive: wrk -c4 \d+ req/s, (\d+) requests, errors 0; nginx CPU (\d+) µs per request",
                  r.stdout)
    assert m, r.stdout
    assert int(m.group(1)) > 0 and int(m.group(2)) > 0, r.stdout
    refused = subprocess.run([sys.executable, "-m", "bench.calls", "--proxy", "nginx"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--proxy nginx measures with" in refused.stderr


def test_perf_report_by_object_scales_shares_to_the_cpu_per_request():
    text = """# Samples: 23K of event 'cpu-clock:ppp'
#
# Overhead  Shared Object
# ........  ..................
#
    59.50%  python3.11
    30.80%  [kernel.kallsyms]
     4.20%  libc.so.6

# (cmdline : perf record)
"""
    rows = calls.parse_dso_report(text, 200.0)
    assert [name for name, _, _ in rows] == ["python3.11", "[kernel.kallsyms]", "libc.so.6"]
    assert rows[0][1] == 59.5 and abs(rows[0][2] - 119.0) < 1e-9
    assert abs(rows[2][2] - 8.4) < 1e-9


def test_parse_wrk_output():
    text = """Running 1s test @ https://127.0.0.1:1/small
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.00ms  500.00us  10.00ms   90.00%
  Latency Distribution
     50%  850.00us
     75%    2.00ms
     90%    3.00ms
     99%    1.20s
  1234 requests in 1.00s, 1.50MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:   1234.56
Transfer/sec:      1.50MB
"""
    w = load.parse_wrk(text)
    assert (w.rps, w.p50_ms, w.p99_ms, w.errors, w.requests) == (1234.56, 0.85, 1200.0, 7, 1234)
    assert w.mib_s == 1.5
    with pytest.raises(ValueError):
        load.parse_wrk("wrk: connection refused")


def test_parse_h2load_log_and_reconnect():
    log = "\n".join(f"1700000000{i:06d}\t200\t{1000 * (i + 1)}" for i in range(100)) + "\n1\t502\t5\n"
    rr = load.parse_h2load_log(log, duration_s=2.0)
    assert (rr.p50_ms, rr.p99_ms, rr.achieved_rps, rr.failed) == (51.0, 99.0, 50.0, 1)
    text = "New, TLSv1.3, Cipher is X\ndrop connection and then reconnect\nReused, TLSv1.3, Cipher is X\n"
    assert load.parse_reconnect(text) == (1, 1)


def test_parse_h2load_summary():
    text = """starting benchmark...
Application protocol: h2
finished in 1.00s, 9630.50 req/s, 1.02MB/s
requests: 9630 total, 9730 started, 9630 done, 9600 succeeded, 20 failed, 10 errored, 0 timeout
status codes: 9600 2xx, 0 3xx, 0 4xx, 30 5xx
"""
    r = load.parse_h2load(text)
    assert (r.rps, r.requests, r.errors, r.protocol) == (9630.5, 9600, 30, "h2")
    both = load.combine_h2([r, load.H2Result(9000.0, 9000, 0, "h2")])
    assert (both.rps, both.requests, both.errors, both.protocol) == (9315.25, 18600, 30, "h2")
    with pytest.raises(ValueError):
        load.parse_h2load("h2load: No protocol negotiated")


def test_report_ratios_floors_and_missing_rows():
    res = report.Results()
    # tlsproxy: 100, 300, 200 req/s, each step 10 s on 5, 10, 8 CPU-s → 200, 300, 250 req per CPU-s
    for rps, cpu_s in ((100, 5.0), (300, 10.0), (200, 8.0)):
        res.add_step("ka_rps", "tlsproxy", rps, count=rps * 10, cpu_s=cpu_s)
    res.add_step("ka_rps", "nginx", 1000, count=10_000, cpu_s=4.0)     # not saturated: 2,500 per CPU-s
    res.add("idle_rss", "tlsproxy", 5.0)
    res.add("idle_rss", "nginx", 2.0)
    res.missing["outbound"] = "n/a (outbound not built)"
    rows = {r[0]: dict(zip(report.HEADER, r, strict=True)) for r in report.rows(res)}
    ka = rows["(a) keep-alive small requests, wrk -c50"]
    assert [ka[h] for h in report.HEADER[1:]] == [
        "req/s, req/CPU-s", "200", "1,000", "0.20", "250", "2,500", "0.10", "8.00 / 4.00", "≥ 0.2", "yes",
        "100–300 / 1,000"]
    rss = rows["(d) RSS per idle handshaken connection"]
    assert rss["holds"] == "**no**"
    assert rss["tlsproxy per CPU-s"] == rss["proxy CPU-s (tlsproxy / nginx)"] == ""
    out = rows["(e) outbound origination, wrk -c50 (app → proxy → TLS peer)"]
    assert out["tlsproxy"] == "n/a (outbound not built)"
    assert rows["(b) full TLS 1.3 handshakes (resumption off)"]["ratio per CPU-s"] == "—"    # not measured
    md = report.entry(res, title="Run X", facts=["machine: m"], notes=["loaded"])
    assert "### Run X" in md and "| figure |" in md and "| ratio per CPU-s |" in md and "- loaded" in md
    assert "| 250 | 2,500 | 0.10 | 8.00 / 4.00 |" in md


def test_per_cpu_second_and_ratio_arithmetic():
    assert report.per_cpu_second(3000, 1.5) == 2000.0
    assert report.per_cpu_second(3000, 0.0) is None          # under one clock tick: no figure, no ∞
    assert report.ratio(150.0, 1000.0) == 0.15
    assert report.ratio(None, 1000.0) is None and report.ratio(1.0, None) is None
    assert report.ratio(1.0, 0.0) is None
    res = report.Results()
    res.add_step("hs", "nginx", 900, count=9000, cpu_s=0.0)
    assert res.median("hs", "nginx") == 900
    assert res.median(report.cpu_key("hs"), "nginx") == 0.0
    assert res.median(report.per_cpu_key("hs"), "nginx") is None


def test_stat_cpu_ticks_counts_from_the_last_parenthesis():
    line = "12345 (we) ird (name) S 1 2 3 0 -1 4194560 100 0 0 0 150 25 7 3 20 0 1 0 555 0 0\n"
    assert procs.stat_cpu_ticks(line) == 175                         # utime + stime
    assert procs.stat_cpu_ticks(line, reaped_children=True) == 185   # + cutime + cstime
    assert procs.stat_cpu_ticks(Path("/proc/self/stat").read_text()) >= 0
    for bad in ("", "12345 (x) S 1 2", "no parenthesis 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15"):
        with pytest.raises(ValueError):
            procs.stat_cpu_ticks(bad)


# a parent that only waits, and its child that burns 0.3 s of CPU, then waits for stdin to close
_BURNER = """
import sys, time
while time.process_time() < 0.3:
    pass
print("burnt", flush=True)
sys.stdin.read()
"""
_PARENT = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", sys.argv[1]]).wait()
print("reaped", flush=True)
time.sleep(30)
"""


def _line(p: subprocess.Popen, timeout_s: float) -> str:
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(p.stdout, selectors.EVENT_READ)
        assert sel.select(timeout_s), f"no line from {p.pid} in {timeout_s:g} s"
    return p.stdout.readline().strip()


def test_tree_cpu_seconds_counts_living_and_reaped_descendants():
    """The tree's CPU-seconds hold the child's 0.3 s while it lives (through the process tree) and
    after the parent reaped it (through the parent's cutime), though the parent itself is idle."""
    p = subprocess.Popen([sys.executable, "-c", _PARENT, _BURNER], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert _line(p, 30) == "burnt"
        kids = procs.tree(p.pid)
        assert len(kids) == 2 and kids[0] == p.pid
        assert procs.tree_cpu_seconds(p.pid) - procs.cpu_seconds(p.pid) >= 0.25
        p.stdin.close()                                   # the child reads EOF and exits; the parent reaps it
        assert _line(p, 30) == "reaped"
        assert procs.tree(p.pid) == [p.pid]
        assert procs.tree_cpu_seconds(p.pid) - procs.cpu_seconds(p.pid) >= 0.25
    finally:
        p.kill()
        p.wait(10)
    with pytest.raises(OSError):
        procs.tree_cpu_seconds(p.pid)                     # gone: an error, not a silent 0


def test_schedule_interleaves_slices_or_runs_one_server_after_the_other():
    two = ["tlsproxy", "nginx"]
    assert run.schedule(two, 10.0, sequential=False) == [("tlsproxy", 2.0), ("nginx", 2.0)] * 5
    assert run.schedule(["tlsproxy", "log", "nginx"], 6.0, sequential=False) == [
        ("tlsproxy", 2.0), ("log", 2.0), ("nginx", 2.0)] * 3
    assert run.schedule(two, 10.0, sequential=True) == [("tlsproxy", 10.0), ("nginx", 10.0)]
    assert run.schedule(two, 1.0, sequential=False) == [("tlsproxy", 1.0), ("nginx", 1.0)]
    assert run._method(run.Plan()) == "interleaved, 5 slices of 2 s per server taken in turn"
    assert run._method(run.Plan(sequential=True)) == "sequential, one 10 s run per server"


def test_command_line_plans():
    _, plan = run.parse_args(["--runs", "3", "--duration", "6", "--sequential"])
    assert (plan.runs, plan.duration_s, plan.sequential, plan.idle_connections) == (3, 6.0, True, 2000)
    _, plan = run.parse_args(["--smoke"])
    assert plan == run.SMOKE and not plan.sequential
    for bad in (["--runs", "0"], ["--duration", "0.5"], ["--sequential=yes"]):
        r = subprocess.run([sys.executable, "-m", "bench.run", *bad], cwd=ROOT, capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_pace_reader_frames_responses_split_anywhere():
    from bench.pace import ResponseReader
    wire = (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nServer: x\r\n\r\nhello"
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    for cut in range(1, len(wire)):
        r = ResponseReader()
        assert r.feed(wire[:cut]) + r.feed(wire[cut:]) == [200, 503, 200], cut
        assert r.buf == b""


def test_pace_reader_refuses_what_it_cannot_frame():
    from bench.pace import ResponseReader
    for wire, why in ((b"SSH-2.0-x\r\n\r\n", "status line"), (b"HTTP/1.1 200 OK\r\n\r\n", "Content-Length"),
                      (b"HTTP/1.1 200 OK\r\n" + b"x" * 70000, "64 KiB")):
        with pytest.raises(ValueError, match=why):
            ResponseReader().feed(wire)


def test_combine_slices_of_an_interleaved_step():
    slices = [load.WrkResult(1000.0, 1.0, 5.0, 10.0, 0, 2000),
              load.WrkResult(3000.0, 3.0, 9.0, 30.0, 2, 6000),
              load.WrkResult(2000.0, 2.0, 7.0, 20.0, 1, 4000)]
    c = load.combine(slices)
    assert (c.rps, c.mib_s, c.p50_ms, c.p99_ms, c.errors, c.requests) == (2000.0, 20.0, 2.0, 7.0, 3, 12000)
    assert load.combine([load.WrkResult(5.0, None, None, 0.0, 0, 5)]).p99_ms is None
    with pytest.raises(ValueError):
        load.combine([])
