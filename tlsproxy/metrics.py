"""Metric objects (prometheus-client), one registry per running proxy.

A leaf module: it imports nothing else of tlsproxy. Every family starts with ``tlsproxy_``;
counters end in ``_total``, durations are seconds, sizes bytes (Prometheus conventions).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Request latencies of a localhost sidecar are sub-millisecond to tens of seconds.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# A relayed connection lives from one request (a probe) to days (an xDS stream).
_RELAY_BUCKETS = (0.01, 0.1, 1, 10, 60, 300, 1800, 3600, 4 * 3600, 24 * 3600)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("tlsproxy_requests", "HTTP requests answered",
                                ["listener", "code_class"], registry=r)
        self.request_duration = Histogram("tlsproxy_request_duration_seconds",
                                          "Time from request head to the end of the response",
                                          ["listener"], buckets=_LATENCY_BUCKETS, registry=r)
        self.connections_active = Gauge("tlsproxy_connections_active", "Open client connections",
                                        ["listener", "protocol"], registry=r)
        self.connections = Counter("tlsproxy_connections", "Client connections accepted",
                                   ["listener", "protocol"], registry=r)
        self.handshakes = Counter("tlsproxy_handshakes", "Completed TLS handshakes",
                                  ["listener", "version", "resumed"], registry=r)
        self.handshake_failures = Counter("tlsproxy_handshake_failures", "Failed TLS handshakes",
                                          ["listener", "reason"], registry=r)
        self.bytes_received = Counter("tlsproxy_received_bytes", "Bytes received from clients "
                                      "(HTTP bodies, or relayed bytes)", ["listener", "protocol"],
                                      registry=r)
        self.bytes_sent = Counter("tlsproxy_sent_bytes", "Bytes sent to clients (HTTP bodies, or "
                                  "relayed bytes)", ["listener", "protocol"], registry=r)
        self.relay_duration = Histogram("tlsproxy_relay_duration_seconds",
                                        "Life of a relayed connection (tcp mode, outbound tls:// routes), "
                                        "from upstream connect to close", ["listener", "protocol"],
                                        buckets=_RELAY_BUCKETS, registry=r)
        self.relays_ended = Counter("tlsproxy_relays_ended", "Relayed connections by how they ended",
                                    ["listener", "ended"], registry=r)
        self.upstream_errors = Counter("tlsproxy_upstream_errors", "Failures talking to the upstream",
                                       ["listener", "kind"], registry=r)
        self.client_errors = Counter("tlsproxy_client_errors", "Requests refused by the proxy itself",
                                     ["listener", "status"], registry=r)
        self.accept_errors = Counter("tlsproxy_accept_errors", "accept() failures (e.g. EMFILE)",
                                     ["listener", "error"], registry=r)
        self.cert_not_after = Gauge("tlsproxy_certificate_not_after_seconds",
                                    "Expiry of each loaded certificate (Unix time)",
                                    ["role", "subject", "serial"], registry=r)
        self.reloads = Counter("tlsproxy_certificate_reloads", "Certificate reload attempts",
                               ["role", "result"], registry=r)
        self.last_reload = Gauge("tlsproxy_certificate_last_reload_timestamp_seconds",
                                 "When certificates were last reloaded successfully (Unix time)",
                                 ["role"], registry=r)
        self.outbound_errors = Counter("tlsproxy_outbound_errors", "Outbound failures by peer",
                                       ["peer", "kind"], registry=r)
