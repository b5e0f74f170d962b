"""Drain over HTTP/2: GOAWAY with the last stream id at once, the streams in flight finish.

The client reads frames itself (hyperframe + hpack): the ``h2`` library, as a client, closes its
state machine on any GOAWAY and would refuse the very response a graceful drain lets through.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time

import hpack
from hyperframe.frame import DataFrame, Frame, GoAwayFrame, HeadersFrame, SettingsFrame

from tests.support import ProxyThread, settings_for
from tlsproxy.app import App


def _frames(sock: ssl.SSLSocket, deadline: float):
    buf = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except (ssl.SSLError, OSError):
            return
        if not data:
            return
        buf += data
        while len(buf) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(buf[:9]))
            if len(buf) < 9 + length:
                break
            frame.parse_body(memoryview(buf[9:9 + length]))
            buf = buf[9 + length:]
            yield frame


def test_drain_sends_goaway_and_lets_the_stream_in_flight_finish(pki, app):
    proxy = ProxyThread(App(settings_for(pki, app.port, drain_timeout_s=10.0))).start()
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    ctx.set_alpn_protocols(["h2"])
    sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", proxy.port), timeout=10),
                           server_hostname="localhost")
    stopper = threading.Thread(target=proxy.stop, daemon=True)
    goaway, status, body, ended = None, None, b"", False
    try:
        block = hpack.Encoder().encode([(":method", "GET"), (":path", "/sleep/1.5"), (":scheme", "https"),
                                        (":authority", "localhost")])
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + SettingsFrame(0).serialize()
                     + HeadersFrame(1, block, flags=["END_HEADERS", "END_STREAM"]).serialize())
        time.sleep(0.3)                                 # the stream is in flight
        t0 = time.monotonic()
        stopper.start()
        decoder = hpack.Decoder()
        for frame in _frames(sock, t0 + 10):
            if isinstance(frame, GoAwayFrame):
                goaway = (frame.last_stream_id, frame.error_code, time.monotonic() - t0)
            elif isinstance(frame, HeadersFrame) and frame.stream_id == 1:
                status = dict(decoder.decode(frame.data))[":status"]
                ended = ended or "END_STREAM" in frame.flags
            elif isinstance(frame, DataFrame) and frame.stream_id == 1:
                body += frame.data
                ended = ended or "END_STREAM" in frame.flags
            if ended:
                break
    finally:
        sock.close()
        stopper.join(20)
    assert goaway is not None
    last_id, code, after = goaway
    assert (last_id, code) == (1, 0)
    assert after < 1.0                                  # at once, not when the stream ends
    assert status == "200" and ended and b"/sleep/1.5" in body
