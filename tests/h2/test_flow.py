"""Flow control with backpressure: a slow reader (the client, or the app) slows its own stream only."""

from __future__ import annotations

import time

import h2.events

from tests.h2.helpers import H2Client
from tests.hostile.helpers import ok_response, scripted_upstream
from tests.support import running_proxy, settings_for

MiB = 1 << 20
SLOW_BODY = 32 * MiB          # beyond what loopback socket buffers absorb


def test_a_client_not_reading_one_stream_does_not_slow_the_others(pki, app):
    with running_proxy(settings_for(pki, app.port)) as proxy:
        client = H2Client(proxy.port, pki)
        try:
            stuck = client.headers(f"/bytes/{32 * MiB}")   # its window is never reopened below
            t0 = time.monotonic()
            got = 0
            while got < 50 * 1024 and time.monotonic() - t0 < 10:   # the stream's first window arrives
                for ev in client.events(1) or []:
                    if isinstance(ev, h2.events.DataReceived) and ev.stream_id == stuck:
                        got += len(ev.data)
                        # the connection's window only: the stream's stays shut
                        client.conn.increment_flow_control_window(ev.flow_controlled_length)
                        client.flush()
            assert got > 0
            t0 = time.monotonic()
            for i in range(5):                          # the same connection keeps answering
                status, body, _ = client.get(f"/other/{i}", timeout=5)
                assert status == 200 and f"/other/{i}".encode() in body
            assert time.monotonic() - t0 < 3
        finally:
            client.close()


def test_an_app_reading_slowly_slows_its_own_stream_only(pki):
    def behaviour(conn) -> None:
        conn.sock.settimeout(10)
        head = bytearray()
        while b"\r\n\r\n" not in head:
            data = conn.sock.recv(65536)
            if not data:
                return
            head += data
        if head.startswith(b"POST /slow "):
            time.sleep(3)                              # reads nothing for 3 s
            conn.received[:] = b""
            total = len(head.partition(b"\r\n\r\n")[2])
            while total < SLOW_BODY:
                data = conn.sock.recv(65536)
                if not data:
                    return
                total += len(data)
            conn.sock.sendall(ok_response(b"slow done"))
        else:
            conn.sock.sendall(ok_response(b"fast"))

    with scripted_upstream(behaviour) as up, running_proxy(settings_for(pki, up.port)) as proxy:
        client = H2Client(proxy.port, pki)
        try:
            slow = client.headers("/slow", "POST", [(b"content-length", b"%d" % SLOW_BODY)], end=False)
            payload = b"s" * (SLOW_BODY)
            sent = 0
            t0 = time.monotonic()
            # push what the windows allow; the proxy reopens the stream's only as the app reads
            while sent < len(payload) and time.monotonic() - t0 < 2.0:
                room = min(client.conn.local_flow_control_window(slow), client.conn.max_outbound_frame_size)
                if room <= 0:
                    client.events(0.1)
                    continue
                client.conn.send_data(slow, payload[sent:sent + room])
                sent += room
                client.flush()
            # the app's slowness reached this stream: what it took is the stream window and the
            # socket buffers (about 4 MiB on loopback), not the body (32 MiB)
            assert sent < 12 * MiB, sent
            t1 = time.monotonic()
            fast = client.get("/fast", timeout=5)       # another stream, same connection
            assert fast[0] == 200 and fast[1] == b"fast"
            assert time.monotonic() - t1 < 1.5
        finally:
            client.close()


def test_a_trickling_request_body_is_cut_by_the_minimum_rate(pki, app):
    settings = settings_for(pki, app.port, min_body_rate=100, min_body_rate_grace_s=2.0)
    with running_proxy(settings) as proxy:
        client = H2Client(proxy.port, pki)
        try:
            sid = client.headers("/trickle", "POST", [(b"content-length", b"100000")], end=False)
            t0 = time.monotonic()
            status = 0
            while not status and time.monotonic() - t0 < 10:
                client.conn.send_data(sid, b"x")      # a byte every 0.5 s: never idle, far too slow
                client.flush()
                for ev in client.events(0.5) or []:
                    if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                        status = int(dict(ev.headers)[b":status"])
            elapsed = time.monotonic() - t0
            assert status == 408 and 1.5 <= elapsed <= 5, (status, elapsed)
            assert client.get("/after")[0] == 200             # the connection lives on
        finally:
            client.close()
