"""tlsproxy.tls.identity: identity from real certificates, allow rules (table + properties), headers."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import re
import subprocess
from urllib.parse import unquote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from tlsproxy.certs.generate import issue, make_ca
from tlsproxy.errors import ConfigError
from tlsproxy.tls.identity import (
    IDENTITY_HEADERS,
    AllowRules,
    Identity,
    client_cert_chain_value,
    client_cert_value,
    uri_matches,
    xfcc_value,
)

SPIFFE = "spiffe://cluster.local/ns/shop/sa/checkout"


@pytest.fixture(scope="module")
def ca():
    return make_ca("identity test CA")


def der_of(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)


def selfsigned(attrs: list[tuple], sans: list[x509.GeneralName] = ()) -> bytes:
    """A DER certificate with an arbitrary subject (several CNs/OUs, odd characters)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(oid, value) for oid, value in attrs])
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1)))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return b.sign(key, hashes.SHA256()).public_bytes(Encoding.DER)


def ident(cn=None, ous=(), dns=(), uris=()) -> Identity:
    return Identity(subject=f"CN={cn}" if cn else "", cn=cn, ous=tuple(ous), dns=tuple(dns),
                    uris=tuple(uris), sha256="0" * 64, der=b"")


# ---------------------------------------------------------------------------- Identity

def test_identity_from_a_real_client_certificate(ca, tmp_path):
    pair = issue(ca, "checkout", ou="shop", dns=("checkout.shop.svc", "checkout"), uris=(SPIFFE,),
                 server=False, client=True)
    der = der_of(pair.cert_pem)
    i = Identity.from_der(der)
    assert i.subject == "CN=checkout,OU=shop"
    assert (i.cn, i.ous, i.uris) == ("checkout", ("shop",), (SPIFFE,))
    assert i.dns == ("checkout.shop.svc", "checkout")
    assert i.sha256 == hashlib.sha256(der).hexdigest()
    # the hash is the one openssl prints as the SHA-256 fingerprint
    (tmp_path / "c.pem").write_bytes(pair.cert_pem)
    fp = subprocess.run(["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", tmp_path / "c.pem"],
                        capture_output=True, text=True, timeout=30, check=True).stdout
    assert fp.split("=", 1)[1].strip().replace(":", "").lower() == i.sha256
    assert i == Identity.from_certificate(pair.cert)
    assert "der" not in repr(i)


def test_identity_without_cn_or_sans():
    i = Identity.from_der(selfsigned([(NameOID.ORGANIZATION_NAME, "acme")]))
    assert (i.cn, i.ous, i.dns, i.uris, i.subject) == (None, (), (), (), "O=acme")


def test_identity_uses_the_most_specific_cn_and_every_ou():
    der = selfsigned([(NameOID.ORGANIZATIONAL_UNIT_NAME, "a"), (NameOID.ORGANIZATIONAL_UNIT_NAME, "b"),
                      (NameOID.COMMON_NAME, "outer"), (NameOID.COMMON_NAME, "inner")])
    i = Identity.from_der(der)
    assert i.cn == "inner" and i.ous == ("a", "b")
    assert not AllowRules(cn=("outer",)).allows(i) and AllowRules(cn=("inner",)).allows(i)


def test_identity_with_a_duplicate_san_extension_raises_value_error():
    good = selfsigned([(NameOID.COMMON_NAME, "x")],
                      [x509.DNSName("a")])
    key = ec.generate_private_key(ec.SECP256R1())
    cert = x509.load_der_x509_certificate(good)
    b = (x509.CertificateBuilder().subject_name(cert.subject).issuer_name(cert.subject)
         .public_key(key.public_key()).serial_number(1)
         .not_valid_before(cert.not_valid_before_utc).not_valid_after(cert.not_valid_after_utc)
         .add_extension(x509.SubjectAlternativeName([x509.DNSName("a")]), critical=False)
         .add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.3.4"), b"\x05\x00"),
                        critical=False))
    der = b.sign(key, hashes.SHA256()).public_bytes(Encoding.DER)
    # turn OID 1.2.3.4 into subjectAltName (2.5.29.17): two SAN extensions (cryptography: DuplicateExtension)
    dup = der.replace(bytes.fromhex("06032a0304"), bytes.fromhex("0603551d11"))
    with pytest.raises(ValueError, match="Duplicate"):
        Identity.from_der(dup)


