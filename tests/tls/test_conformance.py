"""TLS 1.3 conformance details, side by side with nginx on the same libssl and the same certificates
(an ECDSA P-256 chain and an RSA-2048 chain beside it): the key-exchange group tlsproxy selects, and
the alert it sends to records that may not come before the handshake ends (RFC 8446 §5.1).

ClientHellos and records are built with tlslite-ng (the library tlsfuzzer is built on), so the bytes
are those of tlsfuzzer's `test-tls13-no-unknown-groups.py` and `test-tls13-zero-length-data.py`
probes; the server's answer is read raw (plaintext records before the handshake keys exist) and
checked byte for byte. Issue 20.
"""

from __future__ import annotations

import os
import socket
import subprocess

import pytest
from tlslite.constants import TLS_1_3_HRR, CipherSuite, ContentType, ExtensionType, GroupName, SignatureScheme
from tlslite.extensions import (
    ClientKeyShareExtension,
    KeyShareEntry,
    SignatureAlgorithmsCertExtension,
    SignatureAlgorithmsExtension,
    SupportedGroupsExtension,
    SupportedVersionsExtension,
)
from tlslite.keyexchange import ECDHKeyExchange
from tlslite.messages import ClientHello, RecordHeader3, ServerHello
from tlslite.utils.codec import Parser

from tests.hostile.helpers import keepalive_ok, proxy_process, read_all, scripted_upstream
from tests.support import PKI, make_pki, nginx_tls13, running_proxy, settings_for
from tlsproxy.certs import generate
from tlsproxy.tls.listener import is_sslv3_client_hello

P256, P384, P521, X25519 = GroupName.secp256r1, GroupName.secp384r1, GroupName.secp521r1, GroupName.x25519
FFDHE2048 = GroupName.ffdhe2048
ECDSA_P256 = SignatureScheme.ecdsa_secp256r1_sha256
RSA_PSS = (SignatureScheme.rsa_pss_rsae_sha256, SignatureScheme.rsa_pss_pss_sha256)
CERT_SIGALGS = [ECDSA_P256, *RSA_PSS, SignatureScheme.rsa_pkcs1_sha256, SignatureScheme.rsa_pkcs1_sha384]
UNEXPECTED_MESSAGE_ALERT = b"\x15\x03\x03\x00\x02\x02\x0a"   # fatal(2), unexpected_message(10)
HANDSHAKE_FAILURE_ALERT = b"\x15\x03\x03\x00\x02\x02\x28"    # fatal(2), handshake_failure(40)


# ---------------------------------------------------------------------------- bytes, via tlslite-ng

def _share(group: int) -> KeyShareEntry:
    kex = ECDHKeyExchange(group, (3, 4))
    return KeyShareEntry().create(group, kex.calc_public_value(kex.get_random_private_key()))


def client_hello(groups=(P256, P384, X25519), shares=(), sigalgs=(ECDSA_P256, *RSA_PSS)) -> bytes:
    """A TLS 1.3 ClientHello handshake message (no record header), as tlsfuzzer's probes build it."""
    exts = [SupportedVersionsExtension().create([(3, 4), (3, 3)]),
            ClientKeyShareExtension().create([_share(g) for g in shares]),
            SupportedGroupsExtension().create(list(groups)),
            SignatureAlgorithmsExtension().create(list(sigalgs)),
            SignatureAlgorithmsCertExtension().create(CERT_SIGALGS)]
    hello = ClientHello().create((3, 3), bytearray(os.urandom(32)), bytearray(32),
                                 [CipherSuite.TLS_AES_128_GCM_SHA256,
                                  CipherSuite.TLS_EMPTY_RENEGOTIATION_INFO_SCSV], extensions=exts)
    return bytes(hello.write())


def record(content_type: int, payload: bytes, version=(3, 3)) -> bytes:
    return bytes(RecordHeader3().create(version, content_type, len(payload)).write()) + payload


def handshake_record(payload: bytes) -> bytes:
    return record(ContentType.handshake, payload, (3, 1))


