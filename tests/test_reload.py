"""Hot reload end to end: real files written as kubelet / cp / mv do, the real watcher, real
handshakes reading the served serial (Python ssl and openssl s_client), and the real binary for
SIGHUP, exit codes and --wait-for-cert."""

from __future__ import annotations

import http.client
import logging
import os
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509

from bench.rotation import Proxy
from bench.rotation import run as run_rotation
from tests.admin.scrape import get, scrape, value
from tests.secret_writers import atomic_write, copy_files, move_files, pair_payload
from tests.support import TLSPROXY, client_context, running_proxy, settings_for, wait_for
from tlsproxy.certs.bundle import key_type_of

BOUND_S = 5.0          # functional bound for "the new certificate is served" (the figure is < 1 s)


def served_serial(port: int, pki, *, ctx: ssl.SSLContext | None = None) -> int:
    ctx = ctx or client_context(pki)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as s:
        return x509.load_der_x509_certificate(s.getpeercert(binary_form=True)).serial_number


def openssl_serial(port: int, sigalgs: str) -> tuple[int, str]:
    """Serial and key type of the certificate openssl s_client gets when it offers only ``sigalgs``."""
    out = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
                          "-tls1_3", "-sigalgs", sigalgs], input=b"", capture_output=True, timeout=20)
    pem = out.stdout[out.stdout.index(b"-----BEGIN CERTIFICATE-----"):]
    pem = pem[: pem.index(b"-----END CERTIFICATE-----") + 25]
    cert = x509.load_pem_x509_certificate(pem)
    return cert.serial_number, key_type_of(cert)


def _serial_becomes(port: int, pki, serial: int, bound: float = BOUND_S) -> float:
    """Poll new handshakes until ``serial`` is served; seconds it took (fails past ``bound``)."""
    t0 = time.monotonic()
    assert wait_for(lambda: served_serial(port, pki) == serial, timeout=bound, interval=0.02), \
        f"serial {serial:x} not served within {bound}s"
    return time.monotonic() - t0


def _issue(pki, key_type: str = "ecdsa"):
    return pki.issue("localhost", dns=("localhost",), ips=("127.0.0.1",), key_type=key_type)


def _kubelet_secret(pki, d: Path, key_type: str = "ecdsa", extra: dict | None = None):
    leaf = _issue(pki, key_type)
    atomic_write(d, pair_payload(leaf.cert_pem, leaf.key_pem, pki.ca.cert_pem, extra))
    return leaf


def _reload_samples(proxy, result: str) -> float:
    return value(scrape(proxy.admin_port), "tlsproxy_certificate_reloads_total", role="server", result=result)


# ---------------------------------------------------------------------------- in-process proxy

def test_kubelet_rotation_new_handshakes_get_new_cert_open_connections_keep_going(pki, app, tmp_path,
                                                                                    caplog):
    caplog.set_level(logging.INFO, logger="tlsproxy")
    d = tmp_path / "vol"
    old = _kubelet_secret(pki, d)
    with running_proxy(settings_for(pki, app.port, cert_dir=d)) as proxy:
        assert served_serial(proxy.port, pki) == old.cert.serial_number
        conn = http.client.HTTPSConnection("localhost", proxy.port, context=client_context(pki), timeout=10)
        conn.request("GET", "/before")
        assert conn.getresponse().read() and conn.sock is not None
        new = _kubelet_secret(pki, d)
        took = _serial_becomes(proxy.port, pki, new.cert.serial_number)
        # the connection opened before the swap still works, on its original certificate
        conn.request("GET", "/after")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read()
        peer = x509.load_der_x509_certificate(conn.sock.getpeercert(binary_form=True))
        assert peer.serial_number == old.cert.serial_number
        conn.close()
        assert _reload_samples(proxy, "success") >= 2     # startup + the rotation
        samples = scrape(proxy.admin_port)
        assert value(samples, "tlsproxy_certificate_not_after_seconds", role="server",
                     serial=format(new.cert.serial_number, "x"),
                     subject="CN=localhost") == new.cert.not_valid_after_utc.timestamp()
        assert value(samples, "tlsproxy_certificate_last_reload_timestamp_seconds", role="server") > 0
    reloaded = [r for r in caplog.records if r.getMessage() == "certificate reloaded"]
    assert reloaded, "no reload log line"
    fields = reloaded[-1].fields
    assert fields["serial"] == format(new.cert.serial_number, "x")
    assert fields["old_serial"] == format(old.cert.serial_number, "x")
    assert "not_after" in fields and "old_not_after" in fields
    print(f"kubelet swap -> new handshake: {took:.3f}s")


