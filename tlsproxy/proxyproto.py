"""PROXY protocol version 2 headers (HAProxy's proxy-protocol.txt, section 2.2): pure, bytes out.

In tcp mode the upstream only sees a connection from 127.0.0.1. With ``--proxy-protocol v2`` the
relay first sends one binary header saying who the client really was and what TLS established;
an upstream that speaks the protocol (HAProxy, nginx ``proxy_protocol``, Envoy's listener filter,
Go's pires/go-proxyproto…) reads it before the client's first byte.

Layout (all integers big-endian)::

    12 bytes  signature \\r\\n\\r\\n\\0\\r\\nQUIT\\n
     1 byte   version (high nibble, 2) | command (low nibble: 0 LOCAL, 1 PROXY)
     1 byte   address family (high: 1 INET, 2 INET6) | transport (low: 1 STREAM)
     2 bytes  length of everything that follows
     addresses: source address, destination address, source port, destination port
                (4+4+2+2 bytes for IPv4, 16+16+2+2 for IPv6)
     TLVs:    type (1 byte), length (2 bytes), value

TLVs sent here:

* ``PP2_TYPE_ALPN`` (0x01): the ALPN protocol negotiated with the client, when one was;
* ``PP2_TYPE_AUTHORITY`` (0x02): the server name (SNI) the client asked for, when it sent one;
* ``PP2_TYPE_SSL`` (0x20): one byte of client flags (``PP2_CLIENT_SSL`` always; ``CERT_CONN`` when
  the client sent a certificate on this connection; ``CERT_SESS`` when the TLS session has one, also
  after resumption), a 32-bit ``verify`` (0 only when a client certificate was presented *and*
  verified), then sub-TLVs: ``VERSION`` (0x21, e.g. ``TLSv1.3``), ``CN`` (0x22, the client
  certificate's subject CN), ``CIPHER`` (0x23);
* ``0xE0`` (first of the range the spec leaves to applications, ``PP2_TYPE_MIN_CUSTOM``): one TLV
  per URI SAN of the verified client certificate — the SPIFFE ID, which the spec has no type for.

No CRC32C TLV is sent: the header travels over loopback inside the pod.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable
from dataclasses import dataclass

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
VERSION_2 = 0x20
CMD_LOCAL = 0x00
CMD_PROXY = 0x01
AF_INET = 0x10
AF_INET6 = 0x20
STREAM = 0x01

PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_TYPE_TLSPROXY_URI = 0xE0          # ours: a URI SAN (SPIFFE ID) of the verified client certificate

PP2_CLIENT_SSL = 0x01
PP2_CLIENT_CERT_CONN = 0x02
PP2_CLIENT_CERT_SESS = 0x04

MAX_LENGTH = 0xFFFF                    # the 16-bit length field


@dataclass(frozen=True)
class TLSFacts:
    """What the handshake established, as far as the upstream may care."""

    version: str | None = None          # "TLSv1.3"
    cipher: str | None = None           # "TLS_AES_256_GCM_SHA384"
    sni: str | None = None              # server name the client sent
    alpn: str | None = None             # protocol negotiated
    cert_in_connection: bool = False    # the client sent a certificate in this handshake
    cert_in_session: bool = False       # the TLS session has a client certificate (also resumed)
    verified: bool = False              # ... and it was verified against the client CA
    cn: str | None = None               # subject CN of the client certificate
    uris: tuple[str, ...] = ()          # URI SANs (SPIFFE IDs)


def tlv(kind: int, value: bytes) -> bytes:
    if not 0 <= kind <= 0xFF:
        raise ValueError(f"TLV type {kind} is not a byte")
    if len(value) > MAX_LENGTH:
        raise ValueError(f"TLV 0x{kind:02x} value of {len(value)} bytes is too long")
    return struct.pack("!BH", kind, len(value)) + value


def ssl_tlv(facts: TLSFacts) -> bytes:
    client = PP2_CLIENT_SSL
    if facts.cert_in_connection:
        client |= PP2_CLIENT_CERT_CONN
    if facts.cert_in_session or facts.cert_in_connection:
        client |= PP2_CLIENT_CERT_SESS
    verify = 0 if facts.verified and (facts.cert_in_session or facts.cert_in_connection) else 1
    subs = b""
    if facts.version:
        subs += tlv(PP2_SUBTYPE_SSL_VERSION, facts.version.encode("ascii", "replace"))
    if facts.cn:
        subs += tlv(PP2_SUBTYPE_SSL_CN, facts.cn.encode("utf-8"))
    if facts.cipher:
        subs += tlv(PP2_SUBTYPE_SSL_CIPHER, facts.cipher.encode("ascii", "replace"))
    return tlv(PP2_TYPE_SSL, struct.pack("!BI", client, verify) + subs)


def tls_tlvs(facts: TLSFacts) -> bytes:
    out = b""
    if facts.alpn:
        out += tlv(PP2_TYPE_ALPN, facts.alpn.encode("ascii", "replace"))
    if facts.sni:
        out += tlv(PP2_TYPE_AUTHORITY, facts.sni.encode("ascii", "replace"))
    out += ssl_tlv(facts)
    for uri in facts.uris:
        out += tlv(PP2_TYPE_TLSPROXY_URI, uri.encode("utf-8"))
    return out


def _addresses(src: tuple[str, int], dst: tuple[str, int]) -> tuple[int, bytes]:
    s_ip, d_ip = ipaddress.ip_address(src[0]), ipaddress.ip_address(dst[0])
    if s_ip.version != d_ip.version:
        # A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d; unmap when both sides allow it.
        s_ip = getattr(s_ip, "ipv4_mapped", None) or s_ip
        d_ip = getattr(d_ip, "ipv4_mapped", None) or d_ip
        if s_ip.version != d_ip.version:
            s_ip = ipaddress.IPv6Address(f"::ffff:{s_ip}") if s_ip.version == 4 else s_ip
            d_ip = ipaddress.IPv6Address(f"::ffff:{d_ip}") if d_ip.version == 4 else d_ip
    family = AF_INET if s_ip.version == 4 else AF_INET6
    return family, s_ip.packed + d_ip.packed + struct.pack("!HH", src[1], dst[1])


def v2_header(src: tuple[str, int], dst: tuple[str, int], tls: TLSFacts | None = None,
              extra_tlvs: Iterable[bytes] = ()) -> bytes:
    """A PROXY command header for a TCP connection from ``src`` (the client) to ``dst`` (the address
    it connected to). Raises ValueError on addresses that are not IP literals or an oversize header."""
    family, addrs = _addresses(src, dst)
    body = addrs + (tls_tlvs(tls) if tls is not None else b"") + b"".join(extra_tlvs)
    if len(body) > MAX_LENGTH:
        raise ValueError(f"PROXY v2 header of {len(body)} bytes does not fit the length field")
    return SIGNATURE + bytes([VERSION_2 | CMD_PROXY, family | STREAM]) + struct.pack("!H", len(body)) + body


def local_header() -> bytes:
    """A LOCAL command header (no addresses): the connection is the proxy's own (e.g. a health check)."""
    return SIGNATURE + bytes([VERSION_2 | CMD_LOCAL, 0x00]) + struct.pack("!H", 0)
