"""The sans-IO HTTP/2 core, table-driven: request heads from header lists, the frame scanner."""

from __future__ import annotations

import pytest
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
)

from tlsproxy.errors import HTTPError
from tlsproxy.http.h2core import PREFACE_LEN, FrameScanner, H2Limits, Refusal, request_head

BASE = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/a?b"), (b":authority", b"x.example")]


def test_request_head_maps_pseudo_headers_and_joins_cookies():
    method, target, items, te = request_head(BASE + [(b"cookie", b"a=1"), (b"accept", b"*/*"),
                                                     (b"cookie", b"b=2"), (b"te", b"trailers")])
    assert (method, target, te) == (b"GET", b"/a?b", True)
    assert items[0] == (b"host", b"host", b"x.example")
    assert (b"cookie", b"cookie", b"a=1; b=2") in items
    assert not any(name == b"te" for _, name, _ in items)


@pytest.mark.parametrize("headers, status, kind", [
    ([(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"x")], 400, "h2_pseudo"),   # no :path
    (BASE + [(b"connection", b"keep-alive")], 400, "h2_connection_field"),
    (BASE + [(b"transfer-encoding", b"chunked")], 400, "h2_connection_field"),
    (BASE + [(b"te", b"gzip")], 400, "h2_te"),
    (BASE + [(b":protocol", b"websocket")], 400, "h2_pseudo"),
    ([(b"accept", b"*/*")] + BASE, 400, "h2_pseudo"),                       # pseudo after a field
    ([(b":method", b"CONNECT"), (b":authority", b"x:443")], 405, "method"),
    ([(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/")], 400, "host"),  # no authority
])
def test_malformed_request_heads(headers, status, kind):
    with pytest.raises(HTTPError) as err:
        request_head(headers)
    assert (err.value.status, err.value.kind) == (status, kind)


def test_host_stands_in_for_a_missing_authority():
    _, _, items, _ = request_head([(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"),
                                   (b"host", b"h.example")])
    assert items[0] == (b"host", b"host", b"h.example")


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _scanner(**kw) -> tuple[FrameScanner, Clock]:
    clock = Clock()
    s = FrameScanner(H2Limits(**kw), clock)
    s.scan(b"P" * PREFACE_LEN)
    return s, clock


def test_header_block_is_bounded_across_continuation_frames_even_byte_by_byte():
    s, _ = _scanner(max_header_block_bytes=1000)
    wire = HeadersFrame(1, b"a" * 400).serialize() + ContinuationFrame(1, b"b" * 400).serialize()
    for i in range(len(wire)):
        s.scan(wire[i:i + 1])
    with pytest.raises(Refusal) as why:
        s.scan(ContinuationFrame(1, b"c" * 400).serialize())
    assert why.value.defence == "header_block"


def test_an_ended_header_block_resets_the_count():
    s, _ = _scanner(max_header_block_bytes=1000)
    for _ in range(10):
        s.scan(HeadersFrame(1, b"a" * 900, flags=["END_HEADERS"]).serialize())


@pytest.mark.parametrize("frame, defence", [
    (RstStreamFrame(1, error_code=8), "rapid_reset"),
    (SettingsFrame(0, {4: 100}), "settings_flood"),
    (PingFrame(0, b"12345678"), "ping_flood"),
    (PriorityFrame(1, depends_on=0, stream_weight=1), "priority_flood"),
    (DataFrame(1, b""), "empty_data_flood"),
])
def test_per_second_budgets(frame, defence):
    s, clock = _scanner(max_resets_per_s=10, max_control_frames_per_s=10)
    wire = frame.serialize()
    s.scan(wire * 10)                       # at the budget: fine
    clock.t += 1.0
    s.scan(wire * 10)                       # a new second, a new budget
    with pytest.raises(Refusal) as why:
        s.scan(wire)
    assert why.value.defence == defence


def test_acks_and_ending_data_are_not_counted():
    s, _ = _scanner(max_control_frames_per_s=1)
    s.scan(SettingsFrame(0, flags=["ACK"]).serialize() * 5)
    s.scan(PingFrame(0, b"12345678", flags=["ACK"]).serialize() * 5)
    s.scan(DataFrame(1, b"", flags=["END_STREAM"]).serialize() * 5)