def test_cp_half_written_pair_keeps_the_old_cert_until_complete(pki, app, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="tlsproxy")
    d = tmp_path / "plain"
    old = _issue(pki)
    copy_files(d, pair_payload(old.cert_pem, old.key_pem))
    with running_proxy(settings_for(pki, app.port, cert_dir=d)) as proxy:
        new = _issue(pki)
        copy_files(d, {"tls.crt": new.cert_pem})        # `cp tls.crt` … and the key much later
        assert wait_for(lambda: proxy.app.store.last_error is not None, timeout=BOUND_S)
        assert served_serial(proxy.port, pki) == old.cert.serial_number
        assert "does not match" in proxy.app.store.last_error
        assert _reload_samples(proxy, "failure") == 1
        errors = [r for r in caplog.records
                  if r.levelno == logging.ERROR and "reload failed" in r.getMessage()]
        assert errors and errors[0].fields["file"] == str(d / "tls.key")
        assert "does not match" in errors[0].fields["reason"]
        copy_files(d, {"tls.key": new.key_pem})
        _serial_becomes(proxy.port, pki, new.cert.serial_number)
        assert proxy.app.store.last_error is None


def test_mv_of_new_files_is_picked_up(pki, app, tmp_path):
    d = tmp_path / "plain"
    old = _issue(pki)
    copy_files(d, pair_payload(old.cert_pem, old.key_pem))
    with running_proxy(settings_for(pki, app.port, cert_dir=d)) as proxy:
        new = _issue(pki)
        move_files(d, pair_payload(new.cert_pem, new.key_pem), staging=tmp_path / "staging")
        _serial_becomes(proxy.port, pki, new.cert.serial_number)


def test_garbage_never_replaces_good_and_is_retried_on_next_change(pki, app, tmp_path):
    d = tmp_path / "vol"
    old = _kubelet_secret(pki, d)
    with running_proxy(settings_for(pki, app.port, cert_dir=d)) as proxy:
        atomic_write(d, {"tls.crt": b"-----BEGIN CERTIFICATE-----\ntruncated", "tls.key": old.key_pem})
        assert wait_for(lambda: proxy.app.store.last_error is not None, timeout=BOUND_S)
        assert str(d / "tls.crt") in proxy.app.store.last_error
        assert served_serial(proxy.port, pki) == old.cert.serial_number
        code, body, _ = get(proxy.admin_port, "/readyz")
        assert code == 200, body         # still ready: the good certificate is still served
        new = _kubelet_secret(pki, d)
        _serial_becomes(proxy.port, pki, new.cert.serial_number)


@pytest.mark.parametrize("layout", ["secret-dir", "flags"])
def test_ecdsa_and_rsa_side_by_side_reload_together(pki, app, tmp_path, layout):
    d = tmp_path / "dual"

    def publish():
        ec, rsa = _issue(pki, "ecdsa"), _issue(pki, "rsa")
        if layout == "secret-dir":
            atomic_write(d, pair_payload(ec.cert_pem, ec.key_pem, pki.ca.cert_pem,
                                         {"tls2.crt": rsa.cert_pem, "tls2.key": rsa.key_pem}))
        else:
            move_files(d, {"ec.crt": ec.cert_pem, "ec.key": ec.key_pem, "rsa.crt": rsa.cert_pem,
                           "rsa.key": rsa.key_pem}, staging=tmp_path / "staging")
        return ec.cert.serial_number, rsa.cert.serial_number

    ec1, rsa1 = publish()
    extra = {"cert_dir": d} if layout == "secret-dir" else {
        "cert_dir": None, "cert": d / "rsa.crt", "key": d / "rsa.key",
        "cert2": d / "ec.crt", "key2": d / "ec.key"}
    with running_proxy(settings_for(pki, app.port, **extra)) as proxy:
        assert openssl_serial(proxy.port, "RSA-PSS+SHA256") == (rsa1, "rsa")
        assert openssl_serial(proxy.port, "ECDSA+SHA256") == (ec1, "ecdsa")
        ec2, rsa2 = publish()
        assert wait_for(lambda: served_serial(proxy.port, pki) in (ec2, rsa2), timeout=BOUND_S)
        assert wait_for(lambda: openssl_serial(proxy.port, "RSA-PSS+SHA256")[0] == rsa2, timeout=BOUND_S)
        assert wait_for(lambda: openssl_serial(proxy.port, "ECDSA+SHA256")[0] == ec2, timeout=BOUND_S)


def test_rotation_every_second_under_load_fails_no_request(tmp_path):
    """The short version of bench/rotation.py (which runs 30 s and prints the figures)."""
    figures = run_rotation(duration_s=6.0, clients=2, rotate_every_s=1.0, workdir=tmp_path)
    summary = figures.summary()
    print(summary)
    assert figures.requests > 20
    assert figures.failures == 0, summary["failure_samples"]
    assert figures.rotations >= 4 and figures.rotations_seen == figures.rotations
    assert max(figures.swap_to_handshake_s) < BOUND_S


# ---------------------------------------------------------------------------- the real binary

def _binary_args(app, *more: str) -> list[str]:
    return ["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--upstream", app.url,
            "--drain-delay", "0", *more]


