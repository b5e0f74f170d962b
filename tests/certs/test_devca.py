"""The standalone development CA is name-constrained: it can vouch for localhost and loopback (and the
names given with --dev-ca-name), never for a real domain; an unconstrained one is replaced."""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tlsproxy.certs import devca, generate
from tlsproxy.config import parse_dev_ca_name


def _openssl_verify(ca_file, leaf_pem: bytes, tmp_path, name: str) -> subprocess.CompletedProcess:
    leaf = tmp_path / f"{name}.pem"
    leaf.write_bytes(leaf_pem)
    return subprocess.run(["openssl", "verify", "-CAfile", str(ca_file), str(leaf)],
                          capture_output=True, text=True, timeout=30)


def test_ca_is_name_constrained_and_critical(tmp_path):
    made = devca.ensure_ca(tmp_path / "state")
    cert = x509.load_pem_x509_certificate(made.ca_file.read_bytes())
    ext = cert.extensions.get_extension_for_class(x509.NameConstraints)
    assert ext.critical
    assert devca.ca_constraints(cert) == ("localhost", ".localhost", "127.0.0.0/8", "::1/128")
    assert made.created and made.replaced is None


def test_a_leaf_for_a_real_domain_signed_by_the_dev_ca_key_fails_openssl_verification(tmp_path):
    made = devca.ensure_ca(tmp_path / "state")
    ca = generate.Issued(made.ca_file.read_bytes(), (made.dir / "ca.key").read_bytes())
    evil = generate.issue(ca, "example.com", dns=("example.com",))
    r = _openssl_verify(made.ca_file, evil.cert_pem, tmp_path, "evil")
    assert r.returncode != 0
    assert "permitted subtree violation" in (r.stdout + r.stderr)
    # and an IP outside loopback
    evil_ip = generate.issue(ca, "10.0.0.1", ips=("10.0.0.1",))
    r = _openssl_verify(made.ca_file, evil_ip.cert_pem, tmp_path, "evil-ip")
    assert r.returncode != 0 and "permitted subtree violation" in (r.stdout + r.stderr)
    # while the standalone leaf and one for a name under localhost verify
    assert _openssl_verify(made.ca_file, (made.dir / "tls.crt").read_bytes(), tmp_path,
                           "leaf").returncode == 0
    sub = generate.issue(ca, "app.localhost", dns=("app.localhost",))
    assert _openssl_verify(made.ca_file, sub.cert_pem, tmp_path, "sub").returncode == 0


def test_python_ssl_refuses_the_real_domain_too(tmp_path):
    """Python's ssl (OpenSSL's verifier through the public API) in a real handshake."""
    made = devca.ensure_ca(tmp_path / "state")
    ca = generate.Issued(made.ca_file.read_bytes(), (made.dir / "ca.key").read_bytes())
    evil = generate.issue(ca, "example.com", dns=("example.com",))
    (tmp_path / "evil.crt").write_bytes(evil.cert_pem)
    (tmp_path / "evil.key").write_bytes(evil.key_pem)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp_path / "evil.crt", tmp_path / "evil.key")
    client = ssl.create_default_context(cafile=str(made.ca_file))
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname="example.com")
    s = server.wrap_bio(s_in, s_out, server_side=True)
    with pytest.raises(ssl.SSLCertVerificationError, match="permitted subtree violation"):
        for _ in range(10):
            for side in (c, s):
                try:
                    side.do_handshake()
                except ssl.SSLWantReadError:
                    pass
            s_in.write(c_out.read())
            c_in.write(s_out.read())


def test_extra_names_are_permitted_and_in_the_leaf(tmp_path):
    names = ("myapp.test", "192.168.7.0/24", "10.1.2.3")
    made = devca.ensure_ca(tmp_path / "state", names)
    cert = x509.load_pem_x509_certificate(made.ca_file.read_bytes())
    assert set(devca.ca_constraints(cert)) == {"localhost", ".localhost", "127.0.0.0/8", "::1/128",
                                               "myapp.test", "192.168.7.0/24", "10.1.2.3/32"}
    leaf = x509.load_pem_x509_certificate((made.dir / "tls.crt").read_bytes())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "myapp.test"}
    assert {str(a) for a in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1", "10.1.2.3"}
    r = _openssl_verify(made.ca_file, (made.dir / "tls.crt").read_bytes(), tmp_path, "leaf")
    assert r.returncode == 0, r.stdout + r.stderr


def test_an_unconstrained_ca_is_replaced_with_a_log_line(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    old = generate.make_ca("tlsproxy development CA")     # what earlier versions made
    (state / "ca.crt").write_bytes(old.cert_pem)
    (state / "ca.key").write_bytes(old.key_pem)
    code = ("import logging, sys\nfrom pathlib import Path\nfrom tlsproxy import log\n"
            "log.setup('json', 'info', sys.stdout)\nfrom tlsproxy.certs import devca\n"
            f"m = devca.ensure_ca(Path({str(state)!r}))\nprint('created', m.created)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    assert '"event":"development CA replaced"' in out and "no name constraints" in out
    assert "created True" in out
    assert (state / "ca.crt").read_bytes() != old.cert_pem
    new = x509.load_pem_x509_certificate((state / "ca.crt").read_bytes())
    assert devca.ca_constraints(new) is not None
    # the leaf was re-issued by the new CA
    leaf = x509.load_pem_x509_certificate((state / "tls.crt").read_bytes())
    leaf.verify_directly_issued_by(new)
    # and a second start keeps it
    again = devca.ensure_ca(state)
    assert not again.created and (state / "ca.crt").read_bytes() == new.public_bytes(Encoding.PEM)


def test_other_names_than_requested_replace_the_ca(tmp_path):
    state = tmp_path / "state"
    first = devca.ensure_ca(state, ("a.test",))
    second = devca.ensure_ca(state, ("b.test",))
    assert second.created and "differ" in second.replaced
    assert first.ca_file.read_bytes() != b"" and devca.ca_constraints(
        x509.load_pem_x509_certificate(second.ca_file.read_bytes()))[-1] == "b.test"


@pytest.mark.parametrize("raw, expected", [
    ("MyApp.Test", "myapp.test"), (".corp.test", ".corp.test"), ("10.0.0.0/8", "10.0.0.0/8"),
    ("10.1.2.3", "10.1.2.3/32"), ("::1", "::1/128"),
])
def test_dev_ca_name_values(raw, expected):
    assert parse_dev_ca_name(raw) == expected


@pytest.mark.parametrize("raw", ["", "*.example.com", "a..b", "-x.test", "x" * 64 + ".test", "a b"])
def test_bad_dev_ca_names_are_refused(raw):
    with pytest.raises(ValueError):
        parse_dev_ca_name(raw)


def test_bad_dev_ca_name_flag_is_one_line_exit_2(tmp_path):
    tlsproxy = str(Path(sys.executable).parent / "tlsproxy")
    r = subprocess.run([tlsproxy, "serve", "--state-dir", str(tmp_path), "--dev-ca-name", "*.x.test"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "--dev-ca-name" in r.stderr, r.stderr
