"""The benchmark keeps working: ``python -m bench.run --smoke`` runs end to end and prints its table.

No timing asserts: figures from a shared CI machine mean nothing. What must hold is that every
row was measured for both servers (or says why not), that resumption was really off where the
handshake row needs it, and that the run stopped every process it started."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import load, report

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ("nginx", "wrk", "h2load", "taskset", "openssl", "curl")


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
    assert lines[0].split()[:4] == ["figure", "unit", "tlsproxy", "nginx"]
    for fig in report.FIGURES:
        row = next((line for line in lines if line.startswith(fig.label)), None)
        assert row is not None, f"missing row {fig.label!r}:\n{r.stdout}"
        if "n/a" in row:
            assert fig.key == "outbound"      # the only row allowed to be absent
            continue
        cells = row[len(fig.label):].split()
        if fig.key != "ka_rps_log":           # tlsproxy-only row: nginx is "—"
            assert "—" not in cells[:4], row
    assert "resumption-off port: `s_client -reconnect`" in r.stdout
    assert "instance counted" in r.stdout and " 0 resumed handshakes" in r.stdout
    work = re.search(r"bench: work directory (\S+)", r.stderr).group(1)
    assert not Path(work).exists()                       # removed without --keep
    time.sleep(0.5)
    assert _mentioning(work) == set(), "the benchmark left processes running"


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


def test_report_ratios_floors_and_missing_rows():
    res = report.Results()
    for v in (100, 300, 200):
        res.add("ka_rps", "tlsproxy", v)
    res.add("ka_rps", "nginx", 1000)
    res.add("idle_rss", "tlsproxy", 5.0)
    res.add("idle_rss", "nginx", 2.0)
    res.missing["outbound"] = "n/a (outbound not built)"
    rows = {r[0]: r for r in report.rows(res)}
    ka = rows["(a) keep-alive small requests, wrk -c50"]
    assert ka[2:8] == ["200", "1,000", "0.20", "≥ 0.2", "yes", "100–300 / 1,000"]
    assert rows["(d) RSS per idle handshaken connection"][6] == "**no**"
    assert "n/a (outbound not built)" in rows["(e) outbound origination, wrk -c50 (app → proxy → TLS peer)"]
    md = report.entry(res, title="Run X", facts=["machine: m"], notes=["loaded"])
    assert "### Run X" in md and "| figure |" in md and "- loaded" in md


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