def exchange(port: int, data: bytes, timeout: float = 5) -> tuple[bytes, str]:
    """Send ``data`` at once and read the answer up to EOF (an alert, then the close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        return read_all(s, timeout)


def first_answer(port: int, data: bytes, timeout: float = 5) -> bytes:
    """Send ``data`` at once and read until the first record is complete (a ServerHello is
    followed by the server's wait for our next flight, not by a close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        buf = b""
        while len(buf) < 5 or len(buf) < 5 + int.from_bytes(buf[3:5], "big"):
            got = s.recv(65536)
            if not got:
                break
            buf += got
        return buf


def first_record(answer: bytes) -> tuple[int, bytes]:
    assert len(answer) >= 5, answer.hex()
    length = int.from_bytes(answer[3:5], "big")
    assert len(answer) >= 5 + length, answer.hex()
    return answer[0], answer[5:5 + length]


def hello_answer(answer: bytes) -> tuple[str, str]:
    """("SH" or "HRR", selected group name), or ("alert", hex of the alert record)."""
    kind, body = first_record(answer)
    if kind == ContentType.alert:
        return "alert", answer[:7].hex()
    assert kind == ContentType.handshake and body[0] == 2, answer[:16].hex()   # server_hello
    sh = ServerHello().parse(Parser(bytearray(body[1:])))
    assert sh.server_version == (3, 3) and sh.cipher_suite == CipherSuite.TLS_AES_128_GCM_SHA256
    ext = sh.getExtension(ExtensionType.key_share)
    raw_ext = bytes(ext.extData)
    if sh.random == TLS_1_3_HRR:
        assert len(raw_ext) == 2                          # HRR: NamedGroup selected_group only
        return "HRR", GroupName.toStr(int.from_bytes(raw_ext, "big"))
    group = int.from_bytes(raw_ext[:2], "big")            # ServerHello: KeyShareEntry
    assert int.from_bytes(raw_ext[2:4], "big") == len(raw_ext) - 4
    return "SH", GroupName.toStr(group)


# ---------------------------------------------------------------------------- the two servers

# nginx serves the RSA chain beside the ECDSA one, as tlsproxy's directory does
RSA_CHAIN = "ssl_certificate {d}/tls2.crt; ssl_certificate_key {d}/tls2.key;"


def _with_rsa_chain(pki: PKI) -> None:
    """tls2.crt/tls2.key beside the ECDSA pair: an RSA-2048 leaf under its own RSA CA (a chain an
    RSA-only client can verify: its signature_algorithms_cert rules out an ECDSA-signed leaf)."""
    rsa_ca = generate.make_ca("test RSA CA", key_type="rsa")
    leaf = generate.issue(rsa_ca, "localhost", dns=("localhost",), ips=("127.0.0.1",), key_type="rsa")
    (pki.cert_dir / "tls2.crt").write_bytes(leaf.cert_pem + rsa_ca.cert_pem)
    (pki.cert_dir / "tls2.key").write_bytes(leaf.key_pem)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("conformance")
    pki = make_pki(tmp)
    _with_rsa_chain(pki)
    with scripted_upstream(keepalive_ok) as up, running_proxy(settings_for(pki, up.port)) as proxy, \
            nginx_tls13(pki.cert_dir, up.port, tmp / "nginx", RSA_CHAIN.format(d=pki.cert_dir)) \
                as nginx_port:
        yield pki, {"tlsproxy": proxy.port, "nginx": nginx_port}


# ---------------------------------------------------------------------------- group selection

GROUP_CASES = [
    # name, supported_groups, key shares sent, expected answer
    # tlsfuzzer no-unknown-groups, second hello of its sanity probe: a P-256 share is taken at once
    ("p256_share", (P256, P384, X25519), (P256,), ("SH", "secp256r1")),
    ("p256_share_x25519_listed_first", (X25519, P256, P384), (P256,), ("SH", "secp256r1")),
    ("p256_and_x25519_shares", (P256, X25519), (P256, X25519), ("SH", "secp256r1")),
    ("x25519_share", (X25519, P256), (X25519,), ("SH", "x25519")),
    ("p384_share", (P256, P384), (P384,), ("SH", "secp384r1")),
    ("p256_share_rsa_only_client", (P256,), (P256,), ("SH", "secp256r1")),
    # no usable share: OpenSSL 3.0 asks (HelloRetryRequest) for the first group of *its* list
    # (x25519, secp256r1, x448, secp521r1, secp384r1, ffdhe...) that the client lists, whatever
    # the client's order and whether server preference is set: nginx does the same.
    ("no_share", (P256, P384, X25519), (), ("HRR", "x25519")),
    ("no_share_p256_p384", (P384, P256), (), ("HRR", "secp256r1")),
    ("no_share_p384_only", (P384,), (), ("HRR", "secp384r1")),
    ("unlisted_share_p521_listed", (P521,), (), ("HRR", "secp521r1")),
    ("no_known_group", (0x0001, 0x0002, 0xFAFA), (), ("alert", HANDSHAKE_FAILURE_ALERT.hex())),
]


def _hello_for(name: str, groups, shares) -> bytes:
    sigalgs = RSA_PSS if name.endswith("rsa_only_client") else (ECDSA_P256, *RSA_PSS)
    return handshake_record(client_hello(groups, shares, sigalgs))


@pytest.mark.parametrize("groups,shares,expected", [c[1:] for c in GROUP_CASES],
                         ids=[c[0] for c in GROUP_CASES])
def test_selected_group_is_the_one_openssl_selects_for_nginx(servers, groups, shares, expected, request):
    pki, ports = servers
    name = request.node.callspec.id
    answers = {}
    for server, port in ports.items():
        answers[server] = hello_answer(first_answer(port, _hello_for(name, groups, shares)))
    assert answers["tlsproxy"] == expected, answers
    assert answers["tlsproxy"] == answers["nginx"], answers


# An operator who wants nginx's `ssl_ecdh_curve prime256v1:secp384r1:X25519` (what tlsfuzzer's
# no-unknown-groups script expects by default) says it to OpenSSL: CPython 3.11's ssl module can set
# one group per context only (set_ecdh_curve), not a list, so the list comes from OPENSSL_CONF.
GROUPS_CNF = """openssl_conf = openssl_init
[openssl_init]
ssl_conf = ssl_sect
[ssl_sect]
system_default = system_default_sect
[system_default_sect]
Groups = P-256:P-384:X25519
"""
CONFIGURED_CASES = [
    ((P256, P384, X25519), (), ("HRR", "secp256r1")),
    ((X25519, P384, P256), (), ("HRR", "secp256r1")),
    ((P256, P384, X25519), (P256,), ("SH", "secp256r1")),
    ((X25519, P256), (X25519,), ("SH", "x25519")),
    ((P521, FFDHE2048), (), ("alert", HANDSHAKE_FAILURE_ALERT.hex())),
]


def test_groups_set_with_openssl_conf_match_nginx_ssl_ecdh_curve(tmp_path, monkeypatch):
    pki = make_pki(tmp_path)
    _with_rsa_chain(pki)
    cnf = tmp_path / "groups.cnf"
    cnf.write_text(GROUPS_CNF)
    with scripted_upstream(keepalive_ok) as up, \
            nginx_tls13(pki.cert_dir, up.port, tmp_path / "nginx", RSA_CHAIN.format(d=pki.cert_dir)
                        + " ssl_ecdh_curve prime256v1:secp384r1:X25519;") as nginx_port:
        monkeypatch.setenv("OPENSSL_CONF", str(cnf))
        with proxy_process(pki, up.port) as proxy:
            for groups, shares, expected in CONFIGURED_CASES:
                answers = {server: hello_answer(first_answer(port, _hello_for("", groups, shares)))
                           for server, port in (("tlsproxy", proxy.port), ("nginx", nginx_port))}
                assert answers["tlsproxy"] == expected == answers["nginx"], (groups, shares, answers)


@pytest.mark.parametrize("sigalgs,bits", [("ECDSA+SHA256", "256"), ("rsa_pss_rsae_sha256", "2048")])
def test_the_certificate_follows_the_clients_signature_algorithms(servers, sigalgs, bits):
    pki, ports = servers
    for port in ports.values():
        out = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-sigalgs", sigalgs,
                              "-groups", "P-256:P-384:X25519", "-servername", "localhost", "-brief"],
                             input=b"", capture_output=True, timeout=20)
        text = (out.stdout + out.stderr).decode()
        assert "CONNECTION ESTABLISHED" in text and "Server Temp Key: ECDH, prime256v1" in text, text
        assert "Peer certificate: CN = localhost" in text, text
        # -brief prints no key size: ask for the chain once more, without -brief
        full = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-sigalgs", sigalgs,
                               "-servername", "localhost"], input=b"", capture_output=True, timeout=20)
        assert f"Server public key is {bits} bit" in full.stdout.decode(), full.stdout.decode()


