"""1 GiB up and down through a real `tlsproxy serve` process: bytes intact, RSS bounded."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from tests.support import TLSPROXY, accepts, curl, wait_for
from tests.support import free_port as _free_port

GiB = 1 << 30


def _rss_kib(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(field)


@pytest.mark.slow
def test_one_gib_upload_and_download_keep_rss_bounded(pki, app, tmp_path):
    port, admin = _free_port(), _free_port()
    big = tmp_path / "upload.bin"
    proc = subprocess.Popen([TLSPROXY, "serve", "--listen", f"127.0.0.1:{port}",
                             "--admin", f"127.0.0.1:{admin}", "--cert-dir", str(pki.cert_dir),
                             "--upstream", app.url, "--access-log", "off"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # /healthz answers once the admin listener is up, which is before the TLS listener binds
        assert wait_for(lambda: curl(f"http://127.0.0.1:{admin}/healthz").returncode == 0, 15)
        assert wait_for(lambda: accepts(port), 15)
        curl("--cacert", str(pki.ca_file), "-o", "/dev/null", f"https://localhost:{port}/warmup")
        baseline = _rss_kib(proc.pid)
        t0 = time.monotonic()
        r = curl("--cacert", str(pki.ca_file), "-o", "/dev/null", "-w", "%{size_download}",
                 f"https://localhost:{port}/bytes/{GiB}", timeout=240)
        down_s = time.monotonic() - t0
        assert r.returncode == 0, r.stderr
        assert int(r.stdout) == GiB
        with open(big, "wb") as f:
            f.truncate(GiB)           # sparse: costs no disk
        t0 = time.monotonic()
        r = curl("--cacert", str(pki.ca_file), "-T", str(big), "-X", "POST", "-w", "\n%{http_code}",
                 f"https://localhost:{port}/upload", timeout=240)
        up_s = time.monotonic() - t0
        assert r.stdout.endswith(b"200"), r.stderr
        assert app.seen[-1].body_len == GiB
        peak = _rss_kib(proc.pid, "VmHWM")
        grown_mib = (peak - baseline) / 1024
        print(f"\n1 GiB down {GiB / down_s / 1e6:.0f} MB/s, up {GiB / up_s / 1e6:.0f} MB/s; "
              f"RSS baseline {baseline / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB (+{grown_mib:.1f} MiB)")
        assert grown_mib < 64, f"RSS grew by {grown_mib:.1f} MiB while streaming 1 GiB"
    finally:
        proc.terminate()
        proc.wait(30)
        if os.path.exists(big):
            big.unlink()
