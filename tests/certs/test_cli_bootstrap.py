"""``tlsproxy certs bootstrap``: real files checked by openssl, real handshakes, curl, exit codes."""

from __future__ import annotations

import base64
import datetime as dt
import http.server
import json
import shutil
import ssl
import stat
import subprocess
import threading

import kubernetes_validate
import pytest
import yaml
from cryptography import x509

from tlsproxy.certs.bundle import load_dir
from tlsproxy.tls.contexts import ClientTLSOptions, ServerTLSOptions, client_context, server_context
from tlsproxy.tls.identity import Identity, xfcc_value

from .clihelp import LiveProxy, assert_usage_error, handshake, openssl, run

SANS = ["web", "web.shop", "web.shop.svc", "web.shop.svc.cluster.local"]
SPIFFE = "spiffe://cluster.local/ns/shop/sa/checkout"


@pytest.fixture(scope="module")
def boot(tmp_path_factory):
    """One bootstrap with every option, shared by the read-only tests below."""
    out = tmp_path_factory.mktemp("boot") / "secret"      # not existing yet: must be created
    proc = run("certs", "bootstrap", "--service", "web", "--namespace", "shop", "--out", out,
               "--dns", "web.example.com", "--ip", "10.0.0.7", "--ip", "::1",
               "--client", "checkout", "--client-uri", SPIFFE)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    return out, proc.stdout


