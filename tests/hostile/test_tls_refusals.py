"""What the TLS port says to clients it will not serve: the alert RFC 8446 prescribes, a log
line, a metric — and nothing reaches the app.

Raw ClientHellos are built byte by byte here (no TLS library would send an SSLv3 or a TLS 1.2-only
hello on purpose), and openssl s_client covers the real-client side. (openssl -tls1_2 is in
tests/inbound/test_proxy.py; bad client certificates — unknown CA, expired, no clientAuth — in
tests/inbound/test_mtls.py.)
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import subprocess

import pytest

from tests.hostile.helpers import keepalive_ok, read_all, scripted_upstream
from tests.support import make_pki, running_proxy, settings_for, wait_for

# TLS alert descriptions (RFC 8446 §6)
UNEXPECTED_MESSAGE, HANDSHAKE_FAILURE, DECODE_ERROR, PROTOCOL_VERSION, MISSING_EXTENSION = 10, 40, 50, 70, 109


def _ext(kind: int, body: bytes) -> bytes:
    return struct.pack("!HH", kind, len(body)) + body


def client_hello(record_version: int = 0x0301, legacy_version: int = 0x0303,
                 suites: tuple[int, ...] = (0xC02F, 0xC030, 0x009C, 0x002F),
                 supported_versions: tuple[int, ...] = (), groups: tuple[int, ...] = (0x001D, 0x0017),
                 key_share: bool = False) -> bytes:
    """A ClientHello record. Without ``supported_versions`` it offers only ``legacy_version``
    (a TLS 1.2-or-older client, RFC 8446 §4.2.1)."""
    name = b"\x00" + struct.pack("!H", 9) + b"localhost"
    exts = _ext(0, struct.pack("!H", len(name)) + name)
    g = b"".join(struct.pack("!H", x) for x in groups)
    exts += _ext(10, struct.pack("!H", len(g)) + g)
    sigalgs = b"".join(struct.pack("!H", x) for x in (0x0403, 0x0804, 0x0401))
    exts += _ext(13, struct.pack("!H", len(sigalgs)) + sigalgs)
    if supported_versions:
        v = b"".join(struct.pack("!H", x) for x in supported_versions)
        exts += _ext(43, bytes([len(v)]) + v)
    if key_share:
        share = struct.pack("!HH", 0x001D, 32) + os.urandom(32)
        exts += _ext(51, struct.pack("!H", len(share)) + share)
    cs = b"".join(struct.pack("!H", x) for x in suites)
    body = (struct.pack("!H", legacy_version) + os.urandom(32) + b"\x20" + os.urandom(32)
            + struct.pack("!H", len(cs)) + cs + b"\x01\x00" + struct.pack("!H", len(exts)) + exts)
    hs = b"\x01" + struct.pack("!I", len(body))[1:] + body
    return b"\x16" + struct.pack("!HH", record_version, len(hs)) + hs


SSLV2_HELLO = bytes.fromhex("802e0103010015000000100100800200800300800400800500800600400700c0") + bytes(16)

CASES = [
    # name, bytes, alert, reason
    ("plain_http", b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", UNEXPECTED_MESSAGE, "not_tls"),
    ("binary_garbage", b"\x00\x01\x02 not tls at all\r\n" * 3, UNEXPECTED_MESSAGE, "not_tls"),
    ("ssh_banner", b"SSH-2.0-OpenSSH_9.2\r\n", UNEXPECTED_MESSAGE, "not_tls"),
    ("sslv2_hello", SSLV2_HELLO, PROTOCOL_VERSION, "protocol_version"),
    ("sslv3_hello", client_hello(0x0300, 0x0300, suites=(0x002F, 0x000A)), PROTOCOL_VERSION,
     "protocol_version"),
    ("tls10_hello", client_hello(0x0301, 0x0301), PROTOCOL_VERSION, "protocol_version"),
    ("tls11_hello", client_hello(0x0301, 0x0302), PROTOCOL_VERSION, "protocol_version"),
    ("tls12_only_hello", client_hello(0x0301, 0x0303), PROTOCOL_VERSION, "protocol_version"),
    ("tls13_no_shared_suite", client_hello(suites=(0x1305,), supported_versions=(0x0304,), key_share=True),
     HANDSHAKE_FAILURE, "no_shared_cipher"),
    ("tls13_without_key_share",
     client_hello(suites=(0x1301,), supported_versions=(0x0304,), groups=(0x0100,)),
     MISSING_EXTENSION, "no_shared_cipher"),
]


@pytest.fixture(scope="module")
def proxy_and_app(tmp_path_factory):
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    with scripted_upstream(keepalive_ok) as up, running_proxy(settings_for(pki, up.port)) as proxy:
        yield pki, proxy, up


def _alert(data: bytes) -> tuple[int, int]:
    """(level, description) of the first record, which must be an alert."""
    assert len(data) >= 7 and data[0] == 0x15 and data[1] == 3 and data[3:5] == b"\x00\x02", data[:16].hex()
    return data[5], data[6]


@pytest.mark.parametrize("raw,alert,reason", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refused_with_the_rfc8446_alert_a_log_line_and_a_metric(proxy_and_app, caplog, raw, alert, reason):
    pki, proxy, up = proxy_and_app
    counter = proxy.app.metrics.handshake_failures.labels("inbound", reason)
    before = counter._value.get()
    caplog.set_level(logging.INFO, logger="tlsproxy")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(raw)
        data, how = read_all(s, 5)
    assert _alert(data) == (2, alert)
    assert how == "eof"                          # a FIN after the alert, not an RST that could eat it
    assert wait_for(lambda: counter._value.get() == before + 1, 5)

    def logged() -> bool:   # the proxy's thread logs just after it counts: wait, do not race it
        return any(r.getMessage() == "handshake failed" and getattr(r, "fields", {}).get("reason") == reason
                   for r in list(caplog.records))

    assert wait_for(logged, 5), [r.getMessage() for r in caplog.records]
    assert up.raw == b""


def test_client_hello_cut_short_is_decode_error_and_counted_as_eof(proxy_and_app):
    pki, proxy, up = proxy_and_app
    counter = proxy.app.metrics.handshake_failures.labels("inbound", "eof")
    before = counter._value.get()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(client_hello()[:20])
        s.shutdown(socket.SHUT_WR)
        data, _ = read_all(s, 5)
    assert _alert(data) == (2, DECODE_ERROR)
    assert wait_for(lambda: counter._value.get() == before + 1, 5)


@pytest.mark.parametrize("flag", ["-tls1", "-tls1_1"])
def test_openssl_old_protocol_clients_get_protocol_version(proxy_and_app, flag):
    pki, proxy, up = proxy_and_app
    out = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{proxy.port}", flag,
                          "-cipher", "DEFAULT@SECLEVEL=0", "-servername", "localhost"],
                         input=b"", capture_output=True, timeout=20)
    text = (out.stdout + out.stderr).decode()
    assert "alert protocol version" in text, text
    assert up.raw == b""


def test_curl_speaking_plain_http_to_the_tls_port_fails_cleanly(proxy_and_app):
    pki, proxy, up = proxy_and_app
    r = subprocess.run(["curl", "-sS", "--max-time", "5", f"http://127.0.0.1:{proxy.port}/"],
                       capture_output=True, timeout=15)
    assert r.returncode != 0 and r.returncode != 28, r      # refused at once, not a timeout
    assert up.raw == b""


def test_still_serving_after_every_refusal(proxy_and_app):
    pki, proxy, up = proxy_and_app
    r = subprocess.run(["curl", "-sS", "--max-time", "10", "--cacert", str(pki.ca_file),
                        f"https://localhost:{proxy.port}/after"], capture_output=True, timeout=15)
    assert r.stdout == b"/after", r
