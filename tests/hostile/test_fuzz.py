"""Fuzzing: hypothesis properties for the pure header and config code, then raw mutated heads
through a live proxy.

The pure properties add to tests/http/test_headers.py (which checks hop-by-hop and identity
stripping): here, *whatever* the client sent, the rewritten head is one h11 will send (a head it
refuses to serialise kills the exchange — that is how `GET / HTTP/1.0` without Host used to drop
the connection), forwarding facts are appended not replaced, and the checks only ever answer with
an HTTPError. The live fuzz mutates a seed corpus with a fixed seed (reproducible) and holds the
proxy to: a well-formed answer or a clean close, never a handler crash, never a hang.
"""

from __future__ import annotations

import logging
import random
import socket
import time
from pathlib import Path

import h11
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from tests.hostile.helpers import keepalive_ok, read_all, scripted_upstream, tls_socket
from tests.support import running_proxy, settings_for
from tlsproxy import config as cfg
from tlsproxy.errors import ConfigError, HTTPError
from tlsproxy.http import headers as hdr

FACTS = hdr.ForwardFacts(b"10.1.2.3", b"https", b"443")

_names = st.sampled_from([
    "host", "connection", "upgrade", "keep-alive", "te", "trailer", "transfer-encoding", "content-length",
    "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-forwarded-port", "x-request-id",
    "x-forwarded-client-cert", "client-cert", "expect", "proxy-authorization", "cookie", "x-custom",
    "accept", "via",
]) | st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-!#$%&'*+.^_`|~", min_size=1, max_size=16)
_values = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40) \
    .map(str.strip)


def _triples(pairs):
    return [(n.encode(), n.lower().encode(), v.encode()) for n, v in pairs]


def _accepted_by_the_proxy(pairs, version: bytes) -> h11.Request | None:
    """The request as h11 parses it, when h11 and check_request both let it through."""
    head = b"GET / HTTP/%s\r\n" % version + b"".join(b"%s: %s\r\n" % (n.encode(), v.encode())
                                                     for n, v in pairs) + b"\r\n"
    server = h11.Connection(h11.SERVER)
    server.receive_data(head)
    try:
        req = server.next_event()
        hdr.check_request(req.method, req.target, req.http_version, req.headers)
    except (h11.RemoteProtocolError, HTTPError):
        return None
    return req if isinstance(req, h11.Request) else None


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(st.lists(st.tuples(_names, _values), max_size=20), st.sampled_from([b"1.1", b"1.0"]),
       st.one_of(st.none(), st.just(b"peer.svc:8443")))
@example([], b"1.0", None)                                   # HTTP/1.0 without Host (found by hand)
@example([("connection", "host"), ("host", "a")], b"1.1", None)   # Connection naming Host
def test_rewritten_request_is_always_sendable_by_h11(pairs, version, host_override):
    """Any head the proxy accepts becomes an upstream head h11 will serialise."""
    req = _accepted_by_the_proxy(pairs, version)
    assume(req is not None)
    pairs = zip(req.headers.raw_items(), req.headers, strict=True)
    items = [(raw, name, value) for (raw, _), (name, value) in pairs]
    out, request_id, _upgrade = hdr.rewrite_request(items, FACTS, host_override=host_override)
    names = [n for _r, n, _v in out]
    assert names.count(b"host") == 1
    if host_override is not None:
        assert (b"Host", b"host", host_override) in out
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[(r, v) for r, _n, v in out]))
    assert hdr._REQUEST_ID_RE.match(request_id)


@given(st.lists(st.tuples(st.just("x-forwarded-for"), _values.filter(bool)), max_size=4),
       st.lists(st.tuples(st.sampled_from(["accept", "cookie", "x-a"]), _values), max_size=6))
def test_forwarding_facts_are_appended_and_other_headers_keep_their_order(xffs, others):
    pairs = [("host", "h")] + xffs + others
    out, _rid, _up = hdr.rewrite_request(_triples(pairs), FACTS)
    xff = [v for _r, n, v in out if n == b"x-forwarded-for"]
    assert len(xff) == 1
    assert xff[0].endswith(b"10.1.2.3")
    for _n, v in xffs:                               # earlier hops survive, in order
        assert v.encode() in xff[0]
    kept = [(n, v) for _r, n, v in out if n in (b"accept", b"cookie", b"x-a")]
    assert kept == [(n.encode(), v.encode()) for n, v in others]
    assert [v for _r, n, v in out if n == b"x-forwarded-proto"] == [b"https"]