def test_writes_the_four_files_and_the_client_dir_with_owner_only_keys(boot):
    out, stdout = boot
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "ca.key", "client", "tls.crt", "tls.key"]
    assert sorted(p.name for p in (out / "client").iterdir()) == ["ca.crt", "tls.crt", "tls.key"]
    for key in (out / "ca.key", out / "tls.key", out / "client" / "tls.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    for cert in (out / "ca.crt", out / "tls.crt", out / "client" / "tls.crt"):
        assert stat.S_IMODE(cert.stat().st_mode) == 0o644, cert
    assert (out / "client" / "ca.crt").read_bytes() == (out / "ca.crt").read_bytes()
    assert "wrote 7 files" in stdout and "CN=web.shop.svc" in stdout


def test_openssl_verifies_server_and_client_purposes(boot):
    out, _ = boot
    ok = openssl("verify", "-CAfile", out / "ca.crt", "-purpose", "sslserver", out / "tls.crt")
    assert ok.returncode == 0 and ": OK" in ok.stdout, ok.stdout + ok.stderr
    ok = openssl("verify", "-CAfile", out / "ca.crt", "-purpose", "sslclient", out / "client" / "tls.crt")
    assert ok.returncode == 0 and ": OK" in ok.stdout, ok.stdout + ok.stderr
    # each certificate is good for its own purpose only
    bad = openssl("verify", "-CAfile", out / "ca.crt", "-purpose", "sslserver", out / "client" / "tls.crt")
    assert bad.returncode != 0
    bad = openssl("verify", "-CAfile", out / "ca.crt", "-purpose", "sslclient", out / "tls.crt")
    assert bad.returncode != 0


def test_openssl_x509_shows_sans_key_type_and_usages(boot):
    out, _ = boot
    text = openssl("x509", "-noout", "-text", "-in", out / "tls.crt").stdout
    assert "DNS:web, DNS:web.shop, DNS:web.shop.svc, DNS:web.shop.svc.cluster.local, " \
           "DNS:web.example.com, IP Address:10.0.0.7, IP Address:0:0:0:0:0:0:0:1" in text
    assert "Subject: CN = web.shop.svc" in text
    assert "ASN1 OID: prime256v1" in text and "Public-Key: (256 bit)" in text
    assert "TLS Web Server Authentication" in text and "TLS Web Client Authentication" not in text
    assert "CA:FALSE" in text
    client = openssl("x509", "-noout", "-text", "-in", out / "client" / "tls.crt").stdout
    assert "Subject: CN = checkout" in client
    assert f"URI:{SPIFFE}" in client
    assert "TLS Web Client Authentication" in client and "TLS Web Server Authentication" not in client
    ca = openssl("x509", "-noout", "-text", "-in", out / "ca.crt").stdout
    assert "CA:TRUE" in ca and "Certificate Sign" in ca


def test_default_validity_is_a_year_and_days_is_honoured(boot, tmp_path):
    out, _ = boot
    leaf = x509.load_pem_x509_certificate((out / "tls.crt").read_bytes())
    now = dt.datetime.now(dt.UTC)
    assert abs((leaf.not_valid_after_utc - now) - dt.timedelta(days=365)) < dt.timedelta(minutes=10)
    assert leaf.not_valid_before_utc < now    # backdated a little for clock skew
    proc = run("certs", "bootstrap", "--service", "a", "--namespace", "b", "--out", tmp_path, "--days", "30")
    assert proc.returncode == 0, proc.stderr
    leaf = x509.load_pem_x509_certificate((tmp_path / "tls.crt").read_bytes())
    assert abs((leaf.not_valid_after_utc - now) - dt.timedelta(days=30)) < dt.timedelta(minutes=10)


def test_python_ssl_mtls_handshake_with_the_bootstrap_output(boot):
    out, _ = boot
    server = load_dir(out)
    ca_pem = (out / "ca.crt").read_bytes()
    sctx = server_context([server], ServerTLSOptions(client_ca_pem=ca_pem))
    cctx = client_context(ClientTLSOptions(ca_pem=ca_pem, client_bundle=load_dir(out / "client")))
    for name in SANS:
        res = handshake(sctx, cctx, name)
        assert res["server_error"] is None, res
        assert res["version"] == "TLSv1.3" and res["data"] == b"ok"
    ident = Identity.from_der(res["peer_der"])
    assert ident.cn == "checkout" and ident.uris == (SPIFFE,)
    assert xfcc_value(ident).endswith(f';Subject="CN=checkout";URI={SPIFFE}')
    # a name outside the SANs is refused by the client's hostname check
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(sctx, cctx, "web.other.svc")


def test_server_refuses_a_client_without_a_certificate(boot):
    out, _ = boot
    ca_pem = (out / "ca.crt").read_bytes()
    sctx = server_context([load_dir(out)], ServerTLSOptions(client_ca_pem=ca_pem))
    cctx = client_context(ClientTLSOptions(ca_pem=ca_pem))
    try:
        res = handshake(sctx, cctx, "web.shop.svc")
    except (ssl.SSLError, ConnectionError):
        return      # TLS 1.3: the client may see the alert at its first read
    assert res["server_error"] is not None and "CERTIFICATE" in res["server_error"].upper()


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's naming
        der = self.connection.getpeercert(binary_form=True)
        body = (Identity.from_der(der).subject if der else "anonymous").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_trusts_the_bootstrap_ca_and_presents_the_client_cert(boot):
    out, _ = boot
    ca_pem = (out / "ca.crt").read_bytes()
    sctx = server_context([load_dir(out)], ServerTLSOptions(client_ca_pem=ca_pem))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    srv.socket = sctx.wrap_socket(srv.socket, server_side=True)
    port = srv.server_address[1]
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        url = f"https://web.shop.svc.cluster.local:{port}/"
        base = ["curl", "-sS", "--max-time", "10",
                "--resolve", f"web.shop.svc.cluster.local:{port}:127.0.0.1", "--cacert", str(out / "ca.crt")]
        ok = subprocess.run([*base, "--cert", str(out / "client" / "tls.crt"),
                             "--key", str(out / "client" / "tls.key"), url],
                            capture_output=True, text=True, timeout=20)
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout == "CN=checkout"
        # no client certificate: the mTLS server refuses the handshake
        no_cert = subprocess.run([*base, url], capture_output=True, text=True, timeout=20)
        assert no_cert.returncode != 0
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(10)


def test_wildcard_dns_extra(tmp_path):
    proc = run("certs", "bootstrap", "--service", "web", "--namespace", "shop", "--out", tmp_path,
               "--dns", "*.web.example.com")
    assert proc.returncode == 0, proc.stderr
    text = openssl("x509", "-noout", "-ext", "subjectAltName", "-in", tmp_path / "tls.crt").stdout
    assert "DNS:*.web.example.com" in text


def test_rsa_key_type(tmp_path):
    proc = run("certs", "bootstrap", "--service", "web", "--namespace", "shop", "--out", tmp_path,
               "--key-type", "rsa")
    assert proc.returncode == 0, proc.stderr
    for name in ("tls.crt", "ca.crt"):
        text = openssl("x509", "-noout", "-text", "-in", tmp_path / name).stdout
        assert "rsaEncryption" in text and "Public-Key: (2048 bit)" in text, name
    assert openssl("verify", "-CAfile", tmp_path / "ca.crt", tmp_path / "tls.crt").returncode == 0
    ctx = server_context([load_dir(tmp_path)])
    cctx = client_context(ClientTLSOptions(ca_pem=(tmp_path / "ca.crt").read_bytes()))
    assert handshake(ctx, cctx, "web.shop.svc")["data"] == b"ok"


def test_ca_dir_reuses_the_ca_and_keeps_its_key_in_place(boot, tmp_path):
    ca_dir, _ = boot
    out = tmp_path / "second"
    proc = run("certs", "bootstrap", "--service", "api", "--namespace", "shop", "--out", out,
               "--ca-dir", ca_dir)
    assert proc.returncode == 0, proc.stderr
    assert "(reused" in proc.stdout
    assert (out / "ca.crt").read_bytes() == (ca_dir / "ca.crt").read_bytes()
    assert not (out / "ca.key").exists()
    ok = openssl("verify", "-CAfile", ca_dir / "ca.crt", out / "tls.crt")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # a directory without ca.key is not a CA directory
    proc = run("certs", "bootstrap", "--service", "api", "--namespace", "shop", "--out", tmp_path / "x",
               "--ca-dir", out)
    assert_usage_error(proc, "ca.key", "missing")


def test_reissue_into_the_ca_directory_itself(tmp_path):
    args = ("certs", "bootstrap", "--service", "web", "--namespace", "shop", "--out", tmp_path)
    assert run(*args).returncode == 0
    ca_key, ca_crt, old = ((tmp_path / n).read_bytes() for n in ("ca.key", "ca.crt", "tls.crt"))
    proc = run(*args, "--ca-dir", tmp_path, "--force")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "ca.key").read_bytes() == ca_key and (tmp_path / "ca.crt").read_bytes() == ca_crt
    assert (tmp_path / "tls.crt").read_bytes() != old
    assert openssl("verify", "-CAfile", tmp_path / "ca.crt", tmp_path / "tls.crt").returncode == 0


