"""headers.split_field_lines: one regex pass must accept exactly what the strict two-pass check
(FIELD_LINES_RE.fullmatch, then FIELD_LINE_RE.findall) accepted, with the same fields."""

import pytest

from tlsproxy.http.headers import FIELD_LINE_RE, FIELD_LINES_RE, split_field_lines

BLOCKS = [
    b"",
    b"Host: a\r\n",
    b"Host: a\r\nX-A:  b c \t\r\nEmpty:\r\n",
    b"Host: a\r\nBad Name: x\r\n",            # a space in the name: the tail "Name: x" must not count
    b"Host: a\r\nX: 1\nY: 2\r\n",             # a bare LF inside the block
    b"Host: a\r\nX: 1\r\n trailing\r\n",       # obs-fold
    b"Host: a\r\nX: 1\r\nno colon\r\n",
    b"Host: a\r\nX: a\rb\r\n",                 # a bare CR in a value
    b"Host: a\r\nX: 1",                        # no final CRLF
    b"Host: a\r\nX: 1\r\njunk",
    b"Host: a\r\n: empty name\r\n",
    b"Host: a\r\nX: \x00\r\n",
    b"Host: a\r\nX: caf\xc3\xa9\r\n",          # obs-text is allowed
]


@pytest.mark.parametrize("block", BLOCKS)
def test_same_verdict_and_fields_as_the_two_pass_check(block: bytes) -> None:
    buf = b"GET / HTTP/1.1\r\n" + block
    start = len(b"GET / HTTP/1.1\r\n")
    strict = FIELD_LINES_RE.fullmatch(buf, start) is not None
    got = split_field_lines(buf, start, len(buf))
    assert (got is not None) == strict
    if strict:
        assert got == FIELD_LINE_RE.findall(buf, start)