@given(st.lists(st.tuples(_names, _values), max_size=20), st.booleans())
def test_rewritten_response_never_carries_hop_by_hop(pairs, upgrade):
    out = hdr.rewrite_response(_triples(pairs), upgrade=upgrade)
    for _r, name, _v in out:
        if upgrade:
            assert name not in (b"keep-alive", b"proxy-connection", b"transfer-encoding")
        else:
            assert name not in hdr.HOP_BY_HOP


_heads = st.one_of(
    st.binary(max_size=300),
    st.lists(st.sampled_from([b"GET / HTTP/1.1", b"\r\n", b"\n", b"\r", b"Host: a", b" ", b"\t", b":",
                              b"Transfer-Encoding: chunked", b"Content-Length: 5", b"\x00", b"0\r\n"]),
             max_size=30).map(b"".join),
)


@settings(max_examples=500)
@given(_heads, st.integers(min_value=16, max_value=4096))
def test_raw_head_checks_only_ever_answer_400_414_431(buf, limit):
    checks = [hdr.check_raw_head(buf), hdr.check_bare_cr(buf)]
    end = hdr.find_head_end(buf)
    assert end == -1 or 0 < end <= len(buf)
    if end >= 0:
        checks.append(hdr.check_head_size(buf, end, limit))
    checks.append(hdr.map_h11_error(431, "too big", buf))
    checks.append(hdr.map_h11_error(400, "bad", buf))
    for c in checks:
        assert c is None or (isinstance(c, HTTPError) and c.status in (400, 414, 431))


@given(st.sampled_from([b"GET", b"POST", b"CONNECT", b"PRI", b"get"]), st.binary(max_size=40),
       st.sampled_from([b"1.0", b"1.1", b"2.0", b"0.9"]), st.lists(st.tuples(_names, _values), max_size=12))
def test_check_request_only_raises_http_errors(method, target, version, pairs):
    items = [(n.lower().encode(), v.encode()) for n, v in pairs]
    try:
        hdr.check_request(method, target, version, items)
    except HTTPError as err:
        assert err.status in (400, 405, 431, 505)


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(["ms", "s", "m", "h", "d", ""]))
def test_durations_round_trip(n, unit):
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "": 1}[unit]
    assert cfg.parse_duration(f"{n}{unit}") == pytest.approx(n * scale)


@given(st.one_of(st.text(max_size=20), st.integers(), st.floats(allow_nan=False), st.booleans(), st.none()))
def test_value_parsers_return_a_value_or_a_value_error(raw):
    for parse in (cfg.parse_duration, cfg.parse_size, cfg.parse_hostport, cfg.parse_upstream,
                  cfg.parse_positive_int, cfg.parse_on_off, cfg.parse_tls_version):
        try:
            value = parse(raw)
        except ValueError:
            continue
        if parse in (cfg.parse_duration, cfg.parse_size):
            assert value >= 0


_flag_values = st.one_of(st.text(max_size=12), st.sampled_from(["0", "1", "30s", "64KiB", "on", "off",
                                                                 "1.3", ":8443", "http://127.0.0.1:8080"]))


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from([o.flag for o in cfg.options()
                                        if not o.repeat and o.flag != "config"]), _flag_values, max_size=5),
       st.dictionaries(st.sampled_from([o.env for o in cfg.options() if not o.repeat]), _flag_values,
                       max_size=3))
def test_flags_and_env_give_settings_or_one_config_error(flags, env):
    env = {k: v for k, v in env.items() if k != cfg.ENV_PREFIX + "CONFIG"}
    try:
        s = cfg.build_settings(flags, env)
    except ConfigError as exc:
        assert "\n" not in str(exc)
        return
    assert isinstance(s, cfg.Settings)


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(
    st.text(max_size=200),
    st.dictionaries(st.sampled_from(["listen", "upstream", "head-timeout", "max_head_bytes", "bogus",
                                     "allow-dns", "access_log", "config"]),
                    st.one_of(st.text(max_size=10), st.integers(), st.lists(st.text(max_size=5), max_size=2),
                              st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2)),
                    max_size=4).map(lambda d: __import__("yaml").safe_dump(d)),
))
def test_config_file_gives_settings_or_one_config_error(tmp_path_factory, text):
    path = Path(tmp_path_factory.mktemp("cfg")) / "c.yaml"
    path.write_text(text)
    try:
        cfg.build_settings({"config": str(path)}, {})
    except ConfigError as exc:
        assert "\n" not in str(exc)


# ---------------------------------------------------------------------------- live raw-bytes fuzz

SEEDS = [
    b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"GET /a?b=c HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\nConnection: keep-alive\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /c HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"GET /u HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"PUT /e HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
    b"GET / HTTP/1.0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n",
]
TOKENS = [b"\r\n", b"\n", b"\r", b" ", b"\t", b":", b"\x00", b"\xff", b"chunked", b"Content-Length: 1\r\n",
          b"Transfer-Encoding: chunked\r\n", b"HTTP/1.1", b"HTTP/2.0", b"0\r\n\r\n", b"ffffffff", b";", b",",
          b"Host: b\r\n", b"\r\n\r\n"]
