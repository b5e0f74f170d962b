"""gRPC in HTTP mode end to end: a real grpcio client (TLS, ALPN h2, client certificate) → tlsproxy
→ ``h2c://`` → a real grpcio server (tests/h2/grpc_apps.py). Each call is one exchange: its own
access-log line, its own X-Forwarded-Client-Cert, and a refused identity gets PERMISSION_DENIED.

The client's leg is HTTP/2 on the TLS port (ALPN h2); the app's leg is ``--upstream h2c://``.
"""

from __future__ import annotations

import contextlib
import logging

import grpc
import pytest

from tests.h2.grpc_apps import BIDI, UNARY, EchoApp, bidi, unary
from tests.h2.support import h2c_settings
from tests.support import PKI, captured_logs, running_proxy, wait_for

FRONT = "spiffe://cluster.local/ns/shop/sa/front"
OTHER = "spiffe://cluster.local/ns/other/sa/intruder"


def _client(pki: PKI, name: str, uri: str) -> tuple[bytes, bytes]:
    issued = pki.issue(name, client=True, server=False, uris=(uri,))
    return issued.cert_pem, issued.key_pem


@contextlib.contextmanager
def _channel(pki: PKI, port: int, cert_key: tuple[bytes, bytes] | None):
    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca_file.read_bytes(),
                                         private_key=cert_key[1] if cert_key else None,
                                         certificate_chain=cert_key[0] if cert_key else None)
    # the proxy listens on 127.0.0.1 only; its certificate names localhost
    channel = grpc.secure_channel(f"127.0.0.1:{port}", creds,
                                  options=(("grpc.ssl_target_name_override", "localhost"),))
    try:
        yield channel
    finally:
        channel.close()


def _access_lines(records) -> list[dict]:
    return [r.fields for r in records if r.name == "tlsproxy.access" and hasattr(r, "fields")]


def test_unary_and_bidi_calls_each_get_a_log_line_and_xfcc(pki, tmp_path):
    front = _client(pki, "front", FRONT)
    with EchoApp() as app, \
            running_proxy(h2c_settings(pki, app.port, client_ca=pki.ca_file,
                                       allow_uri=("spiffe://cluster.local/ns/shop/*",))) as proxy, \
            captured_logs("tlsproxy.access") as logs, _channel(pki, proxy.port, front) as channel:
        for i in range(3):
            reply, call = unary(channel).with_call(b"hello %d" % i, timeout=10)
            assert reply == b"hello %d" % i
            assert FRONT in dict(call.initial_metadata())["seen-xfcc"]
        messages = [b"one", b"two", b"three" * 10000]
        assert list(bidi(channel)(iter(messages), timeout=10)) == messages
        with pytest.raises(grpc.RpcError) as err:
            unary(channel)(b"fail", timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [m for m, _ in app.seen] == [UNARY] * 3 + [BIDI, UNARY]
        for _method, metadata in app.seen:
            assert f"URI={FRONT}" in metadata["x-forwarded-client-cert"]
        # a stream's access line is written once its end went out: the client may see the end first
        assert wait_for(lambda: len(_access_lines(logs)) >= 5, timeout=5)
        lines = _access_lines(logs)
        assert [line["path"] for line in lines] == [UNARY] * 3 + [BIDI, UNARY]
        assert all(line["status"] == 200 and line.get("identity") for line in lines)


def test_refused_identity_gets_permission_denied_per_call(pki, tmp_path):
    intruder = _client(pki, "intruder", OTHER)
    with EchoApp() as app, \
            running_proxy(h2c_settings(pki, app.port, client_ca=pki.ca_file,
                                       allow_uri=("spiffe://cluster.local/ns/shop/*",))) as proxy, \
            captured_logs("tlsproxy.access", level=logging.INFO) as logs, \
            _channel(pki, proxy.port, intruder) as channel:
        for _ in range(2):
            with pytest.raises(grpc.RpcError) as err:
                unary(channel)(b"hello", timeout=10)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert app.seen == []
        assert wait_for(lambda: len(_access_lines(logs)) >= 2, timeout=5)
        assert [line["status"] for line in _access_lines(logs)] == [403, 403]