# ------------------------------------------------------------------ records before the handshake ends

def _split_hello(first: int = 2) -> tuple[bytes, bytes]:
    """The ClientHello in two handshake records, the first ``first`` bytes long (tlsfuzzer's
    split_message(..., 2))."""
    hello = client_hello((P256,), (P256,), RSA_PSS)
    return handshake_record(hello[:first]), handshake_record(hello[first:])


ZERO_APP_DATA = record(ContentType.application_data, b"")

RECORD_CASES = [
    # name, bytes from the two hello records, whether nginx answers the same
    # tlsfuzzer zero-length-data "zero-length app data interleaved in handshake" (and "with padding":
    # padding applies to protected records only, so before the handshake keys the bytes are the same)
    ("zero_length_app_data_interleaved", 2, lambda a, b: a + ZERO_APP_DATA + b, True),
    ("zero_length_app_data_interleaved_after_5_bytes", 5, lambda a, b: a + ZERO_APP_DATA + b, True),
    ("app_data_interleaved", 2, lambda a, b: a + record(ContentType.application_data, b"GET /") + b, True),
    # nginx takes a first byte other than 22 (or an SSLv2 hello) for plain HTTP and answers
    # "400 The plain HTTP request was sent to HTTPS port"; tlsproxy follows RFC 8446 §5 (a record
    # type not allowed here: unexpected_message)
    ("zero_length_app_data_before_the_hello", 2, lambda a, b: ZERO_APP_DATA + a + b, False),
]


