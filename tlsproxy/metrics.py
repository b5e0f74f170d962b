"""Metric objects (prometheus-client), one registry per running proxy.

A leaf module: it imports nothing else of tlsproxy. Every family starts with ``tlsproxy_``;
counters end in ``_total``, durations are seconds, sizes bytes (Prometheus conventions).

The families updated on every request or connection (requests, request duration, connections,
handshakes, bytes) are *lean*: each labelled series is a plain number that ``inc``/``observe``
adds to, without prometheus-client's per-update lock and checks (13 Python calls and four lock
round-trips per proxied request before, docs/performance.md). That is safe because a worker
process updates its metrics from its one trio thread only. The registry turns them into the same
exposition at scrape time (``collect``); prometheus-client still does all the formatting.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

# Request latencies of a localhost sidecar are sub-millisecond to tens of seconds.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# A relayed connection lives from one request (a probe) to days (an xDS stream).
_RELAY_BUCKETS = (0.01, 0.1, 1, 10, 60, 300, 1800, 3600, 4 * 3600, 24 * 3600)


class _Series:
    """One labelled series of a lean counter or gauge."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def dec(self, amount: float = 1) -> None:
        self.value -= amount


class _HistogramSeries:
    """One labelled series of a lean histogram: per-bucket counts (not cumulative) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        # the first bucket whose upper bound is >= amount, as prometheus-client's Histogram counts
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.sum += amount


class _LeanFamily:
    """A counter, gauge or histogram family of lean series, registered as a collector."""

    def __init__(self, kind: str, name: str, doc: str, labelnames: list[str], registry: CollectorRegistry,
                 buckets: tuple[float, ...] = ()) -> None:
        self.kind, self.name, self.doc, self.labelnames = kind, name, doc, tuple(labelnames)
        self.bounds = (*buckets, float("inf"))
        self._series: dict[tuple[str, ...], _Series | _HistogramSeries] = {}
        registry.register(self)

    def labels(self, *values) -> Any:     # a _Series, or a _HistogramSeries for a histogram
        key = tuple(str(v) for v in values)
        if len(key) != len(self.labelnames):
            raise ValueError(f"{self.name}: {len(self.labelnames)} label values expected, got {len(key)}")
        series = self._series.get(key)
        if series is None:
            series = _HistogramSeries(self.bounds) if self.kind == "histogram" else _Series()
            self._series[key] = series
        return series

    def _family(self):
        if self.kind == "counter":
            return CounterMetricFamily(self.name, self.doc, labels=self.labelnames)
        if self.kind == "gauge":
            return GaugeMetricFamily(self.name, self.doc, labels=self.labelnames)
        return HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)

    def describe(self):
        return [self._family()]

    def collect(self):
        family = self._family()
        for key, series in list(self._series.items()):
            if isinstance(series, _HistogramSeries):
                acc, buckets = 0, []
                for bound, count in zip(series.bounds, series.counts, strict=True):
                    acc += count
                    buckets.append((floatToGoString(bound), acc))
                family.add_metric(key, buckets, series.sum)
            else:
                family.add_metric(key, series.value)
        return [family]


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        # lean: updated per request or connection (see the module docstring)
        self.requests = _LeanFamily("counter", "tlsproxy_requests", "HTTP requests answered",
                                    ["listener", "code_class"], r)
        self.request_duration = _LeanFamily("histogram", "tlsproxy_request_duration_seconds",
                                            "Time from request head to the end of the response",
                                            ["listener"], r, buckets=_LATENCY_BUCKETS)
        self.connections_active = _LeanFamily("gauge", "tlsproxy_connections_active",
                                              "Open client connections", ["listener", "protocol"], r)
        self.connections = _LeanFamily("counter", "tlsproxy_connections", "Client connections accepted",
                                       ["listener", "protocol"], r)
        self.handshakes = _LeanFamily("counter", "tlsproxy_handshakes", "Completed TLS handshakes",
                                      ["listener", "version", "resumed"], r)
        self.handshake_failures = Counter("tlsproxy_handshake_failures", "Failed TLS handshakes",
                                          ["listener", "reason"], registry=r)
        self.bytes_received = _LeanFamily("counter", "tlsproxy_received_bytes", "Bytes received from clients "
                                          "(HTTP bodies, or relayed bytes)", ["listener", "protocol"], r)
        self.bytes_sent = _LeanFamily("counter", "tlsproxy_sent_bytes", "Bytes sent to clients "
                                      "(HTTP bodies, or relayed bytes)", ["listener", "protocol"], r)
        # prometheus-client's own objects: updated rarely
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
        self.h2_connections = Counter("tlsproxy_h2_connections", "Client connections that negotiated "
                                      "HTTP/2 (ALPN h2); also counted in tlsproxy_connections_total",
                                      ["listener"], registry=r)
        self.h2_streams = _LeanFamily("counter", "tlsproxy_h2_streams", "HTTP/2 streams (requests) by "
                                      "answer class, or reset; also counted in tlsproxy_requests_total",
                                      ["listener", "code_class"], r)
        self.h2_defences = Counter("tlsproxy_h2_defences", "HTTP/2 defences triggered: a connection "
                                   "closed with GOAWAY (rapid reset, floods, header block or list, "
                                   "protocol errors) or a stream refused (concurrent_streams)",
                                   ["listener", "defence"], registry=r)
        self.outbound_errors = Counter("tlsproxy_outbound_errors", "Outbound failures by peer",
                                       ["peer", "kind"], registry=r)
        # self-provisioned certificates (--provision-secret, --outbound-ca-secret, the webhook's caBundle)
        self.k8s_api_errors = Counter("tlsproxy_k8s_api_errors", "Failed Kubernetes API calls, by verb and "
                                      "HTTP status (or unreachable, timeout, bad_response)", ["verb", "code"],
                                      registry=r)
        self.provision_writes = Counter("tlsproxy_provision_writes", "Writes of a self-provisioned Secret, "
                                        "by step (empty, invalid, renew, ca_rollover_*) and result "
                                        "(written, conflict, failed)", ["step", "result"], registry=r)
        self.cabundle_patches = Counter("tlsproxy_webhook_cabundle_patches", "Patches of the "
                                        "MutatingWebhookConfiguration's caBundle, by result", ["result"],
                                        registry=r)
        # --upstream h2c://: the pooled HTTP/2 connections to the app and the streams they carry
        self.upstream_h2_connections = Gauge("tlsproxy_upstream_h2_connections",
                                             "Open HTTP/2 (h2c) connections to the upstream", registry=r)
        self.upstream_h2_streams = Gauge("tlsproxy_upstream_h2_streams",
                                         "Exchanges in flight on HTTP/2 (h2c) upstream connections",
                                         registry=r)
        self.upstream_h2_closed = Counter("tlsproxy_upstream_h2_connections_closed",
                                          "HTTP/2 (h2c) upstream connections closed, by reason", ["reason"],
                                          registry=r)


# ---------------------------------------------------------------------------- --workers N: one /metrics

_SUMMED_GAUGES = frozenset({"tlsproxy_connections_active", "tlsproxy_upstream_h2_connections",
                            "tlsproxy_upstream_h2_streams"})   # per-process amounts: they add up


def merge_expositions(texts: list[str]) -> bytes:
    """Several worker processes' ``/metrics`` (text format) → one exposition of the whole set. Pure.

    Counters and histograms (buckets, sums, counts) add up, and so do gauges that count something
    per process (open connections); the other gauges are facts every worker shares (a certificate's
    expiry, the last reload) and keep the largest value; a ``_created`` timestamp keeps the
    earliest."""
    from prometheus_client import generate_latest
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, tuple[str, str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}
    for text in texts:
        for fam in text_string_to_metric_families(text):
            doc, kind, table = families.setdefault(fam.name, (fam.documentation, fam.type, {}))
            for sample in fam.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                old = table.get(key)
                if old is None:
                    table[key] = sample.value
                elif sample.name.endswith("_created"):
                    table[key] = min(old, sample.value)
                elif kind == "gauge" and fam.name not in _SUMMED_GAUGES:
                    table[key] = max(old, sample.value)
                else:
                    table[key] = old + sample.value

    class _Merged:
        def collect(self):
            for name, (doc, kind, table) in families.items():
                metric = Metric(name, doc, kind)
                for (sample_name, labels), value in table.items():
                    metric.add_sample(sample_name, dict(labels), value)
                yield metric

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())
    return generate_latest(registry)
