"""The lean metric families expose what prometheus-client's own objects would."""

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram

from tlsproxy.metrics import _LATENCY_BUCKETS, Metrics, _LeanFamily

amounts = st.lists(st.one_of(st.sampled_from(_LATENCY_BUCKETS),
                             st.floats(min_value=0, max_value=100, allow_nan=False)), max_size=40)


def _samples(registry: CollectorRegistry) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in registry.collect() for s in family.samples if not s.name.endswith("_created")}


@given(amounts)
def test_lean_histogram_matches_prometheus_histogram(values):
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    h = Histogram("d_seconds", "d", ["listener"], buckets=_LATENCY_BUCKETS, registry=theirs)
    lean = _LeanFamily("histogram", "d_seconds", "d", ["listener"], ours, buckets=_LATENCY_BUCKETS)
    for v in values:
        h.labels("in").observe(v)
        lean.labels("in").observe(v)
    assert _samples(ours) == _samples(theirs)


@given(st.lists(st.tuples(st.sampled_from(["a", "b"]), st.integers(0, 10**9)), max_size=20))
def test_lean_counter_matches_prometheus_counter(incs):
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    c = Counter("x_bytes", "x", ["listener"], registry=theirs)
    lean = _LeanFamily("counter", "x_bytes", "x", ["listener"], ours)
    for label, n in incs:
        c.labels(label).inc(n)
        lean.labels(label).inc(n)
    assert _samples(ours) == _samples(theirs)


def test_gauge_goes_both_ways_and_wrong_label_count_is_refused():
    m = Metrics()
    active = m.connections_active.labels("inbound", "http")
    active.inc()
    active.inc()
    active.dec()
    assert m.registry.get_sample_value("tlsproxy_connections_active",
                                       {"listener": "inbound", "protocol": "http"}) == 1
    with pytest.raises(ValueError, match="2 label values expected"):
        m.connections_active.labels("inbound")


def test_merge_expositions_adds_counts_and_keeps_shared_facts():
    """--workers N: worker 0's /metrics is every worker's exposition merged (tlsproxy.metrics)."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from tlsproxy.metrics import Metrics, merge_expositions

    a, b = Metrics(), Metrics()
    a.requests.labels("inbound", "2xx").inc(3)
    b.requests.labels("inbound", "2xx").inc(4)
    b.requests.labels("inbound", "5xx").inc()
    a.request_duration.labels("inbound").observe(0.003)
    b.request_duration.labels("inbound").observe(2.0)
    a.connections_active.labels("inbound", "http").inc(2)
    b.connections_active.labels("inbound", "http").inc(1)
    a.cert_not_after.labels("server", "CN=x", "1").set(1000)
    b.cert_not_after.labels("server", "CN=x", "1").set(1000)
    a.handshake_failures.labels("inbound", "eof").inc()
    merged = merge_expositions([generate_latest(m.registry).decode() for m in (a, b)]).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(merged) for s in fam.samples}
    assert samples[("tlsproxy_requests_total", (("code_class", "2xx"), ("listener", "inbound")))] == 7
    assert samples[("tlsproxy_requests_total", (("code_class", "5xx"), ("listener", "inbound")))] == 1
    assert samples[("tlsproxy_request_duration_seconds_count", (("listener", "inbound"),))] == 2
    bucket = "tlsproxy_request_duration_seconds_bucket"
    assert samples[(bucket, (("le", "0.005"), ("listener", "inbound")))] == 1
    assert samples[(bucket, (("le", "+Inf"), ("listener", "inbound")))] == 2
    assert samples[("tlsproxy_connections_active", (("listener", "inbound"), ("protocol", "http")))] == 3
    assert samples[("tlsproxy_certificate_not_after_seconds",
                    (("role", "server"), ("serial", "1"), ("subject", "CN=x")))] == 1000   # not doubled
    assert samples[("tlsproxy_handshake_failures_total", (("listener", "inbound"), ("reason", "eof")))] == 1
