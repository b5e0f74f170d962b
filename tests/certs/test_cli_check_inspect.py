"""``tlsproxy certs check`` (dry-run reload) and ``tlsproxy certs inspect`` on real files."""

from __future__ import annotations

import datetime as dt
import json
import os

import pytest
from cryptography import x509

from tlsproxy.certs.generate import issue, make_ca

from .clihelp import assert_usage_error, openssl, run

NOW = dt.datetime.now(dt.UTC)


@pytest.fixture(scope="module")
def ca():
    return make_ca("check test CA")


def write_pair(d, pair, ca=None, *, key=None):
    d.mkdir(parents=True, exist_ok=True)
    (d / "tls.crt").write_bytes(pair.cert_pem)
    (d / "tls.key").write_bytes(key if key is not None else pair.key_pem)
    if ca is not None:
        (d / "ca.crt").write_bytes(ca.cert_pem)
    return d


def kubelet_secret(root, pair, ca, stamp="..2026_11_25_12_00_00.000000001"):
    """Lay out a Secret as kubelet's atomic writer does: files in a timestamped dir, ``..data`` a
    symlink to it, and each key a symlink through ``..data``."""
    root.mkdir(parents=True, exist_ok=True)
    ts = root / stamp
    write_pair(ts, pair, ca)
    tmp = root / "..data_tmp"
    os.symlink(stamp, tmp)
    os.replace(tmp, root / "..data")
    for name in ("tls.crt", "tls.key", "ca.crt"):
        if not (root / name).is_symlink():
            os.symlink(f"..data/{name}", root / name)
    return root


def serial_of(pair) -> str:
    return format(pair.cert.serial_number, "x")


# ---------------------------------------------------------------------------- check

def test_check_ok_prints_what_would_be_served(tmp_path, ca):
    pair = issue(ca, "web.shop.svc", dns=("web", "web.shop.svc"), ips=("10.1.2.3",))
    d = write_pair(tmp_path / "s", pair, ca)
    proc = run("certs", "check", d)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert out.startswith(f"ok: a reload would serve {d / 'tls.crt'}")
    assert "subject:    CN=web.shop.svc" in out
    assert "DNS:web, DNS:web.shop.svc, IP:10.1.2.3" in out
    assert f"serial:     {serial_of(pair)}" in out
    assert "(365.0 days left)" in out or "(364.9 days left)" in out
    assert "note:" not in out


def test_check_json(tmp_path, ca):
    pair = issue(ca, "web", dns=("web",))
    d = write_pair(tmp_path / "s", pair, ca)
    proc = run("certs", "check", d, "--json")
    assert proc.returncode == 0
    report = json.loads(proc.stdout)
    assert report["ok"] is True and report["serving"]["serial"] == serial_of(pair)
    assert report["serving"]["dns_names"] == ["web"] and 364 < report["serving"]["days_left"] <= 365
    assert len(report["digest"]) == 64


def test_check_reads_a_kubelet_secret_through_data(tmp_path, ca):
    first, second = issue(ca, "first"), issue(ca, "second")
    root = kubelet_secret(tmp_path / "mnt", first, ca)
    assert f"serial:     {serial_of(first)}" in run("certs", "check", root).stdout
    kubelet_secret(root, second, ca, stamp="..2026_11_25_12_05_00.000000002")   # the atomic swap
    proc = run("certs", "check", root)
    assert proc.returncode == 0, proc.stdout
    assert f"serial:     {serial_of(second)}" in proc.stdout and "CN=second" in proc.stdout


