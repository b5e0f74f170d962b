"""Load generators (wrk, h2load, curl, openssl s_client) and pure parsers of what they print.

All clients run pinned to the load CPU, bounded by a timeout, and with ``OPENSSL_CONF`` pointing at
``openssl_conf`` so every client offers the same TLS 1.3 cipher suite and key exchange group.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .pace import PaceResult, percentile
from .procs import CPU_LOAD, pinned

CIPHERSUITE = "TLS_AES_128_GCM_SHA256"
GROUP = "X25519"
WARMUP_S = 1.0      # the fixed-rate generators' warm-up before their measured seconds


def openssl_conf(path: Path) -> Path:
    """A client-side OpenSSL config forcing one TLS 1.3 suite and one group (wrk and h2load read
    the default config at start; s_client and curl get the same values as options too)."""
    path.write_text(f"""openssl_conf = default_conf
[default_conf]
ssl_conf = ssl_sect
[ssl_sect]
system_default = system_default_sect
[system_default_sect]
MinProtocol = TLSv1.3
Ciphersuites = {CIPHERSUITE}
Groups = {GROUP}
""")
    return path


def client_env(conf: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["OPENSSL_CONF"] = str(conf)
    return env


# ---------------------------------------------------------------------------- parsers (pure)

_TIME = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}
_BYTES = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _TIME[m.group(2)]


@dataclass(frozen=True)
class WrkResult:
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    mib_s: float
    errors: int            # socket errors + non-2xx/3xx
    requests: int


def parse_wrk(text: str) -> WrkResult:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if not rps:
        raise ValueError("wrk printed no Requests/sec:\n" + text[-2000:])
    tr = re.search(r"Transfer/sec:\s+([\d.]+)(B|KB|MB|GB|TB)", text)
    mib = float(tr.group(1)) * _BYTES[tr.group(2)] / (1 << 20) if tr else 0.0
    p50 = re.search(r"^\s+50%\s+(\S+)", text, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", text, re.M)
    errors = 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if sock:
        errors += sum(int(x) for x in sock.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if non2xx:
        errors += int(non2xx.group(1))
    reqs = re.search(r"(\d+) requests in", text)
    return WrkResult(float(rps.group(1)), _ms(p50.group(1)) if p50 else None,
                     _ms(p99.group(1)) if p99 else None, mib, errors, int(reqs.group(1)) if reqs else 0)


def combine(slices: list[WrkResult]) -> WrkResult:
    """One figure from wrk runs of equal length (the slices of an interleaved step): the mean rate
    and throughput, the median of the slices' p50 and p99, errors and requests summed."""
    if not slices:
        raise ValueError("no wrk results to combine")
    n = len(slices)
    p50s = [r.p50_ms for r in slices if r.p50_ms is not None]
    p99s = [r.p99_ms for r in slices if r.p99_ms is not None]
    return WrkResult(sum(r.rps for r in slices) / n, percentile(p50s, 50) if p50s else None,
                     percentile(p99s, 50) if p99s else None, sum(r.mib_s for r in slices) / n,
                     sum(r.errors for r in slices), sum(r.requests for r in slices))


@dataclass(frozen=True)
class RateResult:
    p50_ms: float
    p99_ms: float
    achieved_rps: float
    failed: int


def parse_h2load_log(text: str, duration_s: float) -> RateResult:
    """h2load ``--log-file``: start µs since epoch, status, µs until the end of the response."""
    lat, failed = [], 0
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        status, micros = int(parts[1]), int(parts[2])
        if not 200 <= status < 400:
            failed += 1
            continue
        lat.append(micros / 1000.0)
    if not lat:
        raise ValueError("h2load logged no successful request")
    return RateResult(percentile(lat, 50), percentile(lat, 99), len(lat) / duration_s, failed)


@dataclass(frozen=True)
class H2Result:
    rps: float
    requests: int          # succeeded
    errors: int            # failed + errored + timeout
    protocol: str          # what h2load negotiated ("h2")


def parse_h2load(text: str) -> H2Result:
    """h2load's summary: ``finished in 1.00s, 9630.00 req/s, …`` and the ``requests:`` line."""
    fin = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", text)
    req = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, "
                    r"(\d+) errored, (\d+) timeout", text)
    if not fin or not req:
        raise ValueError("h2load printed no summary:\n" + text[-2000:])
    proto = re.search(r"Application protocol: (\S+)", text)
    return H2Result(float(fin.group(1)), int(req.group(1)), sum(int(x) for x in req.groups()[1:]),
                    proto.group(1) if proto else "?")


def combine_h2(slices: list[H2Result]) -> H2Result:
    """One figure from h2load runs of equal length: the mean rate, requests and errors summed."""
    if not slices:
        raise ValueError("no h2load results to combine")
    protocols = {r.protocol for r in slices}
    return H2Result(sum(r.rps for r in slices) / len(slices), sum(r.requests for r in slices),
                    sum(r.errors for r in slices), protocols.pop() if len(protocols) == 1 else "mixed")


def parse_reconnect(text: str) -> tuple[int, int]:
    """``openssl s_client -reconnect`` output → (new sessions, reused sessions)."""
    return len(re.findall(r"^New, TLSv1\.3", text, re.M)), len(re.findall(r"^Reused, TLSv1\.3", text, re.M))


# ---------------------------------------------------------------------------- runners

