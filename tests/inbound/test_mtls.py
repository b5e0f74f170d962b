"""Mutual TLS end to end: real PKI, real handshakes, real clients (curl, openssl s_client, Python ssl).

Plus the pure verdict (identity → rules → headers) table-driven, and the settings cross-checks.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import logging
import socket
import ssl
import subprocess
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tests.support import PKI, captured_logs, curl, running_proxy, settings_for, wait_for
from tlsproxy.app import App
from tlsproxy.certs import generate
from tlsproxy.config import build_settings
from tlsproxy.errors import CertError, ConfigError
from tlsproxy.inbound import mtls
from tlsproxy.tls import identity as ident

SPIFFE_FRONT = "spiffe://cluster.local/ns/shop/sa/front"


def der_of(issued: generate.Issued) -> bytes:
    return issued.cert.public_bytes(Encoding.DER)


def write_client(directory: Path, name: str, issued: generate.Issued) -> tuple[str, str]:
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    cert.write_bytes(issued.cert_pem)
    key.write_bytes(issued.key_pem)
    return str(cert), str(key)


def front_client(pki: PKI) -> generate.Issued:
    return pki.issue("front", client=True, server=False, ou="shop", dns=("front.shop.svc",),
                     uris=(SPIFFE_FRONT,))


def curl_with(pki: PKI, proxy, client: tuple[str, str] | None, *extra: str, path: str = "/who"):
    cert_args = ["--cert", client[0], "--key", client[1]] if client else []
    return curl("--cacert", str(pki.ca_file), *cert_args, *extra, f"{proxy.url}{path}", timeout=15)


def s_client(port: int, pki: PKI, client: tuple[str, str] | None = None) -> str:
    """openssl s_client, sending one request and reading until the proxy closes: the alert a
    TLS 1.3 server sends after the client's Finished shows up on that read."""
    args = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3", "-servername", "localhost",
            "-CAfile", str(pki.ca_file), "-ign_eof"]
    if client:
        args += ["-cert", client[0], "-key", client[1]]
    out = subprocess.run(args, input=b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
                         capture_output=True, timeout=20)
    return (out.stdout + out.stderr).decode("utf-8", "replace")


# ---------------------------------------------------------------------------- end to end

def test_allowed_client_reaches_app_with_xfcc(pki, app, tmp_path):
    client = front_client(pki)
    paths = write_client(tmp_path / "c", "front", client)
    settings = settings_for(pki, app.port, client_ca=pki.ca_file, allow_uri=("spiffe://cluster.local/ns/shop/*",))
    with running_proxy(settings) as proxy:
        # A client-supplied XFCC is replaced, never appended to.
        r = curl_with(pki, proxy, paths, "-H", "X-Forwarded-Client-Cert: Hash=forged;Subject=\"CN=admin\"",
                      "-H", "Client-Cert: :Zm9v:")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["path"] == "/who"
        seen = app.seen[-1]
        xfcc_values = [v for k, v in seen.headers if k.lower() == "x-forwarded-client-cert"]
        assert len(xfcc_values) == 1
        xfcc = xfcc_values[0]
        digest = hashlib.sha256(der_of(client)).hexdigest()
        assert xfcc == (f'Hash={digest};Subject="CN=front,OU=shop";URI={SPIFFE_FRONT};DNS=front.shop.svc')
        assert "forged" not in xfcc
        assert seen.header("Client-Cert") is None          # stripped, and not asked for (xfcc mode)
        assert seen.header("Client-Cert-Chain") is None


