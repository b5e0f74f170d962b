"""A small reader of X.509 certificates (DER inside PEM): the few fields a running proxy reports.

Why not cryptography here: it is the largest thing a sidecar would load (its Rust extension alone
holds ~7 MiB of every idle proxy's memory and ~30 ms of its start-up, docs/performance.md), and
serving only needs to *describe* a certificate: subject, issuer, serial, validity, SANs, key type,
fingerprint. OpenSSL (through ``ssl``) does the checking that matters: it loads the chain and the key
and refuses a key that does not match. cryptography stays the tool for making and inspecting
certificates (``generate``, ``bootstrap``, ``inspect``, mutual-TLS identities); the tests hold this
reader to it, field by field, over every certificate of the system trust store.

Theory of operation: DER is tag, length, value. ``_read`` returns one element and the offset after
it; a certificate is ``SEQUENCE { tbsCertificate, signatureAlgorithm, signature }`` and the fields
are read from ``tbsCertificate`` in order (RFC 5280 §4.1). Anything malformed raises ``ValueError``.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import ipaddress
import re
from dataclasses import dataclass

_PEM_CERT_RE = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n(.*?)-----END CERTIFICATE-----", re.S)

# RFC 4514 short names, exactly the set cryptography's ``rfc4514_string`` uses; others print dotted.
_ATTR_NAMES = {
    "2.5.4.3": "CN", "2.5.4.7": "L", "2.5.4.8": "ST", "2.5.4.10": "O", "2.5.4.11": "OU",
    "2.5.4.6": "C", "2.5.4.9": "STREET", "0.9.2342.19200300.100.1.25": "DC",
    "0.9.2342.19200300.100.1.1": "UID",
}
_KEY_TYPES = {
    "1.2.840.10045.2.1": "ecdsa", "1.2.840.113549.1.1.1": "rsa", "1.2.840.113549.1.1.10": "rsa",
    "1.3.101.112": "ed25519", "1.3.101.113": "ed448", "1.2.840.10040.4.1": "dsa",
}
_SAN_OID = "2.5.29.17"
_CN_OID = "2.5.4.3"


def _read(data: bytes, pos: int) -> tuple[int, bytes, int]:
    """One DER element at ``pos``: (tag byte, contents, offset after it)."""
    if pos + 2 > len(data):
        raise ValueError("truncated DER")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise ValueError("multi-byte DER tags are not used in certificates")
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 4 or pos + n > len(data):
            raise ValueError("bad DER length")
        length = int.from_bytes(data[pos:pos + n], "big")
        pos += n
    end = pos + length
    if end > len(data):
        raise ValueError("truncated DER")
    return tag, data[pos:end], end


def _items(data: bytes) -> list[tuple[int, bytes]]:
    out, pos = [], 0
    while pos < len(data):
        tag, value, pos = _read(data, pos)
        out.append((tag, value))
    return out


def _oid(value: bytes) -> str:
    if not value:
        raise ValueError("empty OID")
    first = value[0]
    parts = [min(first // 40, 2), first - 40 * min(first // 40, 2)]
    n = 0
    for byte in value[1:]:
        n = (n << 7) | (byte & 0x7F)
        if not byte & 0x80:
            parts.append(n)
            n = 0
    return ".".join(map(str, parts))


def _string(tag: int, value: bytes) -> str | bytes:
    if tag == 0x0C:                         # UTF8String
        return value.decode("utf-8")
    if tag in (0x13, 0x16, 0x1A, 0x12):     # Printable, IA5, Visible, Numeric
        return value.decode("latin-1")
    if tag == 0x14:                         # TeletexString (T.61): read as Latin-1, as OpenSSL does
        return value.decode("latin-1")
    if tag == 0x1E:                         # BMPString
        return value.decode("utf-16-be")
    if tag == 0x1C:                         # UniversalString
        return value.decode("utf-32-be")
    if tag == 0x03:                         # BIT STRING (x500UniqueIdentifier): shown as hex
        return value[1:]
    return value                            # anything else: its bytes, shown as #hex


def _escape(value: str | bytes) -> str:
    """RFC 4514 §2.4 escaping (what cryptography's ``rfc4514_string`` prints)."""
    if not value:
        return ""
    if isinstance(value, bytes):
        return "#" + binascii.hexlify(value).decode()
    for ch in ("\\", '"', "+", ",", ";", "<", ">"):
        value = value.replace(ch, "\\" + ch)
    value = value.replace("\0", "\\00")
    if value[0] in ("#", " "):
        value = "\\" + value
    if value[-1] == " ":
        value = value[:-1] + "\\ "
    return value


def _name(value: bytes) -> tuple[str, str | None]:
    """A Name (RDNSequence) as an RFC 4514 string (last RDN first), and its first CN."""
    rdns, cn = [], None
    for tag, rdn in _items(value):
        if tag != 0x31:
            raise ValueError("RDN is not a SET")
        parts = []
        for _tag, atv in _items(rdn):
            (t_oid, oid_bytes), (t_val, raw) = _items(atv)[:2]
            oid = _oid(oid_bytes)
            text = _string(t_val, raw)
            if oid == _CN_OID and cn is None and isinstance(text, str):
                cn = text
            parts.append(f"{_ATTR_NAMES.get(oid, oid)}={_escape(text)}")
        rdns.append("+".join(parts))
    return ",".join(reversed(rdns)), cn


def _time(tag: int, value: bytes) -> dt.datetime:
    text = value.decode("ascii")
    if tag == 0x17:                          # UTCTime: YYMMDDHHMMSSZ, 1950..2049
        year = int(text[:2])
        text = str(1900 + year if year >= 50 else 2000 + year) + text[2:]
    elif tag != 0x18:                        # GeneralizedTime
        raise ValueError("validity is not a time")
    if not text.endswith("Z"):
        raise ValueError("certificate times must be UTC (Z)")
    return dt.datetime.strptime(text[:14], "%Y%m%d%H%M%S").replace(tzinfo=dt.UTC)


def _int(value: bytes) -> int:
    return int.from_bytes(value, "big", signed=True)


@dataclass(frozen=True)
class Cert:
    """The fields of one certificate a running proxy reports (and its DER)."""

    der: bytes
    subject: str
    issuer: str
    common_name: str | None
    serial: int
    not_before: dt.datetime
    not_after: dt.datetime
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    uris: tuple[str, ...]
    key_type: str
    spki: bytes                          # SubjectPublicKeyInfo, DER

    @property
    def fingerprint_sha256(self) -> str:
        return hashlib.sha256(self.der).hexdigest()


def parse(der: bytes) -> Cert:
    """Read one DER certificate; ValueError when it is not one."""
    try:
        return _parse(der)
    except (IndexError, TypeError, UnicodeDecodeError, OverflowError) as exc:   # a short or odd field
        raise ValueError(f"malformed certificate ({type(exc).__name__})") from None


def _parse(der: bytes) -> Cert:
    tag, cert, end = _read(der, 0)
    if tag != 0x30 or end != len(der):
        raise ValueError("not a DER certificate")
    tag, tbs, _ = _read(cert, 0)
    if tag != 0x30:
        raise ValueError("not a DER certificate")
    fields = _items(tbs)
    if fields and fields[0][0] == 0xA0:       # [0] version
        fields = fields[1:]
    if len(fields) < 6:
        raise ValueError("certificate has too few fields")
    serial = _int(fields[0][1])
    issuer, _ = _name(fields[2][1])
    (t1, v1), (t2, v2) = _items(fields[3][1])[:2]
    subject, cn = _name(fields[4][1])
    spki_tag, spki = fields[5]
    alg = _items(_items(spki)[0][1])[0][1]
    key_type = _KEY_TYPES.get(_oid(alg), _oid(alg))
    dns: list[str] = []
    ips: list[str] = []
    uris: list[str] = []
    for tag, value in fields[6:]:
        if tag != 0xA3:                        # [3] extensions
            continue
        for _t, ext in _items(_items(value)[0][1]):
            parts = _items(ext)
            if _oid(parts[0][1]) != _SAN_OID:
                continue
            for gtag, gval in _items(_items(parts[-1][1])[0][1]):
                if gtag == 0x82:
                    dns.append(gval.decode("latin-1"))
                elif gtag == 0x87:
                    ips.append(str(ipaddress.ip_address(gval)))
                elif gtag == 0x86:
                    uris.append(gval.decode("latin-1"))
    spki_der = _der(spki_tag, spki)
    return Cert(der, subject, issuer, cn, serial, _time(t1, v1), _time(t2, v2), tuple(dns), tuple(ips),
                tuple(uris), key_type, spki_der)


def _der(tag: int, value: bytes) -> bytes:
    n = len(value)
    if n < 0x80:
        return bytes([tag, n]) + value
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + value


def pem_certificates(pem: bytes) -> list[bytes]:
    """The DER of every ``CERTIFICATE`` block, in order; ValueError on bad base64."""
    out = []
    for body in _PEM_CERT_RE.findall(pem):
        try:
            out.append(base64.b64decode(b"".join(body.split()), validate=True))
        except binascii.Error as exc:
            raise ValueError(f"bad base64 in a CERTIFICATE block: {exc}") from None
    return out
