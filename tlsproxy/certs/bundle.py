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
import os
import ssl
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CertError
from . import der

if TYPE_CHECKING:      # cryptography is loaded only by the tools that make or inspect certificates
    from cryptography import x509

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
    def from_der(cls, cert: der.Cert) -> CertInfo:
        return cls(subject=cert.subject, issuer=cert.issuer, serial=format(cert.serial, "x"),
                   not_before=cert.not_before, not_after=cert.not_after, dns_names=cert.dns_names,
                   ip_addresses=cert.ip_addresses, uris=cert.uris, key_type=cert.key_type,
                   fingerprint_sha256=cert.fingerprint_sha256)

    @classmethod
    def of(cls, cert: x509.Certificate) -> CertInfo:
        """The same description of a cryptography certificate (tools and tests)."""
        from cryptography.hazmat.primitives.serialization import Encoding

        return cls.from_der(der.parse(cert.public_bytes(Encoding.DER)))

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


def key_type_of(cert: x509.Certificate) -> str:
    """``ecdsa``, ``rsa``, ``ed25519``… of a cryptography certificate."""
    from cryptography.hazmat.primitives.serialization import Encoding

    return der.parse(cert.public_bytes(Encoding.DER)).key_type


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
    certs: tuple[der.Cert, ...] = field(repr=False)
    warnings: tuple[str, ...] = ()

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """The chain as cryptography certificates (for the inspection tools; loads cryptography)."""
        from cryptography import x509

        return tuple(x509.load_der_x509_certificate(c.der) for c in self.certs)

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


def parse_pem_certs(pem: bytes, path: str, what: str = "certificate") -> tuple[der.Cert, ...]:
    """Every certificate of a PEM bundle, read (``der.py``); CertError naming ``what`` otherwise."""
    if b"-----BEGIN" not in pem:
        raise CertError(path, f"{what} is empty or not PEM" if pem.strip() else f"{what} is empty")
    try:
        certs = tuple(der.parse(d) for d in der.pem_certificates(pem))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CertError(path, f"{what} does not parse: {exc}") from None
    if not certs:
        raise CertError(path, f"no certificate in {what}")
    return certs


def load_x509(pem: bytes, path: str, what: str = "certificate") -> tuple[x509.Certificate, ...]:
    """``parse_pem_certs``'s checks, then the certificates as cryptography objects (tools only)."""
    from cryptography import x509

    parse_pem_certs(pem, path, what)
    try:
        return tuple(x509.load_pem_x509_certificates(pem))
    except ValueError as exc:
        raise CertError(path, f"{what} does not parse: {exc}") from None


def _no_password() -> bytes:
    raise _Encrypted


class _Encrypted(Exception):
    pass


def _key_problem(cert_pem: bytes, key_pem: bytes, cert_path: str) -> str | None:
    """Why OpenSSL would not serve this key with this certificate, or None. (The same loader the
    TLS context uses, with a password callback that refuses instead of prompting on a terminal.)"""
    if not key_pem.strip():
        return "private key is empty"
    if b"ENCRYPTED" in key_pem.split(b"\n\n", 1)[0] and b"PRIVATE KEY-----" in key_pem:
        return "private key is encrypted; tlsproxy needs an unencrypted key"
    if b"PRIVATE KEY-----" not in key_pem:
        return "private key does not parse as a PEM private key"
    data = cert_pem.rstrip(b"\n") + b"\n" + key_pem
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    fd = -1
    try:
        if hasattr(os, "memfd_create"):       # the key never touches disk
            fd = os.memfd_create("tlsproxy-check", os.MFD_CLOEXEC)
            os.write(fd, data)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}", password=_no_password)
        else:
            with tempfile.NamedTemporaryFile(prefix="tlsproxy-", suffix=".pem") as f:
                os.chmod(f.name, 0o600)
                f.write(data)
                f.flush()
                ctx.load_cert_chain(f.name, password=_no_password)
    except _Encrypted:
        return "private key is encrypted; tlsproxy needs an unencrypted key"
    except ssl.SSLError as exc:
        reason = exc.reason or ""
        if reason == "KEY_VALUES_MISMATCH":
            return f"private key does not match the certificate in {cert_path}"
        if reason.endswith(("TOO_SMALL", "TOO_WEAK")) or "UNSUPPORTED" in reason:
            # read, but refused (an RSA key under 2048 bits, a SHA-1 signature…)
            return f"OpenSSL refused the certificate/key: {reason}"
        return "private key does not parse as a PEM private key"
    finally:
        if fd >= 0:
            os.close(fd)
    return None


def build(cert_pem: bytes, key_pem: bytes, ca_pem: bytes | None, cert_path: str, key_path: str,
          ca_path: str | None, *, now: dt.datetime | None = None) -> Bundle:
    """Parse and validate; raise CertError with the file and reason on any problem."""
    now = now or dt.datetime.now(dt.UTC)
    chain = parse_pem_certs(cert_pem, cert_path)
    leaf = chain[0]
    problem = _key_problem(cert_pem, key_pem, cert_path)
    if problem is not None:
        raise CertError(key_path, problem)
    if leaf.not_after <= now:
        raise CertError(cert_path, f"certificate expired at {leaf.not_after.isoformat()}")
    warnings = []
    if leaf.not_before > now:
        warnings.append(f"certificate is not valid before {leaf.not_before.isoformat()}")
    if ca_pem is not None:
        parse_pem_certs(ca_pem, ca_path or "ca.crt", "CA bundle")
    return Bundle(cert_pem, key_pem, ca_pem, cert_path, key_path, ca_path, CertInfo.from_der(leaf), chain,
                  tuple(warnings))
