"""Certificate issuance: a small CA and the leaves it signs (server or client), as PEM bytes.

Used by standalone mode (a development CA kept in the state directory), by ``tlsproxy certs
bootstrap`` and by the tests. Keys are ECDSA P-256 by default (fast handshakes, short chains);
RSA 2048 on request for old clients.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_VALIDITY = dt.timedelta(days=3650)     # a private CA outlives the leaves it signs
LEAF_VALIDITY = dt.timedelta(days=365)    # rotate at least yearly; cert-manager defaults to 90 days
BACKDATE = dt.timedelta(minutes=5)        # tolerate small clock skew between pods


@dataclass(frozen=True)
class Issued:
    cert_pem: bytes
    key_pem: bytes

    @property
    def cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)


def new_key(key_type: str = "ecdsa"):
    if key_type == "ecdsa":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"unknown key type {key_type!r} (ecdsa or rsa)")


def key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(cn: str, org: str | None = None, ou: str | None = None) -> x509.Name:
    attrs = []
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    if ou:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def make_ca(cn: str = "tlsproxy development CA", *, key_type: str = "ecdsa",
            validity: dt.timedelta = CA_VALIDITY, now: dt.datetime | None = None,
            permitted: tuple[x509.GeneralName, ...] = ()) -> Issued:
    """A self-signed CA. ``permitted`` makes it name-constrained (RFC 5280 §4.2.1.10, critical): a
    verifier then refuses any leaf it signs for a name outside those subtrees."""
    key = new_key(key_type)
    now = now or dt.datetime.now(dt.UTC)
    name = _name(cn, "tlsproxy")
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE).not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
    )
    if permitted:
        builder = builder.add_extension(x509.NameConstraints(permitted_subtrees=list(permitted),
                                                             excluded_subtrees=None), critical=True)
    cert = builder.sign(key, hashes.SHA256())
    return Issued(cert.public_bytes(serialization.Encoding.PEM), key_pem(key))


def issue(ca: Issued, cn: str, *, dns: tuple[str, ...] = (), ips: tuple[str, ...] = (),
          uris: tuple[str, ...] = (), server: bool = True, client: bool = False,
          key_type: str = "ecdsa", ou: str | None = None,
          not_before: dt.datetime | None = None, not_after: dt.datetime | None = None,
          validity: dt.timedelta = LEAF_VALIDITY) -> Issued:
    """Sign a leaf with ``ca``. ``server``/``client`` set the extended key usages."""
    key = new_key(key_type)
    ca_cert = ca.cert
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    now = dt.datetime.now(dt.UTC)
    not_before = not_before or now - BACKDATE
    not_after = not_after or now + validity
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    sans += [x509.UniformResourceIdentifier(u) for u in uris]
    usages = []
    if server:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    if client:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn, ou=ou)).issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=key_type == "rsa",
                                     key_cert_sign=False, crl_sign=False, content_commitment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),
                       critical=False)
    )
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return Issued(cert.public_bytes(serialization.Encoding.PEM), key_pem(key))