def test_sighup_forces_a_reload_the_watcher_cannot_see(pki, app, tmp_path):
    """--cert/--key are symlinks into another directory: a `cp` there makes no event in the watched
    directory, and the periodic re-check is off, so only SIGHUP picks the new pair up."""
    real, visible = tmp_path / "real", tmp_path / "visible"
    old = _issue(pki)
    copy_files(real, pair_payload(old.cert_pem, old.key_pem))
    visible.mkdir()
    for name in ("tls.crt", "tls.key"):
        os.symlink(real / name, visible / name)
    proxy = Proxy(*_binary_args(app, "--cert", str(visible / "tls.crt"), "--key", str(visible / "tls.key"),
                                "--reload-interval", "0"))
    try:
        port = proxy.port_of("listening")
        assert served_serial(port, pki) == old.cert.serial_number
        new = _issue(pki)
        copy_files(real, pair_payload(new.cert_pem, new.key_pem))
        time.sleep(1.0)                                   # nothing should notice on its own
        assert served_serial(port, pki) == old.cert.serial_number
        proxy.proc.send_signal(signal.SIGHUP)
        ev = proxy.wait_event(lambda e: e.get("event") == "certificate reloaded")
        assert ev["serial"] == format(new.cert.serial_number, "x")
        assert ev["old_serial"] == format(old.cert.serial_number, "x")
        assert served_serial(port, pki) == new.cert.serial_number
        # SIGHUP with nothing changed still rebuilds (a forced reload), and the proxy keeps serving
        proxy.proc.send_signal(signal.SIGHUP)
        proxy.wait_event(lambda e: e.get("event") == "certificate reloaded" and e.get("generation") == 3)
        assert served_serial(port, pki) == new.cert.serial_number
    finally:
        proxy.stop()
    assert proxy.proc.returncode == 0


def _run_serve(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([TLSPROXY, "serve", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
                           "--log-format", "json", *args], capture_output=True, text=True, timeout=timeout)


def _error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [x for x in proc.stderr.splitlines() if x.startswith("tlsproxy: error:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_startup_without_usable_material_exits_2(pki, tmp_path):
    proc = _run_serve("--cert-dir", str(tmp_path / "nonexistent"))
    assert proc.returncode == 2
    assert _error_line(proc) == f"tlsproxy: error: {tmp_path / 'nonexistent'}: does not exist"
    d = tmp_path / "mismatch"
    copy_files(d, {"tls.crt": _issue(pki).cert_pem, "tls.key": _issue(pki).key_pem})
    proc = _run_serve("--cert-dir", str(d))
    assert proc.returncode == 2
    line = _error_line(proc)
    assert str(d / "tls.key") in line and "does not match" in line
    (tmp_path / "empty").mkdir()
    proc = _run_serve("--cert-dir", str(tmp_path / "empty"))
    assert proc.returncode == 2 and "tls.crt: certificate is missing" in _error_line(proc)


def test_wait_for_cert_gives_up_with_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    t0 = time.monotonic()
    proc = _run_serve("--cert-dir", str(tmp_path / "empty"), "--wait-for-cert", "1s")
    assert proc.returncode == 2
    line = _error_line(proc)
    assert "no usable certificate after waiting 1s" in line and "certificate is missing" in line
    assert time.monotonic() - t0 < 20


def test_wait_for_cert_serves_once_the_secret_is_populated(pki, app, tmp_path):
    d = tmp_path / "vol"
    d.mkdir()                              # an optional Secret's mount: empty until it exists
    proxy = Proxy(*_binary_args(app, "--cert-dir", str(d), "--wait-for-cert", "60s"))
    try:
        admin = proxy.port_of("admin listening")
        proxy.wait_event(lambda e: e.get("event") == "waiting for certificate")
        code, body, _ = get(admin, "/readyz")
        assert code == 503 and b"waiting for certificate" in body
        assert not [e for e in proxy.events if e.get("event") == "listening"]
        leaf = _kubelet_secret(pki, d)
        port = proxy.port_of("listening")
        assert served_serial(port, pki) == leaf.cert.serial_number
        assert wait_for(lambda: get(admin, "/readyz")[0] == 200, timeout=BOUND_S)
        ctx = client_context(pki)
        conn = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=10)
        conn.request("GET", "/hello")
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        proxy.stop()
    assert proxy.proc.returncode == 0


def test_sigterm_while_waiting_for_cert_exits_0(tmp_path, app):
    d = tmp_path / "vol"
    d.mkdir()
    proxy = Proxy(*_binary_args(app, "--cert-dir", str(d), "--wait-for-cert", "60s"))
    try:
        proxy.wait_event(lambda e: e.get("event") == "waiting for certificate")
        proxy.proc.send_signal(signal.SIGTERM)
        assert proxy.proc.wait(15) == 0
    finally:
        proxy.stop()