def test_client_outside_rules_gets_403_and_a_log_line(pki, app, tmp_path):
    stranger = pki.issue("batch", client=True, server=False, ou="jobs",
                         uris=("spiffe://cluster.local/ns/jobs/sa/batch",))
    paths = write_client(tmp_path / "c", "batch", stranger)
    settings = settings_for(pki, app.port, client_ca=pki.ca_file, allow_uri=("spiffe://cluster.local/ns/shop/*",),
                            allow_cn=("front",), allow_ou=("shop",), allow_dns=("front.shop.svc",))
    with captured_logs("tlsproxy.inbound.mtls", logging.DEBUG) as records, running_proxy(settings) as proxy:
        before = len(app.seen)
        r = curl_with(pki, proxy, paths, "-w", "\n%{http_code}")
        assert r.returncode == 0, r.stderr
        body, _, code = r.stdout.decode().rpartition("\n")
        assert code == "403"
        assert "not allowed" in body and len(body) < 200
        assert len(app.seen) == before                      # the app never saw the request
        assert wait_for(lambda: records, timeout=5)
        fields = records[-1].fields
        assert records[-1].getMessage() == "client certificate not allowed"
        assert "CN=batch" in fields["identity"]
        assert "spiffe://cluster.local/ns/jobs/sa/batch" in fields["identity"]
        assert fields["client"].startswith("127.0.0.1:")
        # A second connection with the same certificate (the verdict is cached): refused again, logged again.
        r = curl_with(pki, proxy, paths, "-w", "\n%{http_code}")
        assert r.stdout.decode().endswith("\n403") and len(app.seen) == before
        assert wait_for(lambda: len(records) == 2, timeout=5)


def test_no_client_certificate_gets_certificate_required_alert(pki, app):
    with running_proxy(settings_for(pki, app.port, client_ca=pki.ca_file)) as proxy:
        text = s_client(proxy.port, pki)
        assert "alert certificate required" in text, text     # TLS 1.3 alert 116
        assert "alert number 116" in text, text
        r = curl_with(pki, proxy, None)
        assert r.returncode != 0 and b"HTTP/1.1" not in r.stdout
        failures = proxy.app.metrics.handshake_failures.labels("inbound", "no_client_certificate")
        # the client sees the alert before the proxy's task has counted the failure: wait for it
        assert wait_for(lambda: failures._value.get() >= 2, timeout=5), failures._value.get()


@pytest.mark.parametrize("case, alert", [
    ("unknown_ca", "alert unknown ca"),
    ("expired", "alert certificate expired"),
    ("server_only_eku", "alert unsupported certificate"),
])
def test_bad_client_certificates_are_refused(pki, app, tmp_path, case, alert):
    now = dt.datetime.now(dt.UTC)
    if case == "unknown_ca":
        bad = generate.issue(generate.make_ca("other CA"), "front", client=True, server=False)
    elif case == "expired":
        bad = pki.issue("front", client=True, server=False, not_before=now - dt.timedelta(days=30),
                        not_after=now - dt.timedelta(days=1))
    else:
        bad = pki.issue("front", client=False, server=True)          # EKU serverAuth only
    paths = write_client(tmp_path / "c", case, bad)
    with running_proxy(settings_for(pki, app.port, client_ca=pki.ca_file, allow_cn=("front",))) as proxy:
        before = len(app.seen)
        text = s_client(proxy.port, pki, paths)
        assert alert in text, text
        assert "HTTP/1.1" not in text
        r = curl_with(pki, proxy, paths)
        assert r.returncode != 0, r.stdout
        assert len(app.seen) == before
        failures = proxy.app.metrics.handshake_failures.labels("inbound", "bad_client_certificate")
        assert wait_for(lambda: failures._value.get() >= 2, timeout=5), failures._value.get()


def test_certificate_without_any_eku_is_accepted(pki, app, tmp_path):
    """RFC 5280 4.2.1.12: no EKU extension means no restriction (OpenSSL, Go, Envoy agree; cert-manager
    issues such certificates by default). Pinned here because docs/certificates.md says so."""
    plain = pki.issue("front", client=False, server=False)
    assert not any(isinstance(e.value, x509.ExtendedKeyUsage) for e in plain.cert.extensions)
    paths = write_client(tmp_path / "c", "noeku", plain)
    with running_proxy(settings_for(pki, app.port, client_ca=pki.ca_file, allow_cn=("front",))) as proxy:
        r = curl_with(pki, proxy, paths)
        assert r.returncode == 0, r.stderr
        assert app.seen[-1].header("X-Forwarded-Client-Cert").startswith("Hash=")


