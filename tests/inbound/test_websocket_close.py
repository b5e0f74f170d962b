"""A WebSocket's normal close through the proxy is as prompt as without it (issue 15, item 3).

RFC 6455 §7.1.1: after the closing handshake the *server* closes the TCP connection first and the
client waits for that close (python `websockets` up to its close_timeout, Chromium 2 s). So when the
app closes its side, tlsproxy must close the client's side at once (close_notify, then FIN), not wait
for the client to close first. Real clients through a real tlsproxy in front of a real WebSocket app
(`websockets`' threaded server): the python `websockets` client here, headless Chromium in
test_websocket_chromium.py.
"""

from __future__ import annotations

import ssl
import time

import pytest
from websockets.exceptions import ConnectionClosedOK
from websockets.sync.client import connect

from tests.support import running_proxy, settings_for, websockets_app

PROMPT_S = 0.1        # a normal close through the proxy ends within this (direct: ~2 ms)
CLOSE_TIMEOUT_S = 10  # the client's own patience: a stalled close would show as seconds


def _handler(ws) -> None:
    """Echo; "server-close" makes the app start the closing handshake (code 1000)."""
    for message in ws:
        if message == "server-close":
            ws.close(1000, "bye")
            return
        ws.send(f"echo:{message}")


def ws_app():
    return websockets_app(_handler, close_timeout=CLOSE_TIMEOUT_S)


@pytest.fixture(scope="module")
def proxied(tmp_path_factory):
    from tests.support import make_pki

    pki = make_pki(tmp_path_factory.mktemp("pki"))
    # No TLS 1.3 session tickets: the sync `websockets` client reads on one thread and writes on
    # another over one SSLSocket, and when the tickets arrive while it sends its upgrade request,
    # the request can be lost inside the client — strace showed it never written, and tlsproxy
    # then closing the silent connection at its first-byte timeout (about one run in five).
    # Closing is what this module tests; tickets have their own tests (tests/tls).
    with ws_app() as app_port, running_proxy(settings_for(pki, app_port, tls_session_tickets=0)) as proxy:
        ctx = ssl.create_default_context(cafile=str(pki.ca_file))
        yield {"proxy": (f"wss://localhost:{proxy.port}/ws", ctx),
               "direct": (f"ws://127.0.0.1:{app_port}/ws", None)}


def _client(url: str, ctx):
    kw = {"ssl": ctx} if ctx is not None else {}
    return connect(url, open_timeout=5, close_timeout=CLOSE_TIMEOUT_S, **kw)


def _client_closes(url: str, ctx) -> float:
    with _client(url, ctx) as ws:
        ws.send("hello")
        assert ws.recv(timeout=5) == "echo:hello"
        t0 = time.monotonic()
        ws.close()
        took = time.monotonic() - t0
        assert ws.close_code == 1000
    return took


def _server_closes(url: str, ctx) -> float:
    with _client(url, ctx) as ws:
        ws.send("hello")
        assert ws.recv(timeout=5) == "echo:hello"
        t0 = time.monotonic()
        ws.send("server-close")
        with pytest.raises(ConnectionClosedOK):
            ws.recv(timeout=CLOSE_TIMEOUT_S + 5)
        ws.close()
        took = time.monotonic() - t0
        assert (ws.close_code, ws.close_reason) == (1000, "bye")
    return took


@pytest.mark.parametrize("how", [_client_closes, _server_closes], ids=["client_closes", "server_closes"])
def test_close_returns_promptly_through_the_proxy(proxied, how):
    direct = min(how(*proxied["direct"]) for _ in range(2))
    through = [how(*proxied["proxy"]) for _ in range(3)]
    assert direct < PROMPT_S, direct                    # the app itself closes promptly
    # the median of three: one close slowed by the machine (a browser starting beside it) is not
    # the bug this pins, which made every close wait out the close timeout
    assert sorted(through)[1] < PROMPT_S, (through, direct)


def test_messages_still_flow_both_ways_before_the_close(proxied):
    url, ctx = proxied["proxy"]
    with _client(url, ctx) as ws:
        for i in range(20):
            ws.send(f"m{i}")
            assert ws.recv(timeout=5) == f"echo:m{i}"
