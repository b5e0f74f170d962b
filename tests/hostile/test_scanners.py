"""TLS scanners against tlsproxy and, side by side, nginx as a TLS 1.3-only terminator with the same
certificate in front of the same app: tlsproxy's report must be no worse on any line.

sslyze (PyPI) takes seconds; testssl.sh (Debian) about 40 s per target, so that one is marked slow.
Severities compared: testssl's OK/INFO < LOW < MEDIUM < HIGH < CRITICAL per finding id (the worst
line of an id counts); sslyze's protocols, cipher suites, curves and vulnerability verdicts.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.hostile.helpers import keepalive_ok, proxy_process, scripted_upstream
from tests.support import PKI, ROOT, nginx_tls13


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    from tests.support import make_pki

    tmp = tmp_path_factory.mktemp("scan")
    pki = make_pki(tmp)
    with scripted_upstream(keepalive_ok) as up, proxy_process(pki, up.port) as proxy, \
            nginx_tls13(pki.cert_dir, up.port, tmp / "nginx") as nginx_port:
        yield pki, tmp, {"tlsproxy": proxy.port, "nginx": nginx_port}


# ---------------------------------------------------------------------------- sslyze

def _sslyze(pki: PKI, port: int, out: Path) -> dict:
    python = str(ROOT / ".venv" / "bin" / "python")
    scans = ["--certinfo", "--sslv2", "--sslv3", "--tlsv1", "--tlsv1_1", "--tlsv1_2", "--tlsv1_3",
             "--compression", "--heartbleed", "--openssl_ccs", "--fallback", "--robot", "--reneg",
             "--elliptic_curves", "--ems", "--early_data", "--resum"]
    subprocess.run([python, "-m", "sslyze", f"--json_out={out}", "--certinfo_ca_file", str(pki.ca_file),
                    "--mozilla_config", "disable", *scans, f"127.0.0.1:{port}"],
                   capture_output=True, timeout=120, check=True)
    return json.loads(out.read_text())["server_scan_results"][0]["scan_result"]


def _accepted(result: dict, version: str) -> set[str]:
    scan = result[f"{version}_cipher_suites"]
    assert scan["status"] == "COMPLETED", scan
    return {c["cipher_suite"]["name"] for c in scan["result"]["accepted_cipher_suites"]}


STRONG_TLS13 = {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"}
STRONG_CURVES = {"X25519", "X448", "secp256r1", "secp384r1", "secp521r1"}


def test_sslyze_report_is_no_worse_than_nginx(targets):
    pki, tmp, ports = targets
    ours = _sslyze(pki, ports["tlsproxy"], tmp / "tlsproxy-sslyze.json")
    theirs = _sslyze(pki, ports["nginx"], tmp / "nginx-sslyze.json")
    for version in ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1", "tls_1_2"):
        assert _accepted(ours, version) <= _accepted(theirs, version), version
        assert not _accepted(ours, version), version
    assert _accepted(ours, "tls_1_3") and _accepted(ours, "tls_1_3") <= STRONG_TLS13
    r = {k: v["result"] for k, v in ours.items() if v["status"] == "COMPLETED"}
    n = {k: v["result"] for k, v in theirs.items() if v["status"] == "COMPLETED"}
    assert not r["tls_compression"]["supports_compression"]
    assert not r["heartbleed"]["is_vulnerable_to_heartbleed"]
    assert not r["openssl_ccs_injection"]["is_vulnerable_to_ccs_injection"]
    assert r["robot"]["robot_result"].startswith("NOT_VULNERABLE")
    assert not r["session_renegotiation"]["is_vulnerable_to_client_renegotiation_dos"]
    scsv = "supports_fallback_scsv"
    assert r["tls_fallback_scsv"][scsv] >= n["tls_fallback_scsv"][scsv]
    assert r["tls_1_3_early_data"]["supports_early_data"] <= n["tls_1_3_early_data"]["supports_early_data"]
    assert r["tls_extended_master_secret"]["supports_ems_extension"] >= \
        n["tls_extended_master_secret"]["supports_ems_extension"]
    ours_curves = {c["name"] for c in r["elliptic_curves"]["supported_curves"]}
    nginx_curves = {c["name"] for c in n["elliptic_curves"]["supported_curves"]}
    assert ours_curves <= STRONG_CURVES | nginx_curves, ours_curves
    deployment = r["certificate_info"]["certificate_deployments"][0]
    custom = [p for p in deployment["path_validation_results"]
              if p["trust_store"]["path"] == str(pki.ca_file)
              or "certinfo" in p["trust_store"]["name"].lower()]
    assert custom and all(p["was_validation_successful"] for p in custom), custom


# ---------------------------------------------------------------------------- testssl.sh

RANK = {"OK": 0, "INFO": 0, "DEBUG": 0, "LOW": 1, "MEDIUM": 2, "HIGH": 3, "CRITICAL": 4,
        "WARN": 1, "FATAL": 5}
# Lines that describe the test setup, not the server: same certificate and CA for both.
SETUP = {"scanTime", "engine_problem", "service", "DNS_CAArecord"}


def _testssl(pki: PKI, port: int, out: Path) -> dict[str, tuple[int, str]]:
    if shutil.which("testssl") is None:
        pytest.skip("testssl.sh is not installed (make deps)")
    subprocess.run(["testssl", "--quiet", "--color", "0", "--warnings", "off", "--ip", "one",
                    "--add-ca", str(pki.ca_file), "--connect-timeout", "10", "--openssl-timeout", "10",
                    "--jsonfile", str(out), "-p", "-S", "-P", "-f", "-U", "-h", f"https://127.0.0.1:{port}/"],
                   capture_output=True, timeout=240)
    worst: dict[str, tuple[int, str]] = {}
    for f in json.loads(out.read_text()):
        rank = RANK.get(f["severity"], 1)
        if f["id"] not in worst or rank > worst[f["id"]][0]:
            worst[f["id"]] = (rank, f"{f['severity']}: {f['finding']}")
    return worst


@pytest.mark.slow
def test_testssl_report_is_no_worse_than_nginx_on_any_line(targets):
    pki, tmp, ports = targets
    ours = _testssl(pki, ports["tlsproxy"], tmp / "tlsproxy-testssl.json")
    theirs = _testssl(pki, ports["nginx"], tmp / "nginx-testssl.json")
    for name, port in (("tlsproxy", ports["tlsproxy"]), ("nginx", ports["nginx"])):
        report = ours if name == "tlsproxy" else theirs
        for attempt in (2, 3):
            if not any(text.startswith("WARN: check failed") for _rank, text in report.values()):
                break
            # A check of testssl's own failed, not the server: its openssl timed out (a loaded
            # machine), or its TLS 1.3 session-resumption check lost a race — `s_client -sess_out
            # </dev/null` exits as soon as the handshake is done, and saves no session when the
            # server's NewSessionTicket arrives a moment later (about 1 connection in 20 against
            # tlsproxy here, whose ticket follows the client's Finished by a scheduler wake-up).
            # Scan again before judging.
            report = _testssl(pki, port, tmp / f"{name}-testssl-{attempt}.json")
        if name == "tlsproxy":
            ours = report
        else:
            theirs = report
    assert len(ours) > 40 and len(theirs) > 40
    worse = {i: (ours[i][1], theirs.get(i, (0, "absent"))[1]) for i in ours
             if i not in SETUP and ours[i][0] > theirs.get(i, (0, ""))[0]}
    assert not worse, json.dumps(worse, indent=1)
    for must in ("SSLv2", "SSLv3", "TLS1", "TLS1_1", "TLS1_2", "heartbleed", "CCS", "ROBOT", "CRIME_TLS",
                 "BREACH", "POODLE_SSL", "secure_client_renego", "LUCKY13", "cert_chain_of_trust"):
        assert ours[must][0] == 0, (must, ours[must])