def test_identity_from_garbage_raises_value_error():
    with pytest.raises(ValueError):
        Identity.from_der(b"\x30\x03garbage")


# ---------------------------------------------------------------------------- rules: table

RULE_TABLE = [
    # (rules, identity, allowed, reason fragment)
    (AllowRules(), ident("anyone"), True, "any verified client"),
    (AllowRules(cn=("checkout",)), ident("checkout"), True, "cn checkout"),
    (AllowRules(cn=("checkout",)), ident("Checkout"), False, "not allowed"),
    (AllowRules(cn=("checkout",)), ident(None, dns=("checkout",)), False, "not allowed"),
    (AllowRules(dns=("web.shop.svc",)), ident("x", dns=("WEB.shop.svc.",)), True, "dns WEB.shop.svc."),
    (AllowRules(dns=("web.shop.svc",)), ident("web.shop.svc"), False, "not allowed"),   # CN is not a SAN
    (AllowRules(dns=("web.shop.svc",)), ident("x", dns=("api.shop.svc",)), False, "not allowed"),
    (AllowRules(uri=(SPIFFE,)), ident("x", uris=(SPIFFE,)), True, f"uri {SPIFFE}"),
    (AllowRules(uri=(SPIFFE,)), ident("x", uris=(SPIFFE + "-v2",)), False, "not allowed"),
    (AllowRules(uri=("spiffe://cluster.local/ns/shop/*",)), ident(uris=(SPIFFE,)), True, "uri spiffe"),
    (AllowRules(uri=("spiffe://cluster.local/ns/shop/*",)),
     ident(uris=("spiffe://cluster.local/ns/shopping/sa/x",)), False, "not allowed"),
    (AllowRules(uri=("spiffe://cluster.local/ns/shop*",)),
     ident(uris=("spiffe://cluster.local/ns/shopping/sa/x",)), True, "uri"),       # the documented pitfall
    (AllowRules(uri=("*",)), ident(uris=("urn:x",)), True, "uri *"),
    (AllowRules(uri=("*",)), ident("x"), False, "not allowed"),
    (AllowRules(ou=("shop",)), ident("x", ous=("billing", "shop")), True, "ou shop"),
    (AllowRules(ou=("shop",)), ident("x", ous=("Shop",)), False, "not allowed"),
    (AllowRules(cn=("nope",), uri=(SPIFFE,)), ident("x", uris=("urn:a", SPIFFE)), True, "uri"),  # any rule
    (AllowRules(cn=("a",), dns=("b",), uri=("c",), ou=("d",)), ident("z", ("y",), ("x",), ("w",)), False,
     "not allowed"),
]


@pytest.mark.parametrize(("rules", "identity", "allowed", "reason"), RULE_TABLE)
def test_rules_table(rules, identity, allowed, reason):
    d = rules.decide(identity)
    assert d.allowed is allowed and rules.allows(identity) is allowed
    assert reason in d.reason


def test_rules_against_real_certificates(ca):
    client = Identity.from_der(der_of(issue(ca, "checkout", ou="shop", uris=(SPIFFE,), client=True).cert_pem))
    other = Identity.from_der(der_of(issue(ca, "intruder", ou="ops", client=True).cert_pem))
    rules = AllowRules.parse(uri=["spiffe://cluster.local/ns/shop/*"], ou=["payments"])
    assert rules.allows(client) and not rules.allows(other)
    assert rules.decide(other).reason == "client certificate identity is not allowed by the --allow-* rules"
    assert "CN=intruder" in other.describe()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"uri": ["spiffe://x/*/y"]}, "only allowed at the end"),
    ({"uri": ["*spiffe"]}, "only allowed at the end"),
    ({"cn": [""]}, "--allow-cn ''"),
    ({"ou": [" shop"]}, "--allow-ou"),
    ({"dns": ["*.shop.svc"]}, "no wildcards"),
])
def test_rule_parsing_refuses_bad_values(kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        AllowRules.parse(**kwargs)


def test_rule_parsing_accepts_good_values():
    r = AllowRules.parse(cn=["a"], dns=["b.c"], uri=["spiffe://x/*", "urn:y"], ou=["d"])
    assert r == AllowRules(("a",), ("b.c",), ("spiffe://x/*", "urn:y"), ("d",))
    assert r.describe() == "cn=a dns=b.c uri=spiffe://x/*,urn:y ou=d"
    assert AllowRules().empty and AllowRules().describe() == "any verified client"


# ---------------------------------------------------------------------------- rules: properties

texts = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=12)
identities = st.builds(ident, cn=st.none() | texts, ous=st.lists(texts, max_size=3),
                       dns=st.lists(texts, max_size=3), uris=st.lists(texts, max_size=3))