def _run(argv: list[str], env: dict, timeout_s: float) -> str:
    r = subprocess.run(pinned(CPU_LOAD, argv), capture_output=True, text=True, env=env, timeout=timeout_s,
                       stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({r.returncode}): {(r.stderr or r.stdout)[-800:]}")
    return r.stdout + r.stderr


def wrk(url: str, *, connections: int, duration_s: float, env: dict, close: bool = False,
        threads: int = 1) -> WrkResult:
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration_s:g}s", "--latency", "--timeout", "5s"]
    if close:
        argv += ["-H", "Connection: close"]
    return parse_wrk(_run([*argv, url], env, duration_s + 30))


def h2load_fixed_rate(url: str, *, rate: int, clients: int, duration_s: float, env: dict,
                      log_file: Path) -> RateResult:
    """``rate`` requests/s in total from ``clients`` keep-alive HTTP/1.1 connections."""
    per_client = max(1, rate // clients)
    log_file.unlink(missing_ok=True)
    _run(["h2load", "--h1", "-c", str(clients), "--rps", str(per_client), "-D", f"{duration_s:g}",
          "--warm-up-time", f"{WARMUP_S:g}", "--tls13-ciphers", CIPHERSUITE, "--groups", GROUP,
          f"--log-file={log_file}", url], env, duration_s + 30)
    return parse_h2load_log(log_file.read_text(), duration_s)


def paced(port: int, *, rate: int, connections: int, duration_s: float, ca: Path, env: dict) -> PaceResult:
    """``rate`` requests/s at evenly spaced times over ``connections`` keep-alive connections
    (bench/pace.py; latency from each request's planned time)."""
    argv = [sys.executable, str(Path(__file__).with_name("pace.py")), "--port", str(port),
            "--rate", str(rate), "--connections", str(connections), "--duration", f"{duration_s:g}",
            "--warmup", f"{WARMUP_S:g}", "--cafile", str(ca)]
    out = _run(argv, env, duration_s + 30)
    return PaceResult(**json.loads(out.strip().splitlines()[-1]))


def h2load(url: str, *, clients: int, streams: int, duration_s: float, env: dict) -> H2Result:
    """HTTP/2 over TLS (ALPN h2): ``clients`` connections with ``streams`` requests in flight each."""
    return parse_h2load(_run(["h2load", "-c", str(clients), "-m", str(streams), "-D", f"{duration_s:g}",
                              "--tls13-ciphers", CIPHERSUITE, "--groups", GROUP, url], env, duration_s + 30))


def offers_h2(port: int, ca: Path, timeout_s: float = 10) -> bool:
    """Whether the TLS server on ``port`` selects ALPN h2 for a client that offers only h2."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        return tls.selected_alpn_protocol() == "h2"


def curl_download_mib_s(url: str, ca: Path, env: dict, timeout_s: float = 120) -> float:
    # HTTP/1.1 on both sides, like for like: curl prefers h2 when ALPN offers it (tlsproxy does since
    # HTTP/2; the nginx port of row (c) does not), which made row (c) compare h2 with HTTP/1.1
    out = _run(["curl", "-sS", "--http1.1", "--cacert", str(ca), "--tlsv1.3", "--tls13-ciphers", CIPHERSUITE,
                "--curves", GROUP, "-o", "/dev/null", "-w", "%{speed_download} %{http_code}",
                "--max-time", str(int(timeout_s)), url], env, timeout_s + 10)
    speed, code = out.split()[-2:]
    if code != "200":
        raise RuntimeError(f"download answered {code}")
    return float(speed) / (1 << 20)


def _s_client(port: int, ca: Path) -> list[str]:
    return ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
            "-CAfile", str(ca)]


_REQUEST = "GET /small HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


def _s_client_run(argv: list[str], env: dict) -> str:
    r = subprocess.run(pinned(CPU_LOAD, [*argv, "-tls1_3", "-ciphersuites", CIPHERSUITE, "-groups", GROUP,
                                         "-ign_eof"]),
                       input=_REQUEST, capture_output=True, text=True, env=env, timeout=30)
    return r.stdout + r.stderr


def reconnect_check(port: int, ca: Path, env: dict) -> tuple[int, int]:
    """``openssl s_client -reconnect`` (5 reconnections) → (new, reused).

    Caution: OpenSSL 3.0's s_client reconnects right after the handshake, before a TLS 1.3 server's
    tickets (sent after the handshake) are read, so it reports "New" even against a server that
    does resume; :func:`resumption_check` is the check that can tell."""
    return parse_reconnect(_s_client_run([*_s_client(port, ca), "-reconnect"], env))


def resumption_check(port: int, ca: Path, env: dict, work: Path, attempts: int = 3) -> tuple[int, int]:
    """One full request with ``s_client -sess_out`` (so the tickets are read and saved), then
    ``attempts`` connections offering that session with ``-sess_in`` → (new, reused) among those."""
    sess = work / f"session-{port}.pem"
    sess.unlink(missing_ok=True)
    _s_client_run([*_s_client(port, ca), "-sess_out", str(sess)], env)
    if not sess.exists():
        return attempts, 0
    new = reused = 0
    for _ in range(attempts):
        n, r = parse_reconnect(_s_client_run([*_s_client(port, ca), "-sess_in", str(sess)], env))
        new, reused = new + n, reused + r
    return new, reused


def negotiated(port: int, ca: Path, env: dict) -> str:
    """The suite and group a client actually got, for the record."""
    r = subprocess.run(pinned(CPU_LOAD, [*_s_client(port, ca), "-brief"]), input="", capture_output=True,
                       text=True, env=env, timeout=30)
    text = r.stdout + r.stderr
    suite = re.search(r"Ciphersuite: (\S+)", text)
    group = re.search(r"(?:Negotiated TLS1.3 group|Server Temp Key): ([^\n]+)", text)
    return f"{suite.group(1) if suite else '?'} / {group.group(1).strip() if group else '?'}"
