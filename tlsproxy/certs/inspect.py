"""What ``tlsproxy certs inspect`` and ``tlsproxy certs check`` report: pure values and their text.

``inspect`` describes whatever it is given (a PEM file, a Secret directory) and never refuses: an
expired certificate is shown as expired. ``check`` is a dry run of a reload — it loads through
:func:`bundle.load_dir`/:func:`bundle.load_files`, the very functions the watcher uses, so it refuses
exactly what a reload would refuse.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..errors import CertError
from .bundle import (
    CA_FILE,
    CERT_FILE,
    KEY_FILE,
    Bundle,
    CertInfo,
    load_x509,
    read_file,
    resolve_secret_dir,
)

_KEY_SUFFIXES = (".key", "-key.pem", ".key.pem")


def days_left(info: CertInfo, now: dt.datetime) -> float:
    return (info.not_after - now).total_seconds() / 86400


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def cert_dict(cert: x509.Certificate, now: dt.datetime) -> dict:
    info = CertInfo.of(cert)
    d = info.as_dict()
    d["days_left"] = round(days_left(info, now), 1)
    d["expired"] = info.not_after <= now
    d["not_yet_valid"] = info.not_before > now
    d["is_ca"] = _is_ca(cert)
    return d


# ---------------------------------------------------------------------------- inspect

@dataclass(frozen=True)
class KeyCheck:
    path: str
    matches: bool | None      # None: the key could not be read/parsed (see reason)
    reason: str = ""


@dataclass(frozen=True)
class Inspection:
    path: str
    cert_path: str
    certs: tuple[x509.Certificate, ...]
    key: KeyCheck | None
    ca_path: str | None
    ca_certs: tuple[x509.Certificate, ...]

    def as_dict(self, now: dt.datetime) -> dict:
        return {
            "path": self.path,
            "cert_path": self.cert_path,
            "certificates": [cert_dict(c, now) for c in self.certs],
            "key": None if self.key is None else {"path": self.key.path, "matches": self.key.matches,
                                                  **({"reason": self.key.reason} if self.key.reason else {})},
            "ca_path": self.ca_path,
            "ca_certificates": [cert_dict(c, now) for c in self.ca_certs],
        }


def _key_beside(cert_path: Path) -> Path | None:
    name = cert_path.name
    candidates = []
    if name == CERT_FILE:
        candidates.append(cert_path.with_name(KEY_FILE))
    for suffix in (".crt", ".pem", ".cert"):
        if name.endswith(suffix) and name != CA_FILE:
            stem = name[: -len(suffix)]
            candidates += [cert_path.with_name(stem + s) for s in _KEY_SUFFIXES]
    return next((c for c in candidates if c.is_file()), None)


def check_key(key_pem: bytes, key_path: str, cert: x509.Certificate) -> KeyCheck:
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        return KeyCheck(key_path, None, "key is encrypted")
    except Exception:  # ValueError, unsupported algorithm
        return KeyCheck(key_path, None, "key does not parse as a PEM private key")
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    same = (key.public_key().public_bytes(serialization.Encoding.DER, spki)
            == cert.public_key().public_bytes(serialization.Encoding.DER, spki))
    return KeyCheck(key_path, same, "" if same else "key does not match the certificate")


def inspect_path(path: Path) -> Inspection:
    """Inspect a PEM file (a chain, optionally with its key inside) or a Secret directory."""
    if path.is_dir():
        base = resolve_secret_dir(path)
        cert_file = base / CERT_FILE
        if not cert_file.exists() and (base / CA_FILE).exists():
            cert_file = base / CA_FILE         # a CA-only directory (e.g. bootstrap --ca-dir)
        cert_pem = read_file(cert_file, "certificate")
        certs = load_x509(cert_pem, str(path / cert_file.name))
        key = None
        key_file = base / (KEY_FILE if cert_file.name == CERT_FILE else "ca.key")
        if key_file.exists():
            key = check_key(read_file(key_file, "private key"), str(path / key_file.name), certs[0])
        ca_certs: tuple[x509.Certificate, ...] = ()
        ca_path = None
        if cert_file.name != CA_FILE and (base / CA_FILE).exists():
            ca_path = str(path / CA_FILE)
            ca_certs = load_x509(read_file(base / CA_FILE, "CA bundle"), ca_path, "CA bundle")
        return Inspection(str(path), str(path / cert_file.name), certs, key, ca_path, ca_certs)
    if not path.exists():
        raise CertError(path, "does not exist")
    pem = read_file(path, "certificate")
    certs = load_x509(pem, str(path))
    key = None
    if b"PRIVATE KEY-----" in pem:
        key = check_key(pem, str(path), certs[0])
    else:
        beside = _key_beside(path)
        if beside is not None:
            key = check_key(read_file(beside, "private key"), str(beside), certs[0])
    return Inspection(str(path), str(path), certs, key, None, ())


def _cert_lines(d: dict, indent: str = "  ") -> list[str]:
    state = "EXPIRED" if d["expired"] else ("NOT YET VALID" if d["not_yet_valid"] else "valid")
    sans = [f"DNS:{n}" for n in d["dns_names"]] + [f"IP:{n}" for n in d["ip_addresses"]] + \
        [f"URI:{n}" for n in d["uris"]]
    return [
        f"{indent}subject:     {d['subject']}",
        f"{indent}SANs:        {', '.join(sans) if sans else '(none)'}",
        f"{indent}issuer:      {d['issuer']}",
        f"{indent}serial:      {d['serial']}",
        f"{indent}key type:    {d['key_type']}{' (CA)' if d['is_ca'] else ''}",
        f"{indent}not before:  {d['not_before']}",
        f"{indent}not after:   {d['not_after']}",
        f"{indent}days left:   {d['days_left']:.1f} ({state})",
        f"{indent}sha256:      {d['fingerprint_sha256']}",
    ]


def render_inspection(report: dict) -> str:
    lines = []
    certs = report["certificates"]
    for i, d in enumerate(certs):
        title = "certificate" if i == 0 else f"chain[{i}]"
        lines.append(f"{title} ({report['cert_path']}):" if i == 0 else f"{title}:")
        lines += _cert_lines(d)
    key = report["key"]
    if key is None:
        lines.append("key: none found beside the certificate")
    else:
        verdict = {True: "matches the certificate", False: "DOES NOT match the certificate",
                   None: f"unusable: {key.get('reason', '')}"}[key["matches"]]
        lines.append(f"key ({key['path']}): {verdict}")
    for i, d in enumerate(report["ca_certificates"]):
        lines.append(f"CA[{i}] ({report['ca_path']}):")
        lines += _cert_lines(d)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- check

def check_notes(bundle: Bundle) -> list[str]:
    """Informational remarks that do not refuse a reload (the watcher would serve this)."""
    notes = list(bundle.warnings)
    if len(bundle.chain) == 1 and bundle.chain[0].issuer != bundle.chain[0].subject and not bundle.ca_pem:
        notes.append("tls.crt holds the leaf only; clients need the issuing CA in their trust store")
    if bundle.ca_pem:
        cas = x509.load_pem_x509_certificates(bundle.ca_pem)
        last = bundle.chain[-1]
        if not any(_issued_by(last, ca) for ca in cas):
            notes.append(f"the chain in {bundle.cert_path} is not signed by a certificate in "
                         f"{bundle.ca_path}")
    return notes


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    if cert == ca:
        return True
    try:
        cert.verify_directly_issued_by(ca)
        return True
    except Exception:  # ValueError, InvalidSignature, TypeError (unsupported key)
        return False


def check_report(bundle: Bundle, now: dt.datetime) -> dict:
    leaf = cert_dict(bundle.chain[0], now)
    return {
        "ok": True,
        "cert_path": bundle.cert_path,
        "key_path": bundle.key_path,
        "ca_path": bundle.ca_path,
        "serving": leaf,
        "chain_length": len(bundle.chain),
        "digest": bundle.digest,
        "notes": check_notes(bundle),
    }


def render_check(report: dict) -> str:
    d = report["serving"]
    sans = [f"DNS:{n}" for n in d["dns_names"]] + [f"IP:{n}" for n in d["ip_addresses"]] + \
        [f"URI:{n}" for n in d["uris"]]
    lines = [
        f"ok: a reload would serve {report['cert_path']}",
        f"  subject:    {d['subject']}",
        f"  SANs:       {', '.join(sans) if sans else '(none)'}",
        f"  serial:     {d['serial']}",
        f"  key type:   {d['key_type']}",
        f"  not after:  {d['not_after']} ({d['days_left']:.1f} days left)",
        f"  chain:      {report['chain_length']} certificate(s)"
        + (f"; CA bundle {report['ca_path']}" if report["ca_path"] else ""),
    ]
    lines += [f"  note: {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"
