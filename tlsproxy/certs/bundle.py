"""Certificate bundles: one immutable certificate chain + key (+ optional CA), read and validated.

A bundle is read from a *source*: a ``kubernetes.io/tls`` Secret directory (``tls.crt``, ``tls.key``,
optional ``ca.crt``) or an explicit pair of files. Kubelet and cert-manager's CSI driver publish a
Secret as symlinks through ``..data`` to a timestamped directory that they swap atomically; resolving
``..data`` once and reading every file from that one directory yields a consistent pair even while a
swap happens. A plain ``cp`` of new files has no such guarantee, so a mismatched pair is refused by
validation and retried on the next change.

Validation is what a reload relies on: *bad material never replaces good*. ``load_*`` either return a
complete, checked bundle or raise :class:`CertError` naming the file and the reason.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from ..errors import CertError

CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"
CA_FILE = "ca.crt"


@dataclass(frozen=True)
class CertInfo:
    """What an operator wants to know about one certificate (never key material)."""

    subject: str
    issuer: str
    serial: str
    not_before: dt.datetime
    not_after: dt.datetime
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    uris: tuple[str, ...]
    key_type: str
    fingerprint_sha256: str

    @classmethod
    def of(cls, cert: x509.Certificate) -> CertInfo:
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            dns = tuple(san.get_values_for_type(x509.DNSName))
            ips = tuple(str(i) for i in san.get_values_for_type(x509.IPAddress))
            uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
        except x509.ExtensionNotFound:
            dns, ips, uris = (), (), ()
        return cls(
            subject=cert.subject.rfc4514_string(),
            issuer=cert.issuer.rfc4514_string(),
            serial=format(cert.serial_number, "x"),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            dns_names=dns, ip_addresses=ips, uris=uris,
            key_type=key_type_of(cert),
            fingerprint_sha256=cert.fingerprint(_sha256()).hex(),
        )

    def as_dict(self) -> dict:
        return {
            "subject": self.subject, "issuer": self.issuer, "serial": self.serial,
            "not_before": self.not_before.isoformat(), "not_after": self.not_after.isoformat(),
            "dns_names": list(self.dns_names), "ip_addresses": list(self.ip_addresses),
            "uris": list(self.uris), "key_type": self.key_type,
            "fingerprint_sha256": self.fingerprint_sha256,
        }

    @property
    def common_name(self) -> str:
        return self.subject


def _sha256():
    from cryptography.hazmat.primitives import hashes

    return hashes.SHA256()


def key_type_of(cert: x509.Certificate) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    pub = cert.public_key()
    if isinstance(pub, ec.EllipticCurvePublicKey):
        return "ecdsa"
    if isinstance(pub, rsa.RSAPublicKey):
        return "rsa"
    if isinstance(pub, ed25519.Ed25519PublicKey):
        return "ed25519"
    return type(pub).__name__


@dataclass(frozen=True)
class Bundle:
    """An immutable, validated certificate chain and key, and an optional CA bundle."""

    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes | None
    cert_path: str
    key_path: str
    ca_path: str | None
    info: CertInfo
    chain: tuple[x509.Certificate, ...] = field(repr=False)
    warnings: tuple[str, ...] = ()

    @property
    def digest(self) -> str:
        """Content hash of everything in the bundle: "changed" means this changed."""
        h = hashlib.sha256()
        for part in (self.cert_pem, self.key_pem, self.ca_pem or b""):
            h.update(len(part).to_bytes(8, "big"))
            h.update(part)
        return h.hexdigest()


def resolve_secret_dir(directory: Path) -> Path:
    """The directory to read a Secret from: ``..data``'s target when present, resolved once."""
    data = directory / "..data"
    if data.is_symlink() or data.is_dir():
        return data.resolve()
    return directory


def read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CertError(path, f"{what} is missing") from None
    except OSError as exc:
        raise CertError(path, f"cannot read {what}: {exc.strerror or exc}") from None


def load_dir(directory: Path, *, cert_name: str = CERT_FILE, key_name: str = KEY_FILE,
             ca_name: str | None = CA_FILE, now: dt.datetime | None = None) -> Bundle:
    """Load a Secret directory consistently (resolving ``..data`` once)."""
    if not directory.is_dir():
        raise CertError(directory, "is not a directory")
    base = resolve_secret_dir(directory)
    cert_pem = read_file(base / cert_name, "certificate")
    key_pem = read_file(base / key_name, "private key")
    ca_pem = None
    ca_path = None
    if ca_name and (base / ca_name).exists():
        ca_pem = read_file(base / ca_name, "CA bundle")
        ca_path = str(directory / ca_name)
    return build(cert_pem, key_pem, ca_pem, str(directory / cert_name), str(directory / key_name),
                 ca_path, now=now)


def load_files(cert: Path, key: Path, ca: Path | None = None, *, now: dt.datetime | None = None) -> Bundle:
    cert_pem = read_file(cert, "certificate")
    key_pem = read_file(key, "private key")
    ca_pem = read_file(ca, "CA bundle") if ca else None
    return build(cert_pem, key_pem, ca_pem, str(cert), str(key), str(ca) if ca else None, now=now)


def parse_pem_certs(pem: bytes, path: str, what: str = "certificate") -> tuple[x509.Certificate, ...]:
    if b"-----BEGIN" not in pem:
        raise CertError(path, f"{what} is empty or not PEM" if pem.strip() else f"{what} is empty")
    try:
        certs = tuple(x509.load_pem_x509_certificates(pem))
    except ValueError as exc:
        raise CertError(path, f"{what} does not parse: {exc}") from None
    if not certs:
        raise CertError(path, f"no certificate in {what}")
    return certs


def build(cert_pem: bytes, key_pem: bytes, ca_pem: bytes | None, cert_path: str, key_path: str,
          ca_path: str | None, *, now: dt.datetime | None = None) -> Bundle:
    """Parse and validate; raise CertError with the file and reason on any problem."""
    now = now or dt.datetime.now(dt.UTC)
    chain = parse_pem_certs(cert_pem, cert_path)
    leaf = chain[0]
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise CertError(key_path, "private key is encrypted; tlsproxy needs an unencrypted key") from None
    except ValueError:
        what = "is empty" if not key_pem.strip() else "does not parse as a PEM private key"
        raise CertError(key_path, f"private key {what}") from None
    except Exception as exc:  # unsupported algorithm and the like
        raise CertError(key_path, f"private key unusable: {exc}") from None
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if (key.public_key().public_bytes(serialization.Encoding.DER, pub)
            != leaf.public_key().public_bytes(serialization.Encoding.DER, pub)):
        raise CertError(key_path, f"private key does not match the certificate in {cert_path}")
    if leaf.not_valid_after_utc <= now:
        raise CertError(cert_path, f"certificate expired at {leaf.not_valid_after_utc.isoformat()}")
    warnings = []
    if leaf.not_valid_before_utc > now:
        warnings.append(f"certificate is not valid before {leaf.not_valid_before_utc.isoformat()}")
    if ca_pem is not None:
        parse_pem_certs(ca_pem, ca_path or "ca.crt", "CA bundle")
    return Bundle(cert_pem, key_pem, ca_pem, cert_path, key_path, ca_path, CertInfo.of(leaf), chain,
                  tuple(warnings))


def common_name(cert: x509.Certificate) -> str | None:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else None