def test_spoofed_identity_headers_are_stripped_without_mtls(pki, app):
    with running_proxy(settings_for(pki, app.port)) as proxy:
        r = curl("--cacert", str(pki.ca_file),
                 "-H", 'X-Forwarded-Client-Cert: Hash=00;Subject="CN=admin";URI=spiffe://evil',
                 "-H", "Client-Cert: :Zm9v:", "-H", "Client-Cert-Chain: :YmFy:",
                 "-H", "x-forwarded-client-cert: second", f"{proxy.url}/spoof")
        assert r.returncode == 0, r.stderr
        seen = app.seen[-1]
        assert seen.path == "/spoof"
        names = {k.lower() for k, _ in seen.headers}
        assert not names & {"x-forwarded-client-cert", "client-cert", "client-cert-chain"}, seen.headers


def test_rfc9440_headers_with_python_ssl_client(pki, app, tmp_path):
    client = front_client(pki)
    cert, key = write_client(tmp_path / "c", "front", client)
    settings = settings_for(pki, app.port, client_ca=pki.ca_file, client_cert_header="both")
    with running_proxy(settings) as proxy:
        ctx = ssl.create_default_context(cafile=str(pki.ca_file))
        ctx.load_cert_chain(cert, key)
        handler = urllib.request.HTTPSHandler(context=ctx)
        req = urllib.request.Request(f"{proxy.url}/rfc", headers={"Client-Cert": ":Zm9yZ2Vk:"})
        with urllib.request.build_opener(handler).open(req, timeout=15) as resp:
            assert resp.status == 200
        seen = app.seen[-1]
        assert seen.header("Client-Cert") == ":" + base64.b64encode(der_of(client)).decode() + ":"
        # the verified chain minus the leaf, i.e. our CA (public API on 3.13; rebuilt from the
        # context's CA certificates before it)
        ca_der = pki.ca.cert.public_bytes(Encoding.DER)
        chain = seen.header("Client-Cert-Chain")
        assert chain == ":" + base64.b64encode(ca_der).decode() + ":"
        assert seen.header("X-Forwarded-Client-Cert").startswith("Hash=")


def test_header_mode_none_sends_nothing(pki, app, tmp_path):
    paths = write_client(tmp_path / "c", "front", front_client(pki))
    with running_proxy(settings_for(pki, app.port, client_ca=pki.ca_file, client_cert_header="none",
                                    allow_dns=("FRONT.shop.svc.",))) as proxy:
        r = curl_with(pki, proxy, paths, "-H", "X-Forwarded-Client-Cert: forged")
        assert r.returncode == 0, r.stderr
        names = {k.lower() for k, _ in app.seen[-1].headers}
        assert not names & {"x-forwarded-client-cert", "client-cert", "client-cert-chain"}


def test_require_client_cert_uses_ca_crt_of_cert_dir(pki, app, tmp_path):
    paths = write_client(tmp_path / "c", "front", front_client(pki))
    with running_proxy(settings_for(pki, app.port, require_client_cert=True)) as proxy:
        assert curl_with(pki, proxy, paths).returncode == 0
        assert "alert certificate required" in s_client(proxy.port, pki)
        ready = urllib.request.urlopen(f"http://127.0.0.1:{proxy.admin_port}/readyz", timeout=10)
        assert json.loads(ready.read())["ready"] is True


def test_require_client_cert_without_ca_crt_is_refused(pki, app):
    (pki.cert_dir / "ca.crt").unlink()
    app_obj = App(settings_for(pki, app.port, require_client_cert=True))
    with pytest.raises(CertError, match="client CA"):
        app_obj.load_certificates()


