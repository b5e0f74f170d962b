"""The body decoder (sans-IO): against h11 on valid bodies, strict on chunk lines, trailers kept."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tlsproxy.http import framing
from tlsproxy.http.exchange import End


def _decode(reader: framing.BodyReader, wire: bytes, cuts: list[int]) -> tuple[bytes, End | None]:
    data = b""
    pos = 0
    for cut in sorted({min(c, len(wire)) for c in cuts}) + [len(wire)]:
        if cut > pos:
            reader.feed(wire[pos:cut])
            pos = cut
        while True:
            ev = reader.next()
            if ev is framing.NEED_DATA:
                break
            if type(ev) is End:
                return data, ev
            data += bytes(ev)
    return data, None


def _h11_body(head: bytes, wire: bytes) -> tuple[bytes, list, bytes]:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head + wire)
    data = b""
    while True:
        ev = conn.next_event()
        if type(ev) is h11.Data:
            data += ev.data
        elif type(ev) is h11.EndOfMessage:
            return data, list(ev.headers), conn.trailing_data[0]
        elif ev is h11.NEED_DATA:
            raise AssertionError("h11 wants more")


_ext = st.sampled_from([b"", b";a", b";a=b", b';name="q\\"x"', b";x=1;y=2"])   # h11 takes no BWS
_trailers = st.lists(st.sampled_from([b"X-Sum: abc", b"grpc-status: 0", b"Y:"]), max_size=3)


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.binary(min_size=1, max_size=40), max_size=5),
       exts=st.lists(_ext, min_size=6, max_size=6),
       trailers=_trailers, cuts=st.lists(st.integers(0, 400), max_size=6),
       rest=st.sampled_from([b"", b"GET / HTTP/1.1\r\n"]))
def test_chunked_bodies_decode_as_h11_decodes_them(chunks, exts, trailers, cuts, rest):
    wire = b"".join(b"%x%s\r\n%s\r\n" % (len(c), exts[i], c) for i, c in enumerate(chunks))
    wire += b"0" + exts[-1] + b"\r\n" + b"".join(t + b"\r\n" for t in trailers) + b"\r\n" + rest
    data, end = _decode(framing.BodyReader(framing.CHUNKED), wire, cuts)
    head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    ref_data, ref_trailers, _ = _h11_body(head, wire)
    assert end is not None
    assert data == ref_data == b"".join(chunks)
    assert [(n, v) for _, n, v in end.trailers] == ref_trailers


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=300), cuts=st.lists(st.integers(0, 400), max_size=6))
def test_length_bodies_stop_at_their_length(body, cuts):
    reader = framing.BodyReader(framing.LENGTH, len(body))
    data, end = _decode(reader, body + b"NEXT", cuts)
    assert data == body and end is not None
    assert b"NEXT".startswith(reader.rest())     # what followed the body stays buffered, unread


@pytest.mark.parametrize("line", [
    b"5;a=b\x00c", b"5;\x00", b"5;a\x01=b", b"5\x7f", b"5;a=\x1bb", b"5 ;a=b c", b"+5", b"0x5", b" 5",
    b"fffffffffffffffff", b"5;=b", b"5;a=\"unterminated",
])
def test_bad_chunk_lines_are_framing_errors(line):
    reader = framing.BodyReader(framing.CHUNKED)
    reader.feed(line + b"\r\nhello\r\n0\r\n\r\n")
    with pytest.raises(framing.FramingError):
        for _ in range(10):
            reader.next()


def test_a_nul_is_refused_before_the_line_ends():
    reader = framing.BodyReader(framing.CHUNKED)
    reader.feed(b"5;a=\x00")
    with pytest.raises(framing.FramingError, match="control character"):
        reader.next()


def test_bare_lf_and_missing_crlf_after_data():
    for wire in (b"5\nhello\r\n0\r\n\r\n", b"5\r\nhelloX\r\n0\r\n\r\n", b"5\r\nhello\r\n0\r\nX: y\n\r\n"):
        reader = framing.BodyReader(framing.CHUNKED)
        reader.feed(wire)
        with pytest.raises(framing.FramingError):
            for _ in range(10):
                reader.next()


def test_extension_overhead_is_bounded():
    reader = framing.BodyReader(framing.CHUNKED)
    line = b"1;" + b"x" * 4000 + b"\r\na\r\n"
    reader.feed(line * 40)
    with pytest.raises(framing.FramingError, match="overhead"):
        for _ in range(200):
            reader.next()


def test_eof_inside_a_body_is_an_error():
    for fr, length in ((framing.LENGTH, 10), (framing.CHUNKED, 0)):
        reader = framing.BodyReader(fr, length)
        reader.feed(b"abc")
        reader.feed(b"")
        with pytest.raises(framing.FramingError):
            for _ in range(5):
                reader.next()


def test_relayable_trailers_drop_framing_and_hop_by_hop_fields():
    got = framing.relayable_trailers([(b"Content-Length", b"content-length", b"5"), (b"Host", b"host", b"x"),
                                      (b"TE", b"te", b"trailers"), (b"grpc-status", b"grpc-status", b"0"),
                                      (b"Transfer-Encoding", b"transfer-encoding", b"chunked")])
    assert got == ((b"grpc-status", b"grpc-status", b"0"),)
    assert framing.last_chunk(got) == b"0\r\ngrpc-status: 0\r\n\r\n"
