"""Peer certificate -> identity; identity rules; the headers that carry an identity to the app.

Pure: certificate bytes in, values out. No sockets, no ``ssl`` objects, no HTTP messages. The
listener hands over the DER of the verified client certificate (``SSLObject.getpeercert(True)``),
the HTTP layer decides what to do with the answers (403 on a denial, which headers to set).

Theory of operation
-------------------
* :class:`Identity` is what we know about a *verified* client: its subject (RFC 4514), its common
  name, its OUs, its DNS and URI SANs (SPIFFE IDs are URI SANs) and the SHA-256 of its DER (what
  Envoy calls ``Hash``). It is built once per connection and reused for every request on it.
* :class:`AllowRules` is the ``--allow-cn/--allow-dns/--allow-uri/--allow-ou`` table. A client
  matching *any* rule is allowed; with no rule at all every verified client is allowed (the CA is
  the policy). :meth:`AllowRules.decide` also says *why*, for the 403 body and the log line.
* :func:`xfcc_value` renders Envoy's ``X-Forwarded-Client-Cert`` element; :func:`client_cert_value`
  and :func:`client_cert_chain_value` render RFC 9440's ``Client-Cert``/``Client-Cert-Chain``
  (RFC 8941 byte sequences). Every value returned here is printable ASCII, safe as a header value:
  in the Subject, characters outside 0x20..0x7E (and ``"``, ``\\``) become RFC 4514 hex pairs
  ``\\XX`` (UTF-8 bytes, as OpenSSL's ``XN_FLAG_RFC2253`` does for Envoy's Subject); in SANs they are
  percent-encoded. So a quoted XFCC value never holds a quote or a backslash pair to escape.

Matching semantics (documented in docs/certificates.md):
  cn   exact, case-sensitive, against the subject's most specific (last) CN
  ou   exact, case-sensitive, against any OU of the subject
  dns  exact, ASCII case-insensitive, against any DNS SAN (a trailing dot is ignored)
  uri  exact against any URI SAN, or a prefix match when the rule ends with ``*``
       (``spiffe://cluster.local/ns/shop/*``); ``*`` anywhere else is refused when parsing rules
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:     # cryptography loads with the first client certificate (issue 19: memory)
    from cryptography import x509

XFCC_HEADER = "x-forwarded-client-cert"
CLIENT_CERT_HEADER = "client-cert"              # RFC 9440 section 2.2
CLIENT_CERT_CHAIN_HEADER = "client-cert-chain"  # RFC 9440 section 2.3
# Headers a client must never be able to set itself: strip them from every request, mTLS or not.
IDENTITY_HEADERS = (XFCC_HEADER, CLIENT_CERT_HEADER, CLIENT_CERT_CHAIN_HEADER)


# ---------------------------------------------------------------------------- identity

@dataclass(frozen=True)
class Identity:
    """The verified peer certificate, reduced to what rules and headers need."""

    subject: str                  # RFC 4514, e.g. "CN=checkout,OU=shop,O=acme"
    cn: str | None                # the most specific (last) CN of the subject, if any
    ous: tuple[str, ...]
    dns: tuple[str, ...]          # DNS SANs, in certificate order
    uris: tuple[str, ...]         # URI SANs (SPIFFE IDs), in certificate order
    sha256: str                   # lowercase hex SHA-256 of the DER (Envoy's "Hash")
    der: bytes = field(repr=False, compare=False)

    @classmethod
    def from_der(cls, der: bytes) -> Identity:
        """Parse a DER certificate. Raises ``ValueError`` (only) if it, its subject or its SAN
        extension does not parse (cryptography also raises e.g. ``DuplicateExtension``)."""
        from cryptography import x509

        try:
            return cls.from_certificate(x509.load_der_x509_certificate(der), der)
        except ValueError:
            raise
        except Exception as exc:
            raise ValueError(f"certificate does not parse: {exc}") from None

    @classmethod
    def from_certificate(cls, cert: x509.Certificate, der: bytes | None = None) -> Identity:
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding
        from cryptography.x509.oid import NameOID

        der = der if der is not None else cert.public_bytes(Encoding.DER)
        subject = cert.subject
        cns = [_attr_text(a.value) for a in subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        ous = tuple(_attr_text(a.value)
                    for a in subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME))
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            dns: tuple[str, ...] = ()
            uris: tuple[str, ...] = ()
        else:
            dns = tuple(san.get_values_for_type(x509.DNSName))
            uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
        return cls(subject=subject.rfc4514_string(), cn=cns[-1] if cns else None, ous=ous, dns=dns,
                   uris=uris, sha256=hashlib.sha256(der).hexdigest(), der=der)

    def describe(self) -> str:
        """A short, header/log-safe description: the subject plus URI and DNS SANs."""
        parts = [f"subject={_dn_header_safe(self.subject)!r}"]
        if self.uris:
            parts.append("uri=" + ",".join(_san_header_safe(u) for u in self.uris))
        if self.dns:
            parts.append("dns=" + ",".join(_san_header_safe(d) for d in self.dns))
        return " ".join(parts)


def _attr_text(value: str | bytes) -> str:
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


# ---------------------------------------------------------------------------- rules

@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str        # allowed: the rule that matched; denied: why (short, safe for a 403 body)


@dataclass(frozen=True)
class AllowRules:
    """Identity rules; a client matching any of them is allowed. No rules: any verified client."""

    cn: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()
    uri: tuple[str, ...] = ()
    ou: tuple[str, ...] = ()

    @classmethod
    def parse(cls, *, cn: Iterable[str] = (), dns: Iterable[str] = (), uri: Iterable[str] = (),
              ou: Iterable[str] = ()) -> AllowRules:
        """Validate raw flag values; raises ConfigError naming the flag and the value."""
        rules = cls(tuple(cn), tuple(dns), tuple(uri), tuple(ou))
        for flag, values in (("allow-cn", rules.cn), ("allow-dns", rules.dns),
                             ("allow-uri", rules.uri), ("allow-ou", rules.ou)):
            for v in values:
                if not v or v != v.strip():
                    raise ConfigError(f"--{flag} {v!r}: empty or surrounded by spaces")
                if flag == "allow-uri" and "*" in v[:-1]:
                    raise ConfigError(f"--{flag} {v!r}: '*' is only allowed at the end (prefix match)")
                if flag == "allow-dns" and "*" in v:
                    raise ConfigError(f"--{flag} {v!r}: DNS rules are exact names, no wildcards")
        return rules

    @property
    def empty(self) -> bool:
        return not (self.cn or self.dns or self.uri or self.ou)

    def decide(self, identity: Identity) -> Decision:
        if self.empty:
            return Decision(True, "no identity rules: any verified client")
        if identity.cn is not None and identity.cn in self.cn:
            return Decision(True, f"cn {identity.cn}")
        for ou in identity.ous:
            if ou in self.ou:
                return Decision(True, f"ou {ou}")
        wanted_dns = {_dns_key(d) for d in self.dns}
        for name in identity.dns:
            if _dns_key(name) in wanted_dns:
                return Decision(True, f"dns {name}")
        for u in identity.uris:
            for rule in self.uri:
                if uri_matches(rule, u):
                    return Decision(True, f"uri {rule}")
        return Decision(False, "client certificate identity is not allowed by the --allow-* rules")

    def allows(self, identity: Identity) -> bool:
        return self.decide(identity).allowed

    def describe(self) -> str:
        parts = [f"{kind}={','.join(values)}" for kind, values in
                 (("cn", self.cn), ("dns", self.dns), ("uri", self.uri), ("ou", self.ou)) if values]
        return " ".join(parts) or "any verified client"


def uri_matches(rule: str, uri: str) -> bool:
    """Exact match, or a prefix match when ``rule`` ends with ``*``."""
    if rule.endswith("*"):
        return uri.startswith(rule[:-1])
    return uri == rule


def _dns_key(name: str) -> str:
    return name.rstrip(".").lower() if name.isascii() else name.rstrip(".")


# ---------------------------------------------------------------------------- headers

_XFCC_SPECIALS = frozenset(',;=')


def _utf8_hex(ch: str, fmt: str) -> str:
    return "".join(fmt.format(b) for b in ch.encode("utf-8", "surrogatepass"))


def _dn_header_safe(dn: str) -> str:
    """An RFC 4514 string rewritten with RFC 4514's own hex-pair escapes so that it holds no ``"``,
    no ``\\\\`` pair and nothing outside printable ASCII: ``\\\\`` -> ``\\5C``, ``\\"`` -> ``\\22``,
    other characters -> ``\\XX`` per UTF-8 byte (as OpenSSL's ``XN_FLAG_RFC2253`` does for Envoy).
    The result means the same DN, and a quoted XFCC value holding it is unambiguous to every
    parser (no backslash ever precedes a quote or another backslash)."""
    out: list[str] = []
    i, n = 0, len(dn)
    while i < n:
        ch = dn[i]
        if ch == "\\" and i + 1 < n:
            nxt = dn[i + 1]
            if nxt == "\\":
                out.append("\\5C")
            elif nxt == '"':
                out.append("\\22")
            elif nxt == " ":
                out.append("\\20")   # an escaped leading/trailing space survives header trimming
            elif " " <= nxt <= "~":
                out.append("\\" + nxt)
            else:
                out.append(_utf8_hex(nxt, "\\{:02X}"))
            i += 2
            continue
        if ch == '"' or ch == "\\":
            out.append(_utf8_hex(ch, "\\{:02X}"))
        elif " " <= ch <= "~":
            out.append(ch)
        else:
            out.append(_utf8_hex(ch, "\\{:02X}"))
        i += 1
    return "".join(out)


def _san_header_safe(value: str) -> str:
    """A DNS or URI SAN with ``"``, ``\\`` and anything outside printable ASCII percent-encoded
    (a valid URI never holds them; a certificate that does must not break the header)."""
    if value.isascii() and value.isprintable() and '"' not in value and "\\" not in value:
        return value
    return "".join(_utf8_hex(c, "%{:02X}") if (c in '"\\' or not " " <= c <= "~") else c for c in value)


def _xfcc_field(key: str, value: str, *, always_quote: bool = False) -> str:
    """One ``Key=value`` pair; the value is already header-safe and holds no ``"`` nor ``\\``.
    Values holding ``, ; =`` are double-quoted, as Envoy documents."""
    if always_quote or any(c in _XFCC_SPECIALS for c in value):
        value = f'"{value}"'
    return f"{key}={value}"


def xfcc_value(identity: Identity, *, by: Sequence[str] = ()) -> str:
    """One Envoy XFCC element for the current client, in Envoy's field order:
    ``By=<proxy URI SAN>`` (each, if given); ``Hash=<hex sha256 of DER>``; ``Subject="<RFC 4514>"``
    (always quoted); ``URI=<uri SAN>`` (each; ``URI=`` when there is none, as Envoy does);
    ``DNS=<dns SAN>`` (each). A proxy *replaces* any XFCC from the client with this value (Envoy's
    ``SANITIZE_SET``): never append to a client-supplied header."""
    fields = [_xfcc_field("By", _san_header_safe(b)) for b in by]
    fields.append(f"Hash={identity.sha256}")
    fields.append(_xfcc_field("Subject", _dn_header_safe(identity.subject), always_quote=True))
    fields += [_xfcc_field("URI", _san_header_safe(u)) for u in identity.uris] or ["URI="]
    fields += [_xfcc_field("DNS", _san_header_safe(d)) for d in identity.dns]
    return ";".join(fields)


def _sf_binary(der: bytes) -> str:
    return ":" + base64.b64encode(der).decode("ascii") + ":"


def client_cert_value(der: bytes) -> str:
    """RFC 9440 ``Client-Cert``: the end-entity certificate's DER as an RFC 8941 byte sequence."""
    if not der:
        raise ValueError("empty certificate")
    return _sf_binary(der)


def client_cert_chain_value(chain_der: Sequence[bytes]) -> str | None:
    """RFC 9440 ``Client-Cert-Chain``: the certificates *after* the end-entity one (issuer first),
    as an RFC 8941 list of byte sequences; None when there is nothing to send (omit the header).
    The end-entity certificate belongs in ``Client-Cert`` only; pass ``chain[1:]``."""
    items = [_sf_binary(d) for d in chain_der if d]
    return ", ".join(items) if items else None