small = st.lists(texts, max_size=2).map(tuple)
rule_sets = st.builds(AllowRules, cn=small, dns=small, uri=small, ou=small)


def union(a: AllowRules, b: AllowRules) -> AllowRules:
    return AllowRules(a.cn + b.cn, a.dns + b.dns, a.uri + b.uri, a.ou + b.ou)


@settings(max_examples=300, deadline=None)
@given(rule_sets, rule_sets, identities)
def test_rules_are_an_any_of(a, b, i):
    u = union(a, b).allows(i)
    if a.empty and b.empty:
        assert u                           # no rules: any verified client
    elif a.empty or b.empty:
        assert u == (b if a.empty else a).allows(i)
    else:
        assert u == (a.allows(i) or b.allows(i))


@settings(max_examples=300, deadline=None)
@given(identities)
def test_every_identity_is_allowed_by_a_rule_naming_it(i):
    if i.cn is not None:
        assert AllowRules(cn=(i.cn,)).allows(i)
    for ou in i.ous:
        assert AllowRules(ou=(ou,)).allows(i)
    for d in i.dns:
        assert AllowRules(dns=(d.upper(),)).allows(i)
    for u in i.uris:
        assert AllowRules(uri=(u,)).allows(i)
        assert AllowRules(uri=(u[: len(u) // 2] + "*",)).allows(i)


@settings(max_examples=300, deadline=None)
@given(texts, texts)
def test_uri_prefix_rule_is_startswith(prefix, uri):
    assert uri_matches(prefix + "*", uri) == uri.startswith(prefix)
    assert uri_matches(prefix + "*", prefix + uri)
    assert uri_matches(uri, uri)
    if not prefix.endswith("*"):
        assert uri_matches(prefix, uri) == (prefix == uri)


@settings(max_examples=200, deadline=None)
@given(identities)
def test_a_nonmatching_client_is_denied_with_a_reason(i):
    rules = AllowRules(cn=("\x00never",))
    d = rules.decide(i)
    assert not d.allowed and d.reason


# ---------------------------------------------------------------------------- XFCC

def parse_xfcc_element(value: str) -> list[tuple[str, str]]:
    """Envoy's documented grammar: ``;``-separated ``key=value``; a value holding ``, ; =`` is
    double-quoted, ``\\"`` stands for a quote. Written from the docs, not from our code."""
    pairs, i = [], 0
    while i < len(value):
        eq = value.index("=", i)
        key, i = value[i:eq], eq + 1
        if i < len(value) and value[i] == '"':
            i += 1
            out = []
            while value[i] != '"':
                if value[i] == "\\" and value[i + 1] == '"':
                    i += 1
                out.append(value[i])
                i += 1
            i += 1
            val = "".join(out)
        else:
            end = value.find(";", i)
            end = len(value) if end < 0 else end
            val, i = value[i:end], end
            assert not set(val) & set(',;="'), val
        pairs.append((key, val))
        if i < len(value):
            assert value[i] == ";", (value, i)
            i += 1
    return pairs


def test_xfcc_exact_value_for_a_real_certificate(ca):
    pair = issue(ca, "checkout", ou="shop", dns=("checkout.shop.svc", "checkout"),
                 uris=(SPIFFE, "urn:x:y"), client=True)
    i = Identity.from_der(der_of(pair.cert_pem))
    assert xfcc_value(i) == (f'Hash={i.sha256};Subject="CN=checkout,OU=shop";URI={SPIFFE};URI=urn:x:y;'
                             "DNS=checkout.shop.svc;DNS=checkout")
    assert xfcc_value(i, by=("spiffe://cluster.local/ns/shop/sa/web",)).startswith(
        f"By=spiffe://cluster.local/ns/shop/sa/web;Hash={i.sha256};")


def test_xfcc_without_sans_keeps_an_empty_uri_like_envoy():
    i = Identity.from_der(selfsigned([(NameOID.COMMON_NAME, "bare")]))
    assert xfcc_value(i) == f'Hash={i.sha256};Subject="CN=bare";URI='


def test_xfcc_quotes_separators_and_never_needs_quote_or_backslash_escapes():
    cn = 'a "quoted", odd=name\\'
    der = selfsigned([(NameOID.COMMON_NAME, cn), (NameOID.ORGANIZATION_NAME, "Acme, Inc.")],
                     [x509.UniformResourceIdentifier("urn:a;b=c,d"), x509.DNSName('we"ird\\')])
    i = Identity.from_der(der)
    v = xfcc_value(i)
    assert 'URI="urn:a;b=c,d"' in v and "DNS=we%22ird%5C" in v
    subject = dict(parse_xfcc_element(v))["Subject"]
    assert subject == "O=Acme\\, Inc.,CN=a \\22quoted\\22\\, odd=name\\5C"
    # the same DN, written with RFC 4514 hex pairs
    back = x509.Name.from_rfc4514_string(subject)
    assert [(a.oid, a.value) for a in back] == [(NameOID.COMMON_NAME, cn),
                                                (NameOID.ORGANIZATION_NAME, "Acme, Inc.")]


def test_xfcc_and_describe_are_ascii_even_for_unicode_and_control_characters():
    der = selfsigned([(NameOID.COMMON_NAME, "Jürgen\r\nX-Evil: 1")], [x509.DNSName("bad\r\nname")])
    i = Identity.from_der(der)
    v = xfcc_value(i)
    assert v.isascii() and v.isprintable()
    assert 'Subject="CN=J\\C3\\BCrgen\\0D\\0AX-Evil: 1"' in v and "DNS=bad%0D%0Aname" in v
    assert i.describe().isascii() and i.describe().isprintable()


printable = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
# cryptography escapes an all-space value wrongly (' ' -> '\\\\ ', two backslashes): keep values
# that do not begin or end with a space, which real subjects do not either.
attr_values = st.text(alphabet=printable, min_size=1, max_size=16).filter(lambda v: v == v.strip())
names = st.lists(st.tuples(st.sampled_from([NameOID.COMMON_NAME, NameOID.ORGANIZATIONAL_UNIT_NAME,
                                            NameOID.ORGANIZATION_NAME]), attr_values), min_size=1, max_size=4)
sans = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters="%"),
               min_size=1, max_size=20)


@settings(max_examples=300, deadline=None)
@given(names, st.lists(sans, max_size=3), st.lists(sans, max_size=3), st.lists(sans, max_size=2))
def test_xfcc_round_trips_through_an_envoy_style_parser(attrs, uris, dns, by):
    name = x509.Name([x509.NameAttribute(oid, value) for oid, value in attrs])
    i = Identity(subject=name.rfc4514_string(), cn=None, ous=(), dns=tuple(dns), uris=tuple(uris),
                 sha256=hashlib.sha256(name.public_bytes()).hexdigest(), der=b"")
    v = xfcc_value(i, by=by)
    assert v.isascii() and v.isprintable()
    pairs = parse_xfcc_element(v)
    assert [val for k, val in pairs if k == "Hash"] == [i.sha256]
    (subject,) = [val for k, val in pairs if k == "Subject"]
    assert '"' not in subject and "\\\\" not in subject
    assert [(a.oid, a.value) for a in x509.Name.from_rfc4514_string(subject)] == \
        [(a.oid, a.value) for a in name]
    assert [unquote(val) for k, val in pairs if k == "By"] == by
    assert [unquote(val) for k, val in pairs if k == "URI"] == (uris or [""])
    assert [unquote(val) for k, val in pairs if k == "DNS"] == dns


# ---------------------------------------------------------------------------- RFC 9440

def test_client_cert_is_an_sf_binary_of_the_der(ca):
    der = der_of(issue(ca, "checkout", client=True).cert_pem)
    v = client_cert_value(der)
    assert re.fullmatch(r":[A-Za-z0-9+/]+=*:", v)
    assert base64.b64decode(v[1:-1], validate=True) == der
    with pytest.raises(ValueError):
        client_cert_value(b"")


def test_client_cert_chain_is_a_list_of_sf_binaries(ca):
    inter = der_of(ca.cert_pem)
    extra = der_of(make_ca("root").cert_pem)
    v = client_cert_chain_value([inter, extra])
    items = v.split(", ")
    assert [base64.b64decode(x[1:-1], validate=True) for x in items] == [inter, extra]
    assert all(x.startswith(":") and x.endswith(":") for x in items)
    assert client_cert_chain_value([]) is None


def test_identity_header_names_are_lowercase_and_complete():
    assert IDENTITY_HEADERS == ("x-forwarded-client-cert", "client-cert", "client-cert-chain")
