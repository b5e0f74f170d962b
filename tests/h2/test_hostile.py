"""Hostile HTTP/2 clients, written on the ``h2``/``hyperframe`` libraries, against a real proxy process.

Each attack is refused or bounded, the proxy's memory stays bounded, and a well-behaved client on
another connection keeps getting answers while it runs. Every loop is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time

import h2.errors
import h2.events
import h2.settings
import hpack
import pytest
from hyperframe.frame import ContinuationFrame, DataFrame, HeadersFrame, PingFrame, SettingsFrame

from tests.h2.helpers import H2Client, proxy_process
from tests.support import app_server, make_pki

MiB = 1 << 20
RSS_GROWTH_KIB = 64 * 1024          # what one attack may add to the proxy's resident memory, at most


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def proxy(pki):
    with app_server() as app, proxy_process(pki, app.url, "--body-timeout", "3s", "--idle-timeout", "3s",
                                            "--access-log", "off") as p:
        H2Client(p.port, pki).get("/warmup")
        yield p


class Bystander:
    """A well-behaved HTTP/2 client on its own connection, asking every 50 ms during an attack."""

    def __init__(self, port: int, pki) -> None:
        self.port, self.pki = port, pki
        self.ok = self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        client = H2Client(self.port, self.pki)
        try:
            while not self._stop.is_set():
                status, _, _ = client.get("/bystander", timeout=5)
                if status == 200:
                    self.ok += 1
                else:
                    self.failed += 1
                time.sleep(0.05)
        finally:
            client.close()

    def __enter__(self) -> Bystander:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(15)


@contextlib.contextmanager
def attack(proxy, pki):
    """Runs a bystander beside the attack and checks it was served and memory stayed bounded."""
    before = proxy.rss_kib()
    with Bystander(proxy.port, pki) as bystander:
        _wait_until(lambda: bystander.ok >= 1, 10)     # served before the attack starts
        during = bystander.ok
        yield
        _wait_until(lambda: bystander.ok > during, 5)  # and served again, on its own connection, after it
    assert bystander.ok > during >= 1 and bystander.failed == 0, (during, bystander.ok, bystander.failed)
    assert proxy.rss_kib() - before < RSS_GROWTH_KIB


def _wait_until(predicate, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.02)


def _goaway(client: H2Client, timeout: float = 10) -> h2.events.ConnectionTerminated | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = client.events(max(0.01, deadline - time.monotonic()))
        if events is None:
            return None
        for ev in events:
            if isinstance(ev, h2.events.ConnectionTerminated):
                return ev
    return None


def _raw(port: int, pki) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    ctx.set_alpn_protocols(["h2"])
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock = ctx.wrap_socket(raw, server_hostname="localhost")
    sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + SettingsFrame(0).serialize())
    return sock


def _read_goaway(sock: ssl.SSLSocket, timeout: float = 10) -> int | None:
    """The error code of the server's GOAWAY on a raw connection, or None when none came."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.data_to_send()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except (ssl.SSLError, OSError):
            return None
        if not data:
            return None
        try:
            events = conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            continue
        for ev in events:
            if isinstance(ev, h2.events.ConnectionTerminated):
                return ev.error_code
    return None


def _defence(proxy, name: str) -> float:
    for line in proxy.metrics().splitlines():
        if line.startswith("tlsproxy_h2_defences_total{") and f'defence="{name}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_rapid_reset_gets_goaway_enhance_your_calm(proxy, pki):
    with attack(proxy, pki):
        client = H2Client(proxy.port, pki)
        try:
            for _ in range(300):                      # 300 open-and-reset in well under a second
                sid = client.headers("/slow")
                client.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
            client.flush()
            ev = _goaway(client)
        except OSError:
            ev = None
        finally:
            client.close()
    assert ev is not None and ev.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert _defence(proxy, "rapid_reset") >= 1


def test_continuation_flood_is_refused(proxy, pki):
    with attack(proxy, pki):
        sock = _raw(proxy.port, pki)
        enc = hpack.Encoder()
        block = enc.encode([(":method", "GET"), (":path", "/"), (":scheme", "https"), (":authority", "x")])
        frames = HeadersFrame(1, block).serialize()   # no END_HEADERS: CONTINUATION frames follow
        junk = b"\x00" * 16384
        try:
            for _ in range(200):                      # 3 MiB of header block, never ended
                frames += ContinuationFrame(1, junk).serialize()
                if len(frames) > 256 * 1024:
                    sock.sendall(frames)
                    frames = b""
        except OSError:
            pass                                        # refused before we finished
        code = _read_goaway(sock)
        sock.close()
    assert code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert _defence(proxy, "header_block") >= 1


