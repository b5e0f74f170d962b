"""gRPC (HTTP/2) through tcp mode: a real grpcio client with TLS and a client certificate →
tlsproxy inbound (--protocol tcp, --alpn h2, mTLS) → a grpcio server on an insecure localhost port;
and the same chain with an outbound tls:// route in front (Envoy → local tlsproxy → TLS → peer
tlsproxy → Contour)."""

from __future__ import annotations

import logging

import grpc
import pytest

from tests.outbound.test_outbound import outbound_only, route
from tests.support import running_proxy
from tests.tcp.helpers import (
    ENVOY_ID,
    SERVICE,
    client_cert,
    exercise,
    grpc_server,
    insecure_channel,
    metric,
    secure_channel,
    tcp_settings,
)


def test_grpc_unary_and_streams_through_inbound_tcp_mode_with_mtls(pki, caplog):
    caplog.set_level(logging.INFO, logger="tlsproxy")
    envoy = client_cert(pki)
    with grpc_server() as contour:
        settings = tcp_settings(pki, contour.port, alpn=("h2",), client_ca=pki.ca_file, allow_uri=(ENVOY_ID,))
        with running_proxy(settings) as proxy:
            with secure_channel(proxy.port, pki, envoy) as channel:
                exercise(channel)
            # the calls reached the h2c server untouched (metadata included), from the proxy
            assert len(contour.peers) == 3
            assert all(p.startswith("ipv4:127.0.0.1:") for p in contour.peers)
            assert contour.metadata[0]["x-caller"] == "envoy"
            sent = metric(proxy, "tlsproxy_received_bytes_total", listener="inbound", protocol="tcp")
            assert sent > 1 << 20      # the 1 MiB chat message went through
            assert metric(proxy, "tlsproxy_handshakes_total", listener="inbound", version="TLSv1.3",
                          resumed="no") >= 1
        # after the drain the relay is recorded: one connection, how it ended, its duration
        assert metric(proxy, "tlsproxy_relay_duration_seconds_count", listener="inbound", protocol="tcp") == 1
        assert metric(proxy, "tlsproxy_connections_total", listener="inbound", protocol="tcp") == 1
        # one log line for the connection: client, identity, ALPN h2, bytes each way, duration, end
        (line,) = [r.fields for r in caplog.records if r.getMessage() == "connection"]
        assert line["listener"] == "inbound" and line["client"].startswith("127.0.0.1:")
        assert ENVOY_ID in line["identity"] and line["alpn"] == "h2" and line["tls_version"] == "TLSv1.3"
        assert line["bytes_in"] > 1 << 20 and line["bytes_out"] > 1 << 20
        assert line["ended"] == "client_closed" and line["duration_ms"] > 0


def test_grpc_without_h2_offered_fails_alpn(pki):
    """gRPC requires ALPN h2: with none offered (the tcp-mode default) the client refuses — which
    is why the walk-through says --alpn h2."""
    envoy = client_cert(pki)
    with grpc_server() as contour:
        settings = tcp_settings(pki, contour.port, client_ca=pki.ca_file)
        with running_proxy(settings) as proxy:
            with secure_channel(proxy.port, pki, envoy) as channel:
                with pytest.raises(grpc.RpcError) as err:
                    channel.unary_unary(f"/{SERVICE}/Unary")(b"x", timeout=5)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert not contour.peers


def test_grpc_client_outside_identity_rules_is_refused(pki):
    intruder = client_cert(pki, "intruder", "spiffe://cluster.local/ns/default/sa/intruder")
    with grpc_server() as contour:
        settings = tcp_settings(pki, contour.port, alpn=("h2",), client_ca=pki.ca_file, allow_uri=(ENVOY_ID,))
        with running_proxy(settings) as proxy:
            with secure_channel(proxy.port, pki, intruder) as channel:
                with pytest.raises(grpc.RpcError) as err:
                    channel.unary_unary(f"/{SERVICE}/Unary")(b"x", timeout=5)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert not contour.peers
            assert metric(proxy, "tlsproxy_relays_ended_total", listener="inbound", ended="refused") >= 1


def test_grpc_through_outbound_tls_route_and_inbound_tcp_mode(pki, tmp_path, caplog):
    """Envoy (plain h2c to a local port) → tlsproxy A (outbound tls:// route, client certificate,
    pinned peer identity, ALPN h2) → tlsproxy B (inbound tcp mode, mTLS) → Contour (h2c)."""
    caplog.set_level(logging.INFO, logger="tlsproxy")
    envoy = client_cert(pki)
    cdir = pki.write_pair(tmp_path / "envoy-tls", envoy)
    contour_id = "spiffe://cluster.local/ns/projectcontour/sa/contour"
    server_leaf = pki.issue("contour", dns=("contour.projectcontour.svc", "localhost"), uris=(contour_id,))
    b_dir = pki.write_pair(tmp_path / "contour-tls", server_leaf)
    with grpc_server() as contour:
        b_settings = tcp_settings(pki, contour.port, cert_dir=b_dir, alpn=("h2",), client_ca=pki.ca_file,
                                  allow_uri=(ENVOY_ID,))
        with running_proxy(b_settings) as b:
            a_settings = outbound_only(tmp_path, outbound_ca=pki.ca_file, outbound_cert_dir=cdir,
                                       outbound_routes=(route(url=f"tls://127.0.0.1:{b.port}",
                                                              server_name="contour.projectcontour.svc",
                                                              allow_uri=contour_id, alpn="h2"),))
            with running_proxy(a_settings) as a:
                local = a.app.bound.extra["outbound/0"].port
                with insecure_channel(local) as channel:
                    exercise(channel)
                assert len(contour.peers) == 3
                assert metric(b, "tlsproxy_handshakes_total", listener="inbound", version="TLSv1.3",
                              resumed="no") == 1
                sent = metric(a, "tlsproxy_received_bytes_total", listener=a.app.outbound.routes[0].label,
                              protocol="tcp")
                assert sent > 1 << 20
    lines = [r.fields for r in caplog.records if r.getMessage() == "connection"]
    inbound = [f for f in lines if f["listener"] == "inbound"]
    outbound = [f for f in lines if f["listener"].startswith("outbound:")]
    assert len(inbound) == 1 and len(outbound) == 1, lines
    # B negotiated h2 with A's route and saw Envoy's certificate
    assert inbound[0]["alpn"] == "h2" and ENVOY_ID in inbound[0]["identity"]
    assert outbound[0]["bytes_in"] == inbound[0]["bytes_in"] > 1 << 20