FUZZ_CASES = 500
FUZZ_SECONDS = 45


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        pos = rng.randrange(len(b) + 1)
        if op == 0 and b:
            del b[pos:pos + rng.randint(1, 8)]
        elif op == 1:
            b[pos:pos] = rng.choice(TOKENS)
        elif op == 2 and b:
            b[min(pos, len(b) - 1)] = rng.randrange(256)
        elif op == 3:
            b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 6)))
        else:
            b[pos:pos] = b[pos:pos + rng.randint(1, 20)]          # duplicate a span
    return bytes(b)


def _well_formed(data: bytes) -> list[int]:
    """Statuses of the responses in ``data``; raises if it is not a clean sequence of responses
    (a truncated last one is allowed only when the proxy closed mid-body)."""
    conn = h11.Connection(h11.CLIENT)
    conn.receive_data(data)
    conn.receive_data(b"")
    statuses = []
    while True:
        if conn.our_state is h11.IDLE:
            if not conn.trailing_data[0]:
                return statuses                     # nothing (more) was sent: a clean close
            conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
            conn.send(h11.EndOfMessage())
        event = conn.next_event()
        if isinstance(event, h11.Response):
            statuses.append(event.status_code)
        elif isinstance(event, h11.InformationalResponse):
            continue
        elif isinstance(event, h11.EndOfMessage):
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
            else:
                return statuses
        elif isinstance(event, h11.ConnectionClosed):
            return statuses


def test_mutated_heads_through_a_live_proxy(pki, caplog):
    rng = random.Random(8)          # fixed: a failure names the case index, rerun reproduces it
    caplog.set_level(logging.INFO, logger="tlsproxy")
    allowed = {200, 400, 405, 408, 413, 414, 417, 431, 501, 502, 505}
    with scripted_upstream(keepalive_ok) as up, \
            running_proxy(settings_for(pki, up.port, head_timeout_s=0.5, body_timeout_s=0.5,
                                       idle_timeout_s=0.5)) as proxy:
        t0 = time.monotonic()
        seen: dict[int, int] = {}
        for i in range(FUZZ_CASES):
            if time.monotonic() - t0 > FUZZ_SECONDS:
                break
            case = _mutate(rng, rng.choice(SEEDS))
            with tls_socket(proxy.port, pki, timeout=5) as s:
                s.sendall(case)
                if i % 4:
                    socket.socket.shutdown(s, socket.SHUT_WR)   # TCP FIN, TLS session kept: answered at once
                data, how = read_all(s, 4)        # every 4th: the proxy's own timeouts end it
            try:
                statuses = _well_formed(data)
            except h11.RemoteProtocolError as exc:
                raise AssertionError(f"case {i}: {case!r} -> malformed answer {data[:300]!r}") from exc
            assert set(statuses) <= allowed, (i, case, statuses)
            for st_ in statuses:
                seen[st_] = seen.get(st_, 0) + 1
        crashes = [r for r in caplog.records if r.getMessage() == "connection handler failed"]
        assert not crashes, [getattr(r, "fields", {}) for r in crashes]
        print(f"fuzz: {i + 1} cases, statuses {sorted(seen.items())}")
        assert seen.get(400, 0) > 0 and seen.get(200, 0) > 0, seen      # the corpus hits both sides
        with tls_socket(proxy.port, pki) as s:
            s.sendall(b"GET /alive HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            assert read_all(s)[0].endswith(b"/alive")


@settings(max_examples=300)
@given(_heads, st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=30))
def test_incremental_head_scans_agree_with_whole_buffer_scans(buf, cuts):
    """The engine scans each read of a growing head once (a head dribbled in tiny TLS records
    used to be rescanned whole per record: quadratic CPU). Scanning in pieces, from where the last
    scan stopped, must find exactly what one scan of the whole buffer finds."""
    grown = bytearray()
    scanned = 0
    end = cr = None
    pos = 0
    for cut in [*cuts, len(buf)]:
        grown += buf[pos:pos + cut]
        pos += cut
        if end is None:
            found = hdr.find_head_end(grown, max(0, scanned - 2))
            end = found if found >= 0 else None
        if cr is None:
            cr = hdr.check_bare_cr(grown, max(0, scanned - 1))
        scanned = len(grown)
        if pos >= len(buf):
            break
    whole_end = hdr.find_head_end(buf)
    assert (end if end is not None else -1) == whole_end
    assert (cr is None) == (hdr.check_bare_cr(buf) is None)