def test_hpack_bomb_is_refused(proxy, pki):
    with attack(proxy, pki):
        client = H2Client(proxy.port, pki)
        try:
            # one 4 KiB field indexed once, then referenced 2,000 times: a small block, 8 MB decoded
            big = (b"x-bomb", b"b" * 4000)
            client.headers("/bomb", extra=[big])
            client.headers("/bomb", extra=[big] * 2000)
            ev = _goaway(client)
        except OSError:
            ev = None
        finally:
            client.close()
    assert ev is not None and ev.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert _defence(proxy, "header_list") >= 1


@pytest.mark.parametrize("kind", ["settings", "ping", "empty_data"])
def test_control_frame_floods_get_goaway(proxy, pki, kind):
    with attack(proxy, pki):
        sock = _raw(proxy.port, pki)
        if kind == "settings":
            frame = SettingsFrame(0, {h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 10}).serialize()
        elif kind == "ping":
            frame = PingFrame(0, b"12345678").serialize()
        else:
            enc = hpack.Encoder()
            block = enc.encode([(":method", "POST"), (":path", "/"), (":scheme", "https"),
                                (":authority", "x")])
            sock.sendall(HeadersFrame(1, block, flags=["END_HEADERS"]).serialize())
            frame = DataFrame(1, b"").serialize()
        try:
            sock.sendall(frame * 1000)               # 1,000 frames at once
        except OSError:
            pass
        code = _read_goaway(sock)
        sock.close()
    assert code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, code
    name = {"settings": "settings_flood", "ping": "ping_flood", "empty_data": "empty_data_flood"}[kind]
    assert _defence(proxy, name) >= 1


def test_a_thousand_streams_at_once_are_refused(proxy, pki):
    before = _defence(proxy, "concurrent_streams")
    with attack(proxy, pki):
        client = H2Client(proxy.port, pki)
        answered, goaway = 0, None
        try:
            # sent at once, ignoring the server's SETTINGS_MAX_CONCURRENT_STREAMS (100)
            for _ in range(1000):
                sid = client.conn.get_next_available_stream_id()
                client.conn.send_headers(sid, [(b":method", b"GET"), (b":path", b"/sleep/0.5"),
                                               (b":scheme", b"https"), (b":authority", b"localhost")],
                                         end_stream=True)
            client.flush()
            deadline = time.monotonic() + 20
            while goaway is None and time.monotonic() < deadline:
                events = client.events(5)
                if events is None:
                    break
                for ev in events:
                    if isinstance(ev, h2.events.ResponseReceived):
                        answered += 1
                    elif isinstance(ev, h2.events.ConnectionTerminated):
                        goaway = ev
        except OSError:
            pass
        finally:
            client.close()
    assert goaway is not None and goaway.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR, goaway
    assert answered <= 100
    assert _defence(proxy, "concurrent_streams") >= before + 1


def test_zero_window_reader_is_cut_after_the_body_timeout(proxy, pki):
    with attack(proxy, pki):
        client = H2Client(proxy.port, pki, settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
        try:
            t0 = time.monotonic()
            sid = client.headers(f"/bytes/{64 * MiB}")
            reset = None
            while reset is None and time.monotonic() - t0 < 15:
                events = client.events(1)
                if events is None:
                    break
                for ev in events:
                    if isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                        reset = time.monotonic() - t0
        finally:
            client.close()
    assert reset is not None and 2.5 <= reset <= 8, reset      # --body-timeout 3s (one watchdog tick late)


def test_idle_connection_gets_goaway_and_closes(proxy, pki):
    client = H2Client(proxy.port, pki)
    try:
        t0 = time.monotonic()
        ev = _goaway(client, 10)
        elapsed = time.monotonic() - t0
    finally:
        client.close()
    assert ev is not None and ev.error_code == h2.errors.ErrorCodes.NO_ERROR
    assert 2.5 <= elapsed <= 6, elapsed                            # --idle-timeout 3s
