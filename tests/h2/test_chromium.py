"""Headless Chromium loads a page over HTTP/2 and its WebSocket still round-trips.

The proxy does not send SETTINGS_ENABLE_CONNECT_PROTOCOL (RFC 8441), so Chromium opens a separate
HTTP/1.1 connection for the WebSocket (ALPN http/1.1) and the engine's 101 relay carries it
(docs/http2.md). The browser is driven over the DevTools protocol, as in
tests/inbound/test_websocket_chromium.py.
"""

from __future__ import annotations

import http
import json
import time

import pytest
from websockets.sync.client import connect

from tests.inbound.test_websocket_chromium import DevTools, chromium
from tests.support import running_proxy, settings_for, websockets_app

PAGE = "<!doctype html><title>h2</title><p>over HTTP/2</p>"


def _echo(ws) -> None:
    for message in ws:
        ws.send(f"echo:{message}")


def _page(connection, request):
    """Plain GETs get a small page; a WebSocket handshake (Upgrade) goes to the echo handler."""
    if request.headers.get("Upgrade", "").lower() != "websocket":
        response = connection.respond(http.HTTPStatus.OK, PAGE)
        response.headers["Content-Type"] = "text/html; charset=utf-8"
        return response
    return None


def page_and_ws_app():
    return websockets_app(_echo, process_request=_page)


ROUND_TRIP = """
new Promise((resolve) => {
  const ws = new WebSocket(%(url)s);
  const timer = setTimeout(() => resolve(JSON.stringify({error: "no echo within 10 s"})), 10000);
  ws.onopen = () => ws.send("hello");
  ws.onmessage = (e) => { clearTimeout(timer); ws.close(1000); resolve(JSON.stringify({echo: e.data})); };
  ws.onerror = () => { clearTimeout(timer); resolve(JSON.stringify({error: "websocket error"})); };
})
"""


def test_chromium_loads_a_page_over_h2_and_its_websocket_round_trips(tmp_path, pki):
    with page_and_ws_app() as app_port, running_proxy(settings_for(pki, app_port)) as proxy, \
            chromium(tmp_path / "profile") as devtools_url, \
            connect(devtools_url, open_timeout=10, max_size=None) as ws:
        tools = DevTools(ws)
        tools.attach_to_page()
        origin = f"https://localhost:{proxy.port}"
        tools.call("Page.navigate", {"url": f"{origin}/page"})
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            state = tools.evaluate("document.readyState + ' ' + location.href")
            if state == f"complete {origin}/page":
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"the page did not load: {state}")
        assert tools.evaluate("document.title") == "h2"
        assert tools.evaluate("performance.getEntries()[0].nextHopProtocol") == "h2"
        out = json.loads(tools.evaluate(ROUND_TRIP % {"url": json.dumps(f"wss://localhost:{proxy.port}/ws")}))
        assert out == {"echo": "echo:hello"}, out
