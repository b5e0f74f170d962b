"""The outbound forward proxy: HTTP_PROXY clients, allow-list before any resolution or dial, CONNECT."""

from __future__ import annotations

import json
import socket

from tests.outbound.peer import tls_peer
from tests.outbound.test_outbound import outbound_only
from tests.support import curl, running_proxy
from tlsproxy.config import HostPort


def raw(port: int, data: bytes, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def test_http_proxy_request_goes_to_the_peer_over_tls(pki, tmp_path):
    leaf = pki.issue("localhost", dns=("localhost",))
    with tls_peer(tmp_path / "peer", leaf) as peer:
        settings = outbound_only(tmp_path, outbound_ca=pki.ca_file, outbound_proxy=HostPort("", 0),
                                 outbound_allow=("localhost",))
        with running_proxy(settings) as a:
            bound = a.app.bound.extra["outbound-proxy"]
            assert bound.host == "127.0.0.1"          # a bare port binds loopback
            proxy = f"http://127.0.0.1:{bound.port}"
            r = curl("-x", proxy, f"http://localhost:{peer.port}/path?q=1")
            assert r.returncode == 0, r.stderr
            info = json.loads(r.stdout)
            assert info["path"] == "/path?q=1"         # origin-form towards the peer
            assert info["headers"]["Host"] == f"localhost:{peer.port}"
            assert "Proxy-Connection" not in info["headers"]
            assert info["tls"] == "TLSv1.3"
            # the same keep-alive pool serves the next request
            assert curl("-x", proxy, f"http://localhost:{peer.port}/again").returncode == 0
            assert len(a.app.outbound._peer_pools) == 1


def test_allow_list_refuses_before_resolving_or_dialling(pki, tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    victim = listener.getsockname()[1]
    settings = outbound_only(tmp_path, outbound_ca=pki.ca_file, outbound_proxy=HostPort("127.0.0.1", 0))
    with running_proxy(settings) as a:
        port = a.app.bound.extra["outbound-proxy"].port
        # a name that does not resolve: 403 (not 502 "cannot resolve"), so it was never looked up
        out = raw(port, b"GET http://nope.invalid:8443/x HTTP/1.1\r\nHost: nope.invalid:8443\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 403 "), out
        assert b"not on the outbound allow-list (*.svc, *.svc.cluster.local)" in out
        # an address that does listen: 403, and no connection ever reached it
        out = raw(port, f"GET http://127.0.0.1:{victim}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert out.startswith(b"HTTP/1.1 403 "), out
        try:
            listener.accept()
            raise AssertionError("the proxy dialled a destination outside the allow-list")
        except BlockingIOError:
            pass
        # an allow-listed name is dialled (and here fails to resolve: a clear 502)
        out = raw(port, b"GET http://peer.ns.svc:8443/ HTTP/1.1\r\nHost: peer.ns.svc:8443\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 502 "), out
        assert b"cannot resolve peer.ns.svc" in out
        # CONNECT outside the list: 403 too
        out = raw(port, f"CONNECT 127.0.0.1:{victim} HTTP/1.1\r\nHost: 127.0.0.1:{victim}\r\n\r\n".encode())
        assert out.startswith(b"HTTP/1.1 403 "), out
        try:
            listener.accept()
            raise AssertionError("the proxy dialled a CONNECT destination outside the allow-list")
        except BlockingIOError:
            pass
        # origin-form requests are not proxy requests
        out = raw(port, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 400 "), out
        samples = a.app.metrics.registry.get_sample_value(
            "tlsproxy_outbound_errors_total", {"peer": "not-allowed", "kind": "denied"})
        assert samples == 3.0     # two GETs and one CONNECT, under one label value
    listener.close()


def test_connect_is_tunnelled_unchanged(pki, tmp_path):
    leaf = pki.issue("localhost", dns=("localhost",))
    with tls_peer(tmp_path / "peer", leaf) as peer:
        settings = outbound_only(tmp_path, outbound_proxy=HostPort("127.0.0.1", 0),
                                 outbound_allow=("localhost",))
        with running_proxy(settings) as a:
            proxy = f"http://127.0.0.1:{a.app.bound.extra['outbound-proxy'].port}"
            # curl speaks TLS itself through the tunnel (-p), verifying the peer with the test CA
            r = curl("-p", "-x", proxy, "--cacert", str(pki.ca_file), f"https://localhost:{peer.port}/tun")
            assert r.returncode == 0, r.stderr
            info = json.loads(r.stdout)
            assert info["path"] == "/tun"
            # CONNECT to a name outside the list is refused
            r = curl("-p", "-x", proxy, "-k", "https://example.com:443/")
            assert r.returncode != 0
            assert b"403" in r.stderr, r.stderr
