"""``python -m bench.footprint`` runs and measures what it says (one start, no dependency table)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_footprint_smoke():
    r = subprocess.run([sys.executable, "-m", "bench.footprint", "--starts", "1", "--no-deps", "--json"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    (one,) = out["installs"]
    assert one["starts"] == 1
    assert 0 < one["first_tls_ms_median"] < 20_000
    assert 0 < one["first_tls_cpu_ms_median"] <= one["first_tls_ms_median"] + 50
    assert 0 <= one["ready_after_tls_ms_median"] < 5_000
    # an idle serve is bigger than a bare interpreter, and within issue 19's budget (docs/performance.md:
    # a new dependency loaded by every serve shows up here first)
    assert out["python_rss_mib"] < one["idle_rss_mib"] <= 36, one


def test_bad_starts_is_a_usage_error():
    r = subprocess.run([sys.executable, "-m", "bench.footprint", "--starts", "0"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--starts" in r.stderr