def test_ca_dir_leaf_may_not_outlive_the_ca(boot, tmp_path):
    ca_dir, _ = boot
    proc = run("certs", "bootstrap", "--service", "api", "--namespace", "shop", "--out", tmp_path,
               "--ca-dir", ca_dir, "--days", "3650")
    assert_usage_error(proc, "outlives the CA")
    assert not (tmp_path / "tls.crt").exists()


def test_existing_files_are_kept_unless_force(tmp_path):
    args = ("certs", "bootstrap", "--service", "web", "--namespace", "shop", "--out", tmp_path)
    assert run(*args).returncode == 0
    before = (tmp_path / "tls.key").read_bytes()
    proc = run(*args)
    assert_usage_error(proc, "already exists", "--force")
    assert (tmp_path / "tls.key").read_bytes() == before
    assert run(*args, "--force").returncode == 0
    assert (tmp_path / "tls.key").read_bytes() != before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp files left


def test_secret_yaml_prints_valid_kubernetes_tls_secrets(tmp_path):
    proc = run("certs", "bootstrap", "--service", "web", "--namespace", "shop", "--format", "secret-yaml",
               "--client", "checkout")
    assert proc.returncode == 0, proc.stderr
    docs = list(yaml.safe_load_all(proc.stdout))
    assert [d["metadata"]["name"] for d in docs] == ["web-tls", "checkout-client-tls"]
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30", strict=True)
        assert doc["type"] == "kubernetes.io/tls" and doc["metadata"]["namespace"] == "shop"
        assert sorted(doc["data"]) == ["ca.crt", "tls.crt", "tls.key"]
        # the Secret, mounted, is a directory tlsproxy serves from
        d = tmp_path / doc["metadata"]["name"]
        d.mkdir()
        for name, b64 in doc["data"].items():
            (d / name).write_bytes(base64.b64decode(b64))
        ok = openssl("verify", "-CAfile", d / "ca.crt", d / "tls.crt")
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert load_dir(d).info.subject in ("CN=web.shop.svc", "CN=checkout")
    assert docs[0]["data"]["ca.crt"] == docs[1]["data"]["ca.crt"]