def test_client_ca_reloads_through_build_generation(pki, app, tmp_path):
    """The client CA file is read by App.build_generation with the pair: a reload (SIGHUP, or the
    watcher) swaps in the new CA; a broken CA file is refused and the previous one kept."""
    ca_file = tmp_path / "client-ca" / "ca.crt"
    ca_file.parent.mkdir()
    ca_file.write_bytes(pki.ca.cert_pem)
    new_ca = generate.make_ca("rotated client CA")
    old_client = write_client(tmp_path / "c", "old", front_client(pki))
    new_client = write_client(tmp_path / "c", "new",
                              generate.issue(new_ca, "front", client=True, server=False))
    settings = settings_for(pki, app.port, client_ca=ca_file)
    with running_proxy(settings) as proxy:
        assert ca_file.parent in proxy.app.source.watch_paths
        assert curl_with(pki, proxy, old_client).returncode == 0
        assert curl_with(pki, proxy, new_client).returncode != 0
        ca_file.write_bytes(new_ca.cert_pem)
        proxy.call(proxy.app.load_certificates)
        assert curl_with(pki, proxy, new_client).returncode == 0
        assert curl_with(pki, proxy, old_client).returncode != 0
        ca_file.write_bytes(b"not a certificate\n")
        with pytest.raises(CertError, match="client CA bundle"):
            proxy.app.build_generation()
        assert curl_with(pki, proxy, new_client).returncode == 0   # nothing was swapped


def test_missing_client_ca_file_exits_2(pki, app, tmp_path):
    out = subprocess.run([str(Path(__import__("sys").executable).parent / "tlsproxy"), "serve",
                          "--cert-dir", str(pki.cert_dir), "--client-ca", str(tmp_path / "nope.pem"),
                          "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
                          "--upstream", f"http://127.0.0.1:{app.port}"],
                         capture_output=True, timeout=30)
    assert out.returncode == 2
    last = out.stderr.decode().strip().splitlines()[-1]
    assert last.startswith("tlsproxy: error: ") and "nope.pem" in last and "client CA" in last
    assert b"Traceback" not in out.stderr


# ---------------------------------------------------------------------------- settings

@pytest.mark.parametrize("flags, message", [
    ({"allow-cn": ["front"]}, "--allow-cn needs mutual TLS"),
    ({"allow-uri": ["spiffe://x/*"]}, "--allow-uri needs mutual TLS"),
    ({"require-client-cert": "on", "cert": "/x.crt", "key": "/x.key"}, "give --client-ca FILE"),
    ({"client-cert-header": "envoy"}, "not one of xfcc, rfc9440, both, none"),
])
def test_settings_cross_checks(flags, message):
    with pytest.raises(ConfigError, match=message):
        build_settings(flags, {})


def test_bad_allow_rule_is_a_config_error(pki, app):
    with pytest.raises(ConfigError, match="--allow-uri 'spiffe://\\*/x'"):
        App(settings_for(pki, app.port, client_ca=pki.ca_file, allow_uri=("spiffe://*/x",)))


# ---------------------------------------------------------------------------- the verdict, pure

@pytest.fixture(scope="module")
def ca():
    return generate.make_ca("verdict CA")


@pytest.mark.parametrize("rules, allowed", [
    ({}, True),
    ({"cn": ("front",)}, True),
    ({"cn": ("Front",)}, False),
    ({"ou": ("shop",)}, True),
    ({"dns": ("FRONT.shop.svc",)}, True),
    ({"uri": (SPIFFE_FRONT,)}, True),
    ({"uri": ("spiffe://cluster.local/ns/shop/*",)}, True),
    ({"uri": ("spiffe://cluster.local/ns/other/*",), "cn": ("back",)}, False),
])
def test_verdict_rules(ca, rules, allowed):
    leaf = generate.issue(ca, "front", client=True, ou="shop", dns=("front.shop.svc",), uris=(SPIFFE_FRONT,))
    cfg = mtls.MTLSConfig(enabled=True, rules=ident.AllowRules.parse(**rules))
    v = mtls.verdict(cfg, der_of(leaf))
    assert (v.deny is None) is allowed
    assert "CN=front" in v.identity
    if allowed:
        assert [name for name, _ in v.headers] == [mtls.XFCC]
    else:
        assert v.deny.status == 403 and v.headers == ()


