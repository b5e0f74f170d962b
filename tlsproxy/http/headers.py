"""Pure header logic: request checks, hop-by-hop removal, X-Forwarded-*, request ids, error bodies.

Nothing here does I/O. Headers are h11's triples ``(raw_name, lowercased_name, value)`` (what
``h11.Headers`` stores), so rewritten heads can be handed back to h11 without re-validation of the
fields h11 already parsed.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus

from ..errors import HTTPError

Triple = tuple[bytes, bytes, bytes]

# RFC 9110 §7.6.1 plus the de-facto ones (Keep-Alive, Proxy-Connection). Transfer-Encoding is
# re-framed on each leg; Content-Length is kept (it is end-to-end).
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
    b"upgrade", b"proxy-authenticate", b"proxy-authorization",
})
# Client-identity headers only tlsproxy may set: always removed from what clients send (spoofing).
CLIENT_CERT_HEADERS = frozenset({b"x-forwarded-client-cert", b"client-cert", b"client-cert-chain"})
FORWARDED_HEADERS = frozenset({b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port"})
# What rewrite_request never passes on as the client sent it (it sets its own where one belongs).
_NOT_FORWARDED = HOP_BY_HOP | CLIENT_CERT_HEADERS | FORWARDED_HEADERS | {
    b"x-forwarded-for", b"x-request-id", b"expect"}

_REQUEST_ID_RE = re.compile(rb"^[\x21-\x7e]{1,200}$")   # visible ASCII, bounded: safe to log and pass on
# RFC 9112 §3.2 / RFC 3986 §3.2.2: Host = uri-host [ ":" port ]; a server MUST answer 400 to an
# invalid one (it is what the app routes on, and what X-Forwarded-Host repeats).
_HOST_RE = re.compile(rb"^(?:\[[0-9A-Fa-f:.]+\]|\[v[0-9A-Fa-f]+\.[A-Za-z0-9._~!$&'()*+,;=:-]+\]"
                      rb"|[A-Za-z0-9._~!$&'()*+,;=%-]*)(?::[0-9]*)?$")
_BARE_CR_RE = re.compile(rb"\r[^\n]")
# Header fields per request: Apache's LimitRequestFields and Tomcat's maxHeaderCount are 100, and
# Python's http.server (behind many sidecars) refuses more than 100 itself; we answer 431 first.
MAX_HEADER_FIELDS = 100

STATUS_TEXT = {
    100: "Continue", 101: "Switching Protocols", 200: "OK", 301: "Moved Permanently",
    400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    408: "Request Timeout", 411: "Length Required", 413: "Content Too Large", 414: "URI Too Long",
    417: "Expectation Failed", 421: "Misdirected Request", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported",
}


def reason_phrase(status: int) -> bytes:
    text = STATUS_TEXT.get(status)
    if text is None:
        try:
            text = HTTPStatus(status).phrase
        except ValueError:
            text = "Unknown"
    return text.encode()


def error_response(status: int, body: str, *, close: bool = True,
                   extra: Iterable[tuple[bytes, bytes]] = ()) -> bytes:
    """A complete, minimal response written by the proxy itself (the h11 state may be broken)."""
    payload = (body.rstrip("\n") + "\n").encode("utf-8", "replace")
    lines = [b"HTTP/1.1 %d %s" % (status, reason_phrase(status)),
             b"content-type: text/plain; charset=utf-8",
             b"content-length: %d" % len(payload)]
    lines += [name + b": " + value for name, value in extra]
    if close:
        lines.append(b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + payload


# ---------------------------------------------------------------------------- raw head checks

def find_head_end(buf: bytes | bytearray, start: int = 0) -> int:
    """Index just past the blank line ending a head, or -1 if incomplete. Accepts bare-LF endings
    (so that they can be *refused* instead of waited for). ``start``: where a previous search of
    the same growing buffer stopped, minus 2 (a head dribbled in tiny TLS records must not cost a
    scan of the whole buffer per record)."""
    i = buf.find(b"\n\r\n", start)
    j = buf.find(b"\n\n", start)
    if j < 0:
        return i + 3 if i >= 0 else -1
    return j + 2 if i < 0 or j + 2 < i + 3 else i + 3


# A field line as RFC 9110 §5.1/§5.5 define it: token ":" OWS value OWS CRLF, the value of HTAB, SP,
# VCHAR and obs-text. FIELD_LINES_RE checks a whole block with one fullmatch, FIELD_LINE_RE splits
# it with one findall: lines are CRLF-delimited and a value holds no CR or LF, so both see the same
# fields. Used for request heads (parse_simple_request) and response heads (h1client).
_FIELD = rb"([-!#$%&'*+.^_`|~0-9A-Za-z]+):[ \t]*((?:[\t \x21-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)[ \t]*\r\n"
FIELD_LINES_RE = re.compile(rb"(?:%s)*" % _FIELD)
FIELD_LINE_RE = re.compile(_FIELD)
# The same line, matched only where a line starts (right after an LF): see split_field_lines.
_FIELD_AT_LINE_START_RE = re.compile(rb"(?<=\n)" + _FIELD)
# The common request, parsed without h11 (parse_simple_request).
_SIMPLE_LINE_RE = re.compile(rb"([A-Z]{1,20}) ([\x21-\x7e]+) HTTP/1\.1\r\n")
_NOT_SIMPLE = frozenset({b"content-length", b"transfer-encoding", b"expect", b"upgrade"})


def split_field_lines(buf: bytes | bytearray, start: int, stop: int) -> list[tuple[bytes, bytes]] | None:
    """``(name, value)`` of every field line of ``buf[start:stop]`` — a block of CRLF-ended lines
    right after a start line (``buf[start - 1]`` is its LF) — or None when any line of it is not a
    strictly well-formed field line. One regex pass, not a check and then a split (two passes: a
    fifth of a head's parse). Why one pass is enough: each match starts right after an LF and ends
    at the CRLF of the same line (a name or value holds no CR or LF), so the matches are whole,
    distinct lines; when there are as many as the block has LFs, and the block ends with an LF,
    every line matched."""
    fields = _FIELD_AT_LINE_START_RE.findall(buf, start, stop)
    if len(fields) != buf.count(b"\n", start, stop) or (stop > start and buf[stop - 1] != 0x0A):
        return None
    return fields


def parse_simple_request(buf: bytes | bytearray, end: int) -> tuple[bytes, bytes, list[Triple]] | None:
    """``(method, target, header triples)`` of the request head ``buf[:end]`` (``end`` from
    :func:`find_head_end`) when it is the common case — HTTP/1.1, every line strictly well formed,
    exactly one Host, no Content-Length, Transfer-Encoding, Expect or Upgrade (so no body and no
    protocol switch), not CONNECT — else None, and h11 parses it as before. Two regex calls check
    and split every field line, where h11 runs a state machine and validates each field again. A
    differential test holds it to h11: whatever this accepts, h11 parses to the same request."""
    m = _SIMPLE_LINE_RE.match(buf)
    if m is None or end < m.end() + 2 or buf[end - 2:end] != b"\r\n":
        return None
    method = m.group(1)
    if method == b"CONNECT":
        return None
    fields = split_field_lines(buf, m.end(), end - 2)
    if fields is None:
        return None
    items: list[Triple] = []
    hosts = 0
    for name, value in fields:
        lname = name.lower()
        if lname in _NOT_SIMPLE:
            return None
        if lname == b"host":
            hosts += 1
        items.append((name, lname, value))
    if hosts != 1:
        return None
    return method, m.group(2), items


def check_raw_head(head: bytes | bytearray) -> HTTPError | None:
    """Checks h11 is lenient about (RFC 9112 §2.2, §5.2): bare LF line endings and obs-fold.

    ``head`` is the request head bytes up to and including the blank line. Leading empty lines
    (allowed before a request line, §2.2) are skipped.
    """
    start = 0
    while head.startswith(b"\r\n", start):
        start += 2
    body = head[start:]
    if body.count(b"\n") != body.count(b"\r\n"):
        return HTTPError(400, "bad request: bare LF line ending (RFC 9112 section 2.2)", kind="bare_lf")
    if b"\r\n " in body or b"\r\n\t" in body:
        return HTTPError(400, "bad request: obsolete line folding (RFC 9112 section 5.2)", kind="obs_fold")
    return None


def check_bare_cr(buf: bytes | bytearray, start: int = 0) -> HTTPError | None:
    """A CR not followed by LF (RFC 9112 §2.2: invalid). Checked on a head still incomplete, so a
    client ending lines with bare CRs is refused at once instead of waiting for the head timeout.
    ``start``: where the previous check of the same growing buffer stopped, minus 1."""
    if _BARE_CR_RE.search(buf, start):
        return HTTPError(400, "bad request: bare CR (RFC 9112 section 2.2)", kind="bare_cr")
    return None


def check_head_size(buf: bytes | bytearray, end: int, max_head_bytes: int) -> HTTPError | None:
    """h11 bounds only *incomplete* heads; a complete one that arrived in one read is bounded here."""
    if end <= max_head_bytes:
        return None
    line_end = buf.find(b"\n", 0, end)
    if line_end > max_head_bytes // 2 or line_end < 0:
        return HTTPError(414, "request line too long", kind="uri_too_long")
    return HTTPError(431, "request head too large", kind="head_too_large")


def check_request(method: bytes, target: bytes, http_version: bytes, headers: Iterable[tuple[bytes, ...]]
                  ) -> None:
    """Raise HTTPError for a request h11 accepted but a careful proxy must refuse. ``headers``:
    ``(name, value)`` pairs or h11's ``(raw_name, name, value)`` triples (names lowercase)."""
    if http_version not in (b"1.1", b"1.0"):
        raise HTTPError(505, f"HTTP/{http_version.decode('ascii', 'replace')} is not supported here; "
                        "use HTTP/1.1", kind="version")
    has_cl = has_te = False
    hosts = 0
    fields = 0
    host = b""
    for item in headers:
        name, value = item[-2], item[-1]
        fields += 1
        if name == b"content-length":
            has_cl = True
        elif name == b"transfer-encoding":
            has_te = True
        elif name == b"host":
            hosts += 1
            host = value
    if fields > MAX_HEADER_FIELDS:
        raise HTTPError(431, f"request has more than {MAX_HEADER_FIELDS} header fields",
                        kind="too_many_headers")
    if has_cl and has_te:
        raise HTTPError(400, "bad request: both Content-Length and Transfer-Encoding "
                        "(RFC 9112 section 6.3)", kind="smuggling")
    if has_te and http_version == b"1.0":
        raise HTTPError(400, "bad request: Transfer-Encoding in an HTTP/1.0 request "
                        "(RFC 9112 section 6.1)", kind="smuggling")
    if hosts > 1:
        raise HTTPError(400, "bad request: more than one Host header", kind="host")
    if http_version == b"1.1" and hosts == 0:
        raise HTTPError(400, "bad request: missing Host header", kind="host")
    if not _HOST_RE.match(host):
        raise HTTPError(400, "bad request: invalid Host header (RFC 9112 section 3.2)", kind="host")
    if method == b"CONNECT":
        raise HTTPError(405, "CONNECT is not supported on this listener", kind="method")
    if not (target.startswith(b"/") or target == b"*" or target.startswith((b"http://", b"https://"))):
        raise HTTPError(400, "bad request: request target must be an absolute path", kind="target")


def to_origin_form(target: bytes, items: list[Triple]) -> tuple[bytes, list[Triple]]:
    """An absolute-form target (``GET http://a.example/x``) for an origin: RFC 9112 §3.2.2 says the
    authority in the target wins over Host. Return the origin-form target and the headers with Host
    set to that authority, so the app never sees a Host that disagrees with the URI (a classic
    routing and cache-key confusion). Other targets come back unchanged."""
    if target[:1] == b"/":      # origin form, the common case: nothing to do
        return target, items
    lower = target[:8].lower()
    if not (lower.startswith(b"http://") or lower.startswith(b"https://")):
        return target, items
    rest = target.split(b"://", 1)[1]
    cut = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
    authority, path = rest[:cut], rest[cut:]
    if not authority or not _HOST_RE.match(authority):
        raise HTTPError(400, "bad request: invalid authority in the request target", kind="target")
    if not path.startswith(b"/"):
        path = b"/" + path
    out = [item for item in items if item[1] != b"host"]
    out.insert(0, (b"Host", b"host", authority))
    return path, out


def map_h11_error(status_hint: int, message: str, buffered: bytes | bytearray) -> HTTPError:
    """Turn h11's RemoteProtocolError into our answer: 431 for a large head (414 when the request
    line alone is too long), 400 for the rest (h11's 501 for odd Transfer-Encodings is a 400 here:
    RFC 9112 §6.1 says a server MAY answer 501, and smuggling defences close either way)."""
    if status_hint == 431:
        line_end = buffered.find(b"\n")
        if line_end < 0:
            return HTTPError(414, "request line too long", kind="uri_too_long")
        return HTTPError(431, "request head too large", kind="head_too_large")
    if "Transfer-Encoding" in message:
        return HTTPError(400, "bad request: unsupported Transfer-Encoding (only a final chunked)",
                         kind="transfer_encoding")
    return HTTPError(400, f"bad request: {message}", kind="malformed")


# ---------------------------------------------------------------------------- rewriting

@dataclass(frozen=True, slots=True)
class ForwardFacts:
    """Per-connection facts the header policy needs."""

    client_ip: bytes              # e.g. b"10.0.0.7"
    scheme: bytes = b"https"      # what the client used: https on TLS listeners, http on plain ones
    default_port: bytes = b"443"  # X-Forwarded-Port when Host carries no port
    client_cert_headers: tuple[tuple[bytes, bytes], ...] = ()   # XFCC / RFC 9440, set by mTLS


def split_tokens(value: bytes) -> list[bytes]:
    """The lowercased, non-empty tokens of one comma-separated field value."""
    if b"," not in value:          # one token (``keep-alive``, ``close``): no generator to run
        token = value.strip().lower()
        return [token] if token else []
    return [t for t in (part.strip().lower() for part in value.split(b",")) if t]


def comma_tokens(full_items: Iterable[Triple], name: bytes) -> list[bytes]:
    """The lowercased comma-separated tokens of every ``name`` field, in order (h11's
    ``get_comma_header``)."""
    out: list[bytes] = []
    for _, n, value in full_items:
        if n == name:
            out.extend(split_tokens(value))
    return out


def has_token(full_items: Iterable[Triple], name: bytes, token: bytes) -> bool:
    """Whether the comma-separated header ``name`` (lowercase) lists ``token`` (lowercase)."""
    for _, n, value in full_items:
        if n == name and token in value.lower() and token in split_tokens(value):
            return True
    return False


_RID_PREFIX = os.urandom(8).hex().encode()   # per process: ids stay unique across workers and restarts
_rid_counter = itertools.count(int.from_bytes(os.urandom(4), "big"))


def new_request_id() -> bytes:
    """32 hex characters: a random per-process prefix and a counter (no getrandom per request)."""
    return b"%s%016x" % (_RID_PREFIX, next(_rid_counter) & 0xFFFFFFFFFFFFFFFF)


def _port_of(host: bytes) -> bytes | None:
    if host.startswith(b"["):
        end = host.find(b"]")
        rest = host[end + 1:] if end >= 0 else b""
        return rest[1:] if rest.startswith(b":") and rest[1:].isdigit() else None
    _, sep, port = host.rpartition(b":")
    return port if sep and port.isdigit() else None


def rewrite_request(full_items: list[Triple], facts: ForwardFacts, *, host_override: bytes | None = None,
                    expect_continue: bool = False, te_trailers: bool = False
                    ) -> tuple[list[Triple], bytes, bytes | None]:
    """Headers for the upstream leg, the request id, and the Upgrade value (when upgrading).

    - hop-by-hop headers go, and so do the headers named in ``Connection``; ``Upgrade`` survives
      (with ``Connection: upgrade``) when the request asks to switch protocols;
    - client-identity headers go, always; mTLS facts are added from ``facts``;
    - ``X-Forwarded-For`` gets the client address appended; ``X-Forwarded-Proto/Host/Port`` are set;
    - ``X-Request-Id`` is kept when sane, otherwise generated;
    - ``Host`` is kept, or replaced by ``host_override`` (outbound: the peer's authority);
    - ``Expect`` is dropped, unless ``expect_continue``: then ``Expect: 100-continue`` goes to the app,
      whose own ``100`` (or early final answer) comes back to the client;
    - ``TE`` is hop-by-hop; ``te_trailers`` sends ``TE: trailers`` on (the client takes trailers, and
      some apps, gRPC among them, send them only then).
    """
    tokens: set[bytes] = set()
    upgrade: bytes | None = None
    host = b""
    xff = b""
    request_id = b""
    out: list[Triple] = []
    kept_host = False
    for item in full_items:        # one pass: read what the rewrite needs, keep what goes on
        name = item[1]
        if name in _NOT_FORWARDED:
            if name == b"connection":
                tokens.update(split_tokens(item[2]))
            elif name == b"upgrade":
                upgrade = item[2]
            elif name == b"x-forwarded-for":
                xff = xff + b", " + item[2] if xff else item[2]
            elif name == b"x-request-id":
                request_id = item[2]
            continue
        if name == b"host":
            host = item[2]
            if host_override is not None:
                continue
            kept_host = True
        out.append(item)
    if not tokens <= HOP_BY_HOP:   # Connection names more fields (RFC 9110 §7.6.1): they go too
        named = tokens - HOP_BY_HOP
        out = [item for item in out if item[1] not in named]
        kept_host = kept_host and b"host" not in named
    if b"upgrade" not in tokens:
        upgrade = None
    if not _REQUEST_ID_RE.match(request_id):
        request_id = new_request_id()
    if host_override is not None:
        out.insert(0, (b"Host", b"host", host_override))
    elif not kept_host:
        # an HTTP/1.0 client may omit Host; the upstream leg is HTTP/1.1, which needs one:
        # empty, as RFC 9112 §3.2 says for a target without an authority
        out.insert(0, (b"Host", b"host", b""))
    if expect_continue:
        out.append((b"Expect", b"expect", b"100-continue"))
    if te_trailers:
        out.append((b"TE", b"te", b"trailers"))
    if upgrade is not None:
        out.append((b"Connection", b"connection", b"upgrade"))
        out.append((b"Upgrade", b"upgrade", upgrade))
    out.append((b"X-Forwarded-For", b"x-forwarded-for",
                xff + b", " + facts.client_ip if xff else facts.client_ip))
    out.append((b"X-Forwarded-Proto", b"x-forwarded-proto", facts.scheme))
    if host:
        out.append((b"X-Forwarded-Host", b"x-forwarded-host", host))
    out.append((b"X-Forwarded-Port", b"x-forwarded-port", _port_of(host) or facts.default_port))
    out.append((b"X-Request-Id", b"x-request-id", request_id))
    for name, value in facts.client_cert_headers:
        out.append((name, name.lower(), value))
    return out, request_id, upgrade


def rewrite_response(full_items: list[Triple], *, upgrade: bool = False) -> list[Triple]:
    """Headers for the client leg: hop-by-hop removed (kept for a 101 that switches protocols)."""
    tokens = set(comma_tokens(full_items, b"connection"))
    if upgrade:
        return [i for i in full_items if i[1] not in tokens or i[1] in (b"upgrade",)
                if i[1] not in (b"keep-alive", b"proxy-connection", b"transfer-encoding")]
    drop = HOP_BY_HOP if tokens <= HOP_BY_HOP else HOP_BY_HOP | tokens   # "keep-alive", "close"
    return [i for i in full_items if i[1] not in drop]


def header_value(full_items: Iterable[Triple], name: bytes) -> bytes | None:
    for _raw, n, value in full_items:
        if n == name:
            return value
    return None