def test_secret_yaml_with_out_also_writes_the_files(tmp_path):
    proc = run("certs", "bootstrap", "--service", "web", "--namespace", "shop", "--format", "secret-yaml",
               "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    (doc,) = yaml.safe_load_all(proc.stdout)
    assert base64.b64decode(doc["data"]["tls.crt"]) == (tmp_path / "tls.crt").read_bytes()


def test_cabundle_prints_the_base64_ca(tmp_path):
    proc = run("certs", "bootstrap", "--service", "web", "--namespace", "shop", "--format", "cabundle",
               "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1
    assert base64.b64decode(lines[0], validate=True) == (tmp_path / "ca.crt").read_bytes()


@pytest.mark.parametrize(("extra", "needles"), [
    (("--out", "{tmp}/d", "--ip", "10.0.0.300"), ("--ip", "10.0.0.300")),
    (("--out", "{tmp}/d", "--ip", "web"), ("--ip",)),
    (("--out", "{tmp}/d", "--dns", "bad_name!"), ("--dns",)),
    (("--out", "{tmp}/d", "--format", "pem"), ("--format", "invalid choice")),
    (("--out", "{tmp}/d", "--key-type", "dsa"), ("--key-type",)),
    (("--out", "{tmp}/d", "--days", "0"), ("--days", "out of range")),
    (("--out", "{tmp}/d", "--days", "soon"), ("--days",)),
    (("--out", "{tmp}/d", "--ca-dir", "{tmp}/missing"), ("missing", "not a directory")),
    (("--out", "{tmp}/d", "--client-uri", "spiffe://x/y"), ("--client-uri needs --client",)),
    (("--out", "{tmp}/file/d",), ("--out", "cannot create")),       # a path under a regular file
    (("--out", "{tmp}/file",), ("--out", "not a directory")),
    (("--format", "files",), ("--out DIR is required",)),
    (("--format", "cabundle",), ("--out DIR is required",)),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, extra, needles):
    (tmp_path / "file").write_text("not a directory")
    args = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    proc = run("certs", "bootstrap", "--service", "web", "--namespace", "shop", *args)
    assert_usage_error(proc, *needles)
    assert not (tmp_path / "d").exists()


def test_bad_service_and_missing_namespace(tmp_path):
    proc = run("certs", "bootstrap", "--service", "Web_1", "--namespace", "shop", "--out", tmp_path)
    assert_usage_error(proc, "--service", "not a valid Kubernetes name")
    assert_usage_error(run("certs", "bootstrap", "--service", "web", "--out", tmp_path), "--namespace")
    assert_usage_error(run("certs"), "bootstrap, check or inspect")



@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_against_a_live_tlsproxy_serving_the_bootstrap_output(boot):
    """The Secret directory bootstrap writes is what ``tlsproxy serve --cert-dir`` serves."""
    out, _ = boot
    with LiveProxy("--cert-dir", out) as proxy:
        for name in SANS:
            res = proxy.curl(name, "--cacert", out / "ca.crt")
            assert res.returncode == 0, res.stderr
            assert json.loads(res.stdout)["x-forwarded-proto"] == "https"
        res = proxy.curl("other.svc", "--cacert", out / "ca.crt")
        assert res.returncode == 60, (res.returncode, res.stderr)   # CURLE_PEER_FAILED_VERIFICATION


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_live_mtls_with_bootstrap_clients_identity_rules_and_xfcc(boot, tmp_path):
    """--client output is a working mTLS client: allowed by URI rule, identity reaches the app in
    X-Forwarded-Client-Cert (a spoofed one is replaced); a client outside the rules gets 403."""
    out, _ = boot
    intruder = tmp_path / "intruder"
    proc = run("certs", "bootstrap", "--service", "x", "--namespace", "shop", "--out", intruder,
               "--ca-dir", out, "--client", "intruder")
    assert proc.returncode == 0, proc.stderr
    ca = ("--cacert", out / "ca.crt")
    with LiveProxy("--cert-dir", out, "--require-client-cert", "on",
                   "--allow-uri", "spiffe://cluster.local/ns/shop/*") as proxy:
        res = proxy.curl("web.shop.svc", *ca, "--cert", out / "client" / "tls.crt",
                         "--key", out / "client" / "tls.key", "-H", "X-Forwarded-Client-Cert: Hash=spoofed")
        assert res.returncode == 0, res.stderr
        seen = json.loads(res.stdout)
        client = x509.load_pem_x509_certificate((out / "client" / "tls.crt").read_bytes())
        assert seen["x-forwarded-client-cert"] == xfcc_value(Identity.from_certificate(client))
        assert f"URI={SPIFFE}" in seen["x-forwarded-client-cert"]
        res = proxy.curl("web.shop.svc", *ca, "-w", "\\n%{http_code}",
                         "--cert", intruder / "client" / "tls.crt", "--key", intruder / "client" / "tls.key")
        assert res.returncode == 0, res.stderr
        assert res.stdout.rsplit("\n", 1)[1] == "403"
        assert "not allowed" in res.stdout
        res = proxy.curl("web.shop.svc", *ca)                        # no client certificate at all
        assert res.returncode != 0
