"""The small X.509 reader (``certs/der.py``) describes certificates exactly as cryptography does, and
bundles built on it refuse what OpenSSL would refuse, with the same messages."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from tlsproxy.certs import der, generate
from tlsproxy.certs.bundle import CertInfo, build
from tlsproxy.errors import CertError

SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def _described_by_cryptography(cert: x509.Certificate) -> tuple:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = tuple(san.get_values_for_type(x509.DNSName))
        ips = tuple(str(i) for i in san.get_values_for_type(x509.IPAddress))
        uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
    except x509.ExtensionNotFound:
        dns, ips, uris = (), (), ()
    pub = cert.public_key()
    kind = {ec.EllipticCurvePublicKey: "ecdsa", rsa.RSAPublicKey: "rsa",
            ed25519.Ed25519PublicKey: "ed25519"}
    key_type = next(v for k, v in kind.items() if isinstance(pub, k))
    return (cert.subject.rfc4514_string(), cert.issuer.rfc4514_string(), format(cert.serial_number, "x"),
            cert.not_valid_before_utc, cert.not_valid_after_utc, dns, ips, uris, key_type,
            cert.fingerprint(hashes.SHA256()).hex())


def _described_by_der(pem: bytes) -> tuple:
    (d,) = der.pem_certificates(pem)
    i = CertInfo.from_der(der.parse(d))
    return (i.subject, i.issuer, i.serial, i.not_before, i.not_after, i.dns_names, i.ip_addresses,
            i.uris, i.key_type, i.fingerprint_sha256)


def _odd_cert(key, subject: x509.Name, sans: list[x509.GeneralName], serial: int, not_after: dt.datetime):
    now = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
         .serial_number(serial).not_valid_before(now).not_valid_after(not_after))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return b.sign(key, algorithm)


ODD_SUBJECTS = [
    x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "plain")]),
    x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"),
               x509.NameAttribute(NameOID.ORGANIZATION_NAME, 'A, "B" + C; <D> \\ E'),
               x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, " leading and trailing "),
               x509.NameAttribute(NameOID.COMMON_NAME, "#hash Ümlaut ✓")]),
    x509.Name([x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COMMON_NAME, "multi"),
                                               x509.NameAttribute(NameOID.USER_ID, "u1")]),
               x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.DOMAIN_COMPONENT, "example")])]),
    x509.Name([x509.NameAttribute(NameOID.EMAIL_ADDRESS, "ops@example.com"),
               x509.NameAttribute(NameOID.SERIAL_NUMBER, "42"),
               x509.NameAttribute(NameOID.COMMON_NAME, "last")]),
]


@pytest.mark.parametrize("subject", ODD_SUBJECTS, ids=range(len(ODD_SUBJECTS)))
@pytest.mark.parametrize("key", ["ecdsa", "rsa", "ed25519"])
def test_generated_certificates_are_described_alike(subject, key):
    k = {"ecdsa": lambda: ec.generate_private_key(ec.SECP384R1()),
         "rsa": lambda: rsa.generate_private_key(65537, 2048),
         "ed25519": ed25519.Ed25519PrivateKey.generate}[key]()
    sans = [x509.DNSName("a.example"), x509.DNSName("*.b.example"),
            x509.IPAddress(ipaddress.ip_address("10.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1")),
            x509.UniformResourceIdentifier("spiffe://cluster.local/ns/a/sa/b")]
    for serial, not_after in ((1, dt.datetime(2049, 12, 31, tzinfo=dt.UTC)),
                              (2**159 - 1, dt.datetime(2051, 6, 1, tzinfo=dt.UTC))):   # UTC/GeneralizedTime
        cert = _odd_cert(k, subject, sans, serial, not_after)
        pem = cert.public_bytes(serialization.Encoding.PEM)
        assert _described_by_der(pem) == _described_by_cryptography(cert)


@pytest.mark.skipif(not SYSTEM_BUNDLE.exists(), reason="no system CA bundle")
@pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")  # a 0 serial
def test_every_certificate_of_the_system_trust_store_is_described_alike():
    pem = SYSTEM_BUNDLE.read_bytes()
    ders = der.pem_certificates(pem)
    certs = x509.load_pem_x509_certificates(pem)
    assert len(ders) == len(certs) > 50
    for d, c in zip(ders, certs, strict=True):
        got = CertInfo.from_der(der.parse(d))
        assert got == CertInfo.of(c)                     # CertInfo.of goes through DER too, so also:
        assert (got.subject, got.issuer, got.serial) == (c.subject.rfc4514_string(),
                                                         c.issuer.rfc4514_string(),
                                                         format(c.serial_number, "x"))
        assert (got.not_before, got.not_after) == (c.not_valid_before_utc, c.not_valid_after_utc)


@pytest.mark.parametrize("junk", [b"", b"\x30", b"\x30\x82\xff\xff", b"\x31\x00", b"\x30\x03\x02\x01\x01",
                                  b"\x30\x80\x00\x00"])
def test_junk_is_a_value_error(junk):
    with pytest.raises(ValueError):
        der.parse(junk)


def test_bundle_refusals(tmp_path):
    ca = generate.make_ca()
    leaf = generate.issue(ca, "x", dns=("x",))
    other = generate.issue(ca, "y", dns=("y",))
    ok = build(leaf.cert_pem, leaf.key_pem, ca.cert_pem, "c", "k", "ca")
    assert ok.info.subject == "CN=x" and ok.chain[0].subject.rfc4514_string() == "CN=x"

    def reason(cert_pem, key_pem, ca_pem=None) -> str:
        with pytest.raises(CertError) as err:
            build(cert_pem, key_pem, ca_pem, "c", "k", "ca")
        return err.value.reason

    assert reason(leaf.cert_pem, other.key_pem) == "private key does not match the certificate in c"
    assert reason(leaf.cert_pem, b"") == "private key is empty"
    assert reason(leaf.cert_pem, leaf.key_pem[:60]) == "private key does not parse as a PEM private key"
    assert reason(leaf.cert_pem, b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n") \
        == "private key does not parse as a PEM private key"
    key = serialization.load_pem_private_key(leaf.key_pem, None)
    encrypted = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.BestAvailableEncryption(b"secret"))
    assert reason(leaf.cert_pem, encrypted) == "private key is encrypted; tlsproxy needs an unencrypted key"
    trad = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.BestAvailableEncryption(b"secret"))
    assert reason(leaf.cert_pem, trad) == "private key is encrypted; tlsproxy needs an unencrypted key"
    assert reason(b"", leaf.key_pem) == "certificate is empty"
    assert reason(b"garbage", leaf.key_pem) == "certificate is empty or not PEM"
    assert reason(b"-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----\n", leaf.key_pem) \
        .startswith("certificate does not parse")
    assert reason(leaf.cert_pem, leaf.key_pem, b"nope") == "CA bundle is empty or not PEM"
    weak = rsa.generate_private_key(65537, 1024)          # OpenSSL reads it, and will not serve it
    weak_cert = _odd_cert(weak, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "weak")]), [], 1,
                          dt.datetime(2049, 1, 1, tzinfo=dt.UTC))
    assert reason(weak_cert.public_bytes(serialization.Encoding.PEM),
                  weak.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())) \
        == "OpenSSL refused the certificate/key: EE_KEY_TOO_SMALL"
    expired = generate.issue(ca, "old", dns=("old",), not_before=dt.datetime(2020, 1, 1, tzinfo=dt.UTC),
                             not_after=dt.datetime(2021, 1, 1, tzinfo=dt.UTC))
    assert reason(expired.cert_pem, expired.key_pem).startswith("certificate expired at 2021-01-01")


def test_mutated_certificates_parse_or_raise_value_error_only():
    """Every single-byte change and every truncation of a real certificate: ValueError or a result,
    never another exception (bounded: one certificate, ~ a few thousand variants)."""
    ca = generate.make_ca()
    leaf = generate.issue(ca, "x", dns=("x.example",), ips=("10.0.0.1",), uris=("spiffe://a/b",))
    (d,) = der.pem_certificates(leaf.cert_pem)
    variants = [d[:n] for n in range(len(d))]
    for i in range(len(d)):
        for flip in (0x01, 0x80, 0xFF):
            variants.append(d[:i] + bytes([d[i] ^ flip]) + d[i + 1:])
    for v in variants:
        try:
            der.parse(v)
        except ValueError:
            pass