@pytest.mark.parametrize(("case", "reason"), [
    ("mismatch", "private key does not match the certificate"),
    ("expired", "certificate expired at"),
    ("truncated-key", "private key does not parse"),
    ("empty-cert", "certificate is empty"),
    ("missing-key", "private key is missing"),
    ("garbage-ca", "CA bundle is empty or not PEM"),
])
def test_check_refuses_what_a_reload_would_refuse(tmp_path, ca, case, reason):
    good = issue(ca, "web")
    d = write_pair(tmp_path / "s", good, ca)
    if case == "mismatch":               # a plain `cp` of the new tls.crt before the new tls.key
        (d / "tls.crt").write_bytes(issue(ca, "web").cert_pem)
    elif case == "expired":
        old = issue(ca, "web", not_before=NOW - dt.timedelta(days=10), not_after=NOW - dt.timedelta(days=1))
        write_pair(d, old)
    elif case == "truncated-key":        # half-written
        (d / "tls.key").write_bytes(good.key_pem[: len(good.key_pem) // 2])
    elif case == "empty-cert":
        (d / "tls.crt").write_bytes(b"")
    elif case == "missing-key":
        (d / "tls.key").unlink()
    elif case == "garbage-ca":
        (d / "ca.crt").write_bytes(b"garbage\n")
    proc = run("certs", "check", d)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.startswith("refused: ") and reason in proc.stdout, proc.stdout
    assert "keep serving the previous certificate" in proc.stdout
    assert "Traceback" not in proc.stderr
    js = json.loads(run("certs", "check", d, "--json").stdout)
    assert js["ok"] is False and reason in js["reason"] and js["path"].startswith(str(d))


def test_check_not_yet_valid_is_served_with_a_note(tmp_path, ca):
    future = issue(ca, "web", not_before=NOW + dt.timedelta(days=1), not_after=NOW + dt.timedelta(days=30))
    d = write_pair(tmp_path / "s", future, ca)
    proc = run("certs", "check", d)
    assert proc.returncode == 0
    assert "note: certificate is not valid before" in proc.stdout


def test_check_notes_a_chain_not_signed_by_ca_crt(tmp_path, ca):
    other = make_ca("another CA")
    d = write_pair(tmp_path / "s", issue(other, "web"), ca)
    proc = run("certs", "check", d)
    assert proc.returncode == 0
    assert "is not signed by a certificate in" in proc.stdout


def test_check_with_cert_and_key_files(tmp_path, ca):
    pair = issue(ca, "web")
    d = write_pair(tmp_path / "s", pair)
    proc = run("certs", "check", "--cert", d / "tls.crt", "--key", d / "tls.key")
    assert proc.returncode == 0 and "CN=web" in proc.stdout
    proc = run("certs", "check", "--cert", d / "tls.crt", "--key", d / "nope.key")
    assert proc.returncode == 1 and "private key is missing" in proc.stdout


def test_check_require_client_cert_needs_a_ca(tmp_path, ca):
    d = write_pair(tmp_path / "s", issue(ca, "web"))
    proc = run("certs", "check", d, "--require-client-cert")
    assert proc.returncode == 1 and "needs a ca.crt" in proc.stdout
    (d / "ca.crt").write_bytes(ca.cert_pem)
    assert run("certs", "check", d, "--require-client-cert").returncode == 0


def test_check_client_ca_file(tmp_path, ca):
    d = write_pair(tmp_path / "s", issue(ca, "web"))
    (tmp_path / "clients.pem").write_bytes(make_ca("clients").cert_pem)
    assert run("certs", "check", d, "--client-ca", tmp_path / "clients.pem").returncode == 0
    (tmp_path / "bad.pem").write_text("nope\n")
    proc = run("certs", "check", d, "--client-ca", tmp_path / "bad.pem")
    assert proc.returncode == 1 and "client CA bundle is empty or not PEM" in proc.stdout
    proc = run("certs", "check", d, "--client-ca", tmp_path / "missing.pem")
    assert proc.returncode == 1 and "client CA bundle is missing" in proc.stdout


def test_check_bad_usage_is_exit_2(tmp_path, ca):
    d = write_pair(tmp_path / "s", issue(ca, "web"))
    assert_usage_error(run("certs", "check", tmp_path / "missing"), "no such directory")
    assert_usage_error(run("certs", "check", d / "tls.crt"), "no such directory")
    assert_usage_error(run("certs", "check", d, "--cert", d / "tls.crt"), "not both")
    assert_usage_error(run("certs", "check", "--cert", d / "tls.crt"), "--key")
    assert_usage_error(run("certs", "check"), "Secret directory")


# ---------------------------------------------------------------------------- inspect

def test_inspect_file_with_key_beside(tmp_path, ca):
    pair = issue(ca, "web", dns=("web.shop.svc",), uris=("spiffe://cluster.local/ns/shop/sa/web",))
    d = write_pair(tmp_path / "s", pair)
    proc = run("certs", "inspect", d / "tls.crt")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "subject:     CN=web" in out and "issuer:      CN=check test CA,O=tlsproxy" in out
    assert "SANs:        DNS:web.shop.svc, URI:spiffe://cluster.local/ns/shop/sa/web" in out
    assert f"serial:      {serial_of(pair)}" in out
    assert f"key ({d / 'tls.key'}): matches the certificate" in out
    fp = openssl("x509", "-noout", "-fingerprint", "-sha256", "-in", d / "tls.crt").stdout
    assert fp.split("=", 1)[1].strip().replace(":", "").lower() in out


def test_inspect_json_and_a_mismatched_key(tmp_path, ca):
    pair = issue(ca, "api")
    (tmp_path / "api.crt").write_bytes(pair.cert_pem)
    (tmp_path / "api.key").write_bytes(issue(ca, "other").key_pem)
    proc = run("certs", "inspect", tmp_path / "api.crt", "--json")
    assert proc.returncode == 0
    report = json.loads(proc.stdout)
    (cert,) = report["certificates"]
    assert cert["subject"] == "CN=api" and cert["serial"] == serial_of(pair)
    assert cert["issuer"] == "CN=check test CA,O=tlsproxy" and cert["expired"] is False
    assert dt.datetime.fromisoformat(cert["not_after"]) == pair.cert.not_valid_after_utc
    assert report["key"] == {"path": str(tmp_path / "api.key"), "matches": False,
                             "reason": "key does not match the certificate"}
    assert "DOES NOT match" in run("certs", "inspect", tmp_path / "api.crt").stdout


def test_inspect_combined_pem_and_chain(tmp_path, ca):
    pair = issue(ca, "bundle")
    f = tmp_path / "all.pem"
    f.write_bytes(pair.cert_pem + ca.cert_pem + pair.key_pem)
    report = json.loads(run("certs", "inspect", f, "--json").stdout)
    assert [c["subject"] for c in report["certificates"]] == ["CN=bundle", "CN=check test CA,O=tlsproxy"]
    assert report["certificates"][1]["is_ca"] is True
    assert report["key"]["matches"] is True


def test_inspect_secret_dir_shows_ca_and_expired_is_not_an_error(tmp_path, ca):
    old = issue(ca, "old", not_before=NOW - dt.timedelta(days=40), not_after=NOW - dt.timedelta(days=10))
    root = kubelet_secret(tmp_path / "mnt", old, ca)
    proc = run("certs", "inspect", root)
    assert proc.returncode == 0, proc.stderr
    assert "(EXPIRED)" in proc.stdout and "days left:   -10.0" in proc.stdout
    assert "CA[0]" in proc.stdout and "key type:    ecdsa (CA)" in proc.stdout
    report = json.loads(run("certs", "inspect", root, "--json").stdout)
    assert report["certificates"][0]["expired"] is True
    assert report["key"]["matches"] is True and report["ca_certificates"][0]["is_ca"] is True


def test_inspect_without_a_key(tmp_path, ca):
    (tmp_path / "only.crt").write_bytes(issue(ca, "only").cert_pem)
    proc = run("certs", "inspect", tmp_path / "only.crt")
    assert proc.returncode == 0 and "key: none found" in proc.stdout
    assert json.loads(run("certs", "inspect", tmp_path / "only.crt", "--json").stdout)["key"] is None


def test_inspect_the_bootstrap_output(tmp_path):
    proc = run("certs", "bootstrap", "--service", "web", "--namespace", "shop", "--out", tmp_path)
    assert proc.returncode == 0
    report = json.loads(run("certs", "inspect", tmp_path, "--json").stdout)
    leaf = x509.load_pem_x509_certificate((tmp_path / "tls.crt").read_bytes())
    assert report["certificates"][0]["serial"] == format(leaf.serial_number, "x")
    assert report["certificates"][0]["dns_names"][:2] == ["web", "web.shop"]
    assert report["key"]["matches"] is True


def test_inspect_a_ca_only_directory(tmp_path):
    ca_dir = tmp_path / "ca"
    ca_dir.mkdir()
    ca = make_ca("lonely CA")
    (ca_dir / "ca.crt").write_bytes(ca.cert_pem)
    (ca_dir / "ca.key").write_bytes(ca.key_pem)
    report = json.loads(run("certs", "inspect", ca_dir, "--json").stdout)
    assert report["certificates"][0]["subject"] == "CN=lonely CA,O=tlsproxy"
    assert report["certificates"][0]["is_ca"] is True and report["key"]["matches"] is True


def test_inspect_bad_input_is_exit_2(tmp_path):
    (tmp_path / "notpem.crt").write_text("hello\n")
    (tmp_path / "empty").mkdir()
    assert_usage_error(run("certs", "inspect", tmp_path / "missing.crt"), "does not exist")
    assert_usage_error(run("certs", "inspect", tmp_path / "notpem.crt"), "not PEM")
    assert_usage_error(run("certs", "inspect", tmp_path / "empty"), "tls.crt", "missing")
    assert_usage_error(run("certs", "inspect"), "PATH")
