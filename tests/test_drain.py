"""SIGTERM under load, against the real binary: readiness 503 → keep serving for --drain-delay →
listeners close → in-flight requests finish → exit 0. No in-flight request is lost."""

from __future__ import annotations

import concurrent.futures
import json
import os
import queue
import signal
import socket
import ssl
import time

import httpx

from bench.rotation import Proxy as _SubprocessProxy
from tests.admin.scrape import get
from tests.support import wait_for

DRAIN_DELAY_S = 1.5
DRAIN_TIMEOUT_S = 15
IN_FLIGHT = 8
SLOW_S = 3          # outlives the drain delay: still running when the listeners close


class Proxy(_SubprocessProxy):
    """bench/rotation.py's ``tlsproxy serve`` subprocess, plus what the drain tests need."""

    def drain_log(self) -> None:
        while True:
            try:
                self.events.append(self.lines.get_nowait())
            except queue.Empty:
                return

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _port(ev: dict) -> int:
    return int(ev["bound"].rsplit(":", 1)[1])


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except ConnectionRefusedError:
        return True


def test_sigterm_under_load_loses_no_in_flight_request(pki, app):
    proxy = Proxy("--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--upstream", app.url,
                  "--cert-dir", str(pki.cert_dir), "--drain-delay", f"{DRAIN_DELAY_S}s",
                  "--drain-timeout", f"{DRAIN_TIMEOUT_S}s")
    try:
        tls_port = _port(proxy.wait_event(lambda e: e.get("event") == "listening"))
        admin_port = _port(proxy.wait_event(lambda e: e.get("event") == "admin listening"))
        assert wait_for(lambda: get(admin_port, "/readyz")[0] == 200)
        ctx = ssl.create_default_context(cafile=str(pki.ca_file))

        def one(i: int) -> tuple[int, dict]:
            with httpx.Client(verify=ctx, timeout=30) as c:
                r = c.get(f"https://localhost:{tls_port}/sleep/{SLOW_S}/{i}")
                return r.status_code, r.json()

        with concurrent.futures.ThreadPoolExecutor(IN_FLIGHT) as pool:
            futures = [pool.submit(one, i) for i in range(IN_FLIGHT)]
            # every request has reached the app (so it is in flight) before the signal
            assert wait_for(lambda: len(app.seen) == IN_FLIGHT, timeout=15)
            t0 = time.monotonic()
            os.kill(proxy.proc.pid, signal.SIGTERM)
            # readiness turns 503 at once …
            assert wait_for(lambda: get(admin_port, "/readyz")[0] == 503, timeout=DRAIN_DELAY_S / 2,
                            interval=0.01)
            # … while new connections are still served during the delay …
            with httpx.Client(verify=ctx, timeout=10) as c:
                assert c.get(f"https://localhost:{tls_port}/late").status_code == 200
            assert time.monotonic() - t0 < DRAIN_DELAY_S
            # … and are refused only once the delay is over
            assert wait_for(lambda: _refused(tls_port), timeout=DRAIN_TIMEOUT_S, interval=0.02)
            refused_after = time.monotonic() - t0
            results = [f.result(timeout=30) for f in futures]
        assert refused_after >= DRAIN_DELAY_S - 0.05
        assert [status for status, _ in results] == [200] * IN_FLIGHT
        assert sorted(body["path"] for _, body in results) == \
            sorted(f"/sleep/{SLOW_S}/{i}" for i in range(IN_FLIGHT))
        assert proxy.proc.wait(DRAIN_TIMEOUT_S) == 0
        proxy.drain_log()
        names = [e.get("event") for e in proxy.events]
        for event in ("starting", "certificate loaded", "listening", "admin listening", "signal received",
                      "drain started", "listeners closed", "drain finished"):
            assert event in names, (event, names)
        finished = next(e for e in proxy.events if e.get("event") == "drain finished")
        assert finished["cut_connections"] is False
        started = next(e for e in proxy.events if e.get("event") == "starting")
        assert started["drain_delay_s"] == DRAIN_DELAY_S and started["upstream"] == app.url
        assert "PRIVATE" not in json.dumps(proxy.events)       # no key material in any log line
    finally:
        proxy.kill()


def test_drain_timeout_cuts_what_is_still_running_and_still_exits_0(pki, app):
    proxy = Proxy("--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--upstream", app.url,
                  "--cert-dir", str(pki.cert_dir), "--drain-delay", "0.2s", "--drain-timeout", "1s")
    try:
        tls_port = _port(proxy.wait_event(lambda e: e.get("event") == "listening"))
        ctx = ssl.create_default_context(cafile=str(pki.ca_file))
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            fut = pool.submit(lambda: httpx.Client(verify=ctx, timeout=30).get(
                f"https://localhost:{tls_port}/sleep/5"))
            assert wait_for(lambda: len(app.seen) == 1, timeout=15)
            t0 = time.monotonic()
            os.kill(proxy.proc.pid, signal.SIGTERM)
            assert proxy.proc.wait(10) == 0
            elapsed = time.monotonic() - t0
            try:
                fut.result(timeout=10)
                raise AssertionError("the slow request should have been cut")
            except httpx.HTTPError:
                pass
        assert 0.9 <= elapsed < 4, elapsed
        proxy.drain_log()
        finished = next(e for e in proxy.events if e.get("event") == "drain finished")
        assert finished["cut_connections"] is True
    finally:
        proxy.kill()