@pytest.mark.parametrize("first,build,nginx_too", [c[1:] for c in RECORD_CASES],
                         ids=[c[0] for c in RECORD_CASES])
def test_application_data_before_the_handshake_ends_is_unexpected_message(servers, first, build, nginx_too):
    pki, ports = servers
    for server, port in ports.items():
        if server == "nginx" and not nginx_too:
            continue
        a, b = _split_hello(first)
        data, how = exchange(port, build(a, b))
        assert data == UNEXPECTED_MESSAGE_ALERT, (server, data.hex())
        assert how == "eof", server       # a FIN after the alert, not an RST that could eat it


@pytest.mark.parametrize("first", [2, 5, 6, 40])
def test_a_fragmented_hello_still_handshakes(servers, first):
    pki, ports = servers
    for server, port in ports.items():
        a, b = _split_hello(first)
        assert hello_answer(first_answer(port, a + b)) == ("SH", "secp256r1"), server


# ---------------------------------------------------------------------------- the pre-handshake peek (pure)

def _head(hello: bytes) -> bytes:
    return hello[:11]


SSLV3_HEADS = [
    ("sslv3_hello", bytes.fromhex("16030000") + b"\x40" + b"\x01\x00\x00\x3c\x03\x00", True),
    ("ssl30_legacy_in_tls10_record", bytes.fromhex("1603010040") + b"\x01\x00\x00\x3c\x03\x00", True),
    ("tls12_legacy_version", bytes.fromhex("1603010040") + b"\x01\x00\x00\x3c\x03\x03", False),
    ("two_byte_fragment_then_zero_app_data", bytes.fromhex("1603010002") + b"\x01\x00" + ZERO_APP_DATA[:4],
     False),
    ("five_byte_fragment", bytes.fromhex("1603010005") + b"\x01\x00\x00\x3c\x03\x16", False),
    ("not_a_client_hello", bytes.fromhex("1603010040") + b"\x02\x00\x00\x3c\x03\x00", False),
    ("short_read", bytes.fromhex("16030000400100"), False),
    ("plain_http", b"GET / HTTP/1.1", False),
]


@pytest.mark.parametrize("head,expected", [c[1:] for c in SSLV3_HEADS], ids=[c[0] for c in SSLV3_HEADS])
def test_sslv3_peek_decides_only_on_a_whole_hello_header(head, expected):
    assert is_sslv3_client_hello(head) is expected