def test_verdict_edges(ca):
    off = mtls.verdict(mtls.MTLSConfig(), b"whatever")
    assert off.deny is None and off.headers == () and off.identity == ""
    on = mtls.MTLSConfig(enabled=True)
    assert mtls.verdict(on, None).deny.status == 403
    assert mtls.verdict(on, b"\x30\x03junk").deny.reason == "forbidden: client certificate does not parse"
    leaf = generate.issue(ca, "front", client=True)
    # rfc9440 without a known chain: Client-Cert only (never the leaf in Client-Cert-Chain)
    v = mtls.verdict(mtls.MTLSConfig(enabled=True, header_mode="rfc9440"), der_of(leaf))
    assert [n for n, _ in v.headers] == [mtls.CLIENT_CERT]
    v = mtls.verdict(mtls.MTLSConfig(enabled=True, header_mode="rfc9440"), der_of(leaf),
                     [der_of(leaf), der_of(ca)])
    assert dict(v.headers)[mtls.CLIENT_CERT_CHAIN] == b":" + base64.b64encode(der_of(ca)) + b":"


def test_verified_chain_der_on_a_live_socket(pki, tmp_path):
    """The chain getter works on this Python (public API on 3.13, rebuilt from the context's CA
    certificates before it)."""
    from tlsproxy.certs.bundle import load_dir
    from tlsproxy.tls.contexts import ServerTLSOptions, server_context

    sctx = server_context([load_dir(pki.cert_dir)], ServerTLSOptions(client_ca_pem=pki.ca.cert_pem))
    cert, key = write_client(tmp_path / "c", "front", front_client(pki))
    cctx = ssl.create_default_context(cafile=str(pki.ca_file))
    cctx.load_cert_chain(cert, key)
    a, b = socket.socketpair()
    with a, b:
        a.settimeout(10)
        b.settimeout(10)
        import threading

        got: list = []
        t = threading.Thread(target=lambda: got.append(sctx.wrap_socket(a, server_side=True)))
        t.start()
        client = cctx.wrap_socket(b, server_hostname="localhost")
        client.sendall(b"x")
        t.join(10)
        server = got[0]
        server.recv(1)
        chain = mtls.verified_chain_der(server)
        assert chain[0] == server.getpeercert(binary_form=True)
        assert chain[-1] == pki.ca.cert.public_bytes(Encoding.DER)


def test_client_ca_configmap_rotation_is_picked_up_by_the_watcher(pki, app, tmp_path):
    """A client CA mounted from a ConfigMap (kubelet's ..data layout) is rotated on disk: the
    watcher reloads it with no call from the test, new handshakes use the new CA."""
    from tests.secret_writers import atomic_write

    mount = tmp_path / "client-ca"
    atomic_write(mount, {"ca.crt": pki.ca.cert_pem})
    new_ca = generate.make_ca("rotated client CA")
    old_client = write_client(tmp_path / "c", "old", front_client(pki))
    new_client = write_client(tmp_path / "c", "new",
                              generate.issue(new_ca, "front", client=True, server=False))
    with running_proxy(settings_for(pki, app.port, client_ca=mount / "ca.crt")) as proxy:
        assert curl_with(pki, proxy, old_client).returncode == 0
        assert curl_with(pki, proxy, new_client).returncode != 0
        generation = proxy.app.store.generation.number
        assert atomic_write(mount, {"ca.crt": new_ca.cert_pem})
        assert wait_for(lambda: proxy.app.store.generation.number > generation, timeout=10)
        assert curl_with(pki, proxy, new_client).returncode == 0
        assert curl_with(pki, proxy, old_client).returncode != 0


def test_chain_from_walks_issuers_by_signature_not_name_alone():
    """The pre-3.13 rebuild of the verified chain (public API only): table of bundles."""
    ca = generate.make_ca()
    impostor = generate.make_ca()          # the same subject name, another key
    assert impostor.cert.subject == ca.cert.subject
    leaf = generate.issue(ca, "front", client=True, server=False)
    leaf_der, ca_der, imp_der = der_of(leaf), der_of(ca), der_of(impostor)
    assert mtls.chain_from(leaf_der, (ca_der,)) == (leaf_der, ca_der)
    assert mtls.chain_from(leaf_der, (imp_der, ca_der)) == (leaf_der, ca_der)
    assert mtls.chain_from(leaf_der, (imp_der,)) == ()     # name matches, signature does not
    assert mtls.chain_from(leaf_der, ()) == ()
    assert mtls.chain_from(b"not DER", (ca_der,)) == ()
