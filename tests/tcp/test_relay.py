"""tcp mode end to end with raw bytes: a large bidirectional transfer checked by hash, half-close
both ways, identity refusal, idle timeout, maximum lifetime, drain, upstream down, PROXY v2.

The proxy runs in its own thread (tests.support.ProxyThread); the upstream and the TLS client run
on the test's trio loop (the client is tlsproxy's own TLSStream used as a client, so it can send and
receive at once)."""

from __future__ import annotations

import functools
import hashlib
import os
import socket
import time

import pytest
import trio

from tests.support import ProxyThread
from tests.tcp import helpers as h
from tlsproxy.app import App

MiB = 1 << 20


async def start_upstream(nursery: trio.Nursery, handler) -> int:
    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


async def echo(stream: trio.SocketStream) -> None:
    """Echo until the client's EOF, then end our side too."""
    try:
        async for data in stream:
            await stream.send_all(data)
    except trio.BrokenResourceError:
        pass
    await stream.aclose()


async def running(settings) -> ProxyThread:
    return await trio.to_thread.run_sync(lambda: ProxyThread(App(settings)).start())


async def stop(proxy: ProxyThread) -> None:
    await trio.to_thread.run_sync(proxy.stop)


async def test_large_bidirectional_transfer_is_byte_exact(pki, tmp_path):
    size = 24 * MiB
    payload = os.urandom(size)
    async with trio.open_nursery() as nursery:
        port = await start_upstream(nursery, echo)
        proxy = await running(h.tcp_settings(pki, port, drain_timeout_s=2.0))
        try:
            stream = await h.tls_open(proxy.port, h.client_ctx(pki))
            got = hashlib.sha256()
            received = 0

            async def send() -> None:
                view = memoryview(payload)
                for i in range(0, size, 256 * 1024):     # many writes, interleaved with the echo
                    await stream.send_all(view[i:i + 256 * 1024])

            async def receive() -> None:
                nonlocal received
                while received < size:
                    data = await stream.receive_some()
                    assert data, f"EOF after {received} bytes"
                    got.update(data)
                    received += len(data)

            with trio.fail_after(60):
                async with trio.open_nursery() as inner:
                    inner.start_soon(send)
                    inner.start_soon(receive)
            assert got.hexdigest() == hashlib.sha256(payload).hexdigest()
            h.send_close_notify(stream)
            assert await h.read_all(stream) == b""         # the echo ends after our end
            stream.close_now()
            labels = {"listener": "inbound", "protocol": "tcp"}
            assert h.metric(proxy, "tlsproxy_received_bytes_total", **labels) == size
            assert h.metric(proxy, "tlsproxy_sent_bytes_total", **labels) == size
            assert await wait_metric(proxy, "tlsproxy_relays_ended_total", listener="inbound",
                                     ended="client_closed")
        finally:
            await stop(proxy)
        nursery.cancel_scope.cancel()


async def until(pred, timeout: float = 5) -> bool:
    """Poll ``pred`` (state owned by another thread) every 20 ms, up to ``timeout``."""
    with trio.move_on_after(timeout):
        while not pred():  # noqa: ASYNC110 - the proxy thread cannot set our trio.Event
            await trio.sleep(0.02)
    return bool(pred())


async def wait_metric(proxy, name, timeout: float = 5, **labels) -> float:
    await until(lambda: h.metric(proxy, name, **labels), timeout)
    return h.metric(proxy, name, **labels)


@pytest.mark.parametrize("how", ["close_notify", "tcp_fin"])
async def test_client_half_close_upstream_reply_still_arrives(pki, how):
    """The client ends its sending side after the request — the TLS way (close_notify) or with a bare
    TCP FIN under the TLS session; the upstream answers only after it saw EOF (like a one-shot
    protocol); the answer still reaches the client."""
    seen = []

    async def answer_after_eof(stream: trio.SocketStream) -> None:
        data = b""
        async for chunk in stream:
            data += chunk
        seen.append(data)
        await trio.sleep(0.3)       # the reply comes well after the client's half-close
        await stream.send_all(b"reply to " + data)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        port = await start_upstream(nursery, answer_after_eof)
        proxy = await running(h.tcp_settings(pki, port, drain_timeout_s=2.0, tcp_close_timeout_s=5.0))
        try:
            stream = await h.tls_open(proxy.port, h.client_ctx(pki))
            await stream.send_all(b"question")
            if how == "close_notify":
                h.send_close_notify(stream)
            else:
                raw = socket.socket(fileno=stream.fileno())
                raw.shutdown(socket.SHUT_WR)
                raw.detach()
            assert await h.read_all(stream) == b"reply to question"
            stream.close_now()
            assert seen == [b"question"]
            assert await wait_metric(proxy, "tlsproxy_relays_ended_total", listener="inbound",
                                     ended="client_closed")
        finally:
            await stop(proxy)
        nursery.cancel_scope.cancel()


async def test_upstream_half_close_client_keeps_sending_until_close_timeout(pki):
    """The upstream ends first (FIN) but keeps reading: the client still gets --tcp-close-timeout to
    send; after it, both sides are closed."""
    late = []

    async def bye_then_listen(stream: trio.SocketStream) -> None:
        await stream.send_all(b"bye")
        await stream.send_eof()
        try:
            async for chunk in stream:
                late.append(chunk)
        except trio.BrokenResourceError:
            pass
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        port = await start_upstream(nursery, bye_then_listen)
        proxy = await running(h.tcp_settings(pki, port, drain_timeout_s=2.0, tcp_close_timeout_s=1.5))
        try:
            stream = await h.tls_open(proxy.port, h.client_ctx(pki))
            with trio.fail_after(5):
                assert await stream.receive_some() == b"bye"
            await trio.sleep(0.3)
            await stream.send_all(b"still here")        # after the upstream's FIN: still delivered
            t0 = time.monotonic()
            assert await h.read_all(stream) == b""     # then the close timeout ends it
            waited = time.monotonic() - t0
            assert 0.5 < waited < 4, waited
            stream.close_now()
            assert await until(lambda: b"".join(late) == b"still here")
            assert await wait_metric(proxy, "tlsproxy_relays_ended_total", listener="inbound",
                                     ended="upstream_closed")
        finally:
            await stop(proxy)
        nursery.cancel_scope.cancel()


async def test_identity_outside_rules_is_closed_and_app_sees_nothing(pki, tmp_path):
    accepted = []

    async def record(stream: trio.SocketStream) -> None:
        accepted.append(1)
        await stream.aclose()

    intruder = h.client_cert(pki, "intruder", "spiffe://cluster.local/ns/default/sa/intruder")
    envoy = h.client_cert(pki)
    async with trio.open_nursery() as nursery:
        port = await start_upstream(nursery, record)
        proxy = await running(h.tcp_settings(pki, port, drain_timeout_s=2.0, client_ca=pki.ca_file,
                                             allow_uri=(h.ENVOY_ID,)))
        try:
            stream = await h.tls_open(proxy.port, h.client_ctx(pki, intruder, tmp=tmp_path))
            try:
                await stream.send_all(b"let me in")
            except trio.BrokenResourceError:
                pass
            assert await h.read_all(stream) == b""       # closed, nothing relayed
            stream.close_now()
            assert await wait_metric(proxy, "tlsproxy_relays_ended_total", listener="inbound",
                                     ended="refused")
            assert accepted == []
            # the allowed identity gets through to the same upstream
            ok = await h.tls_open(proxy.port, h.client_ctx(pki, envoy, tmp=tmp_path))
            assert await until(lambda: accepted)
            ok.close_now()
        finally:
            await stop(proxy)
        nursery.cancel_scope.cancel()


async def test_idle_timeout_and_max_lifetime(pki):
    async with trio.open_nursery() as nursery:
        port = await start_upstream(nursery, echo)
        proxy = await running(h.tcp_settings(pki, port, drain_timeout_s=2.0, tcp_idle_timeout_s=0.5))
        try:
            stream = await h.tls_open(proxy.port, h.client_ctx(pki))
            t0 = time.monotonic()
            assert await h.read_all(stream) == b""
            assert 0.3 < time.monotonic() - t0 < 3
            stream.close_now()
            assert await wait_metric(proxy, "tlsproxy_relays_ended_total", listener="inbound",
                                     ended="idle_timeout")
        finally:
            await stop(proxy)
        proxy = await running(h.tcp_settings(pki, port, drain_timeout_s=2.0, tcp_max_lifetime_s=1.0))
        try:
            stream = await h.tls_open(proxy.port, h.client_ctx(pki))
            t0 = time.monotonic()
            closed = False
            with trio.fail_after(5):
                while not closed:               # busy the whole time: the lifetime still ends it
                    try:
                        await stream.send_all(b"ping")
                        data = await stream.receive_some()
                    except trio.BrokenResourceError:
                        data = b""
                    closed = not data
                    await trio.sleep(0.05)
            assert 0.8 < time.monotonic() - t0 < 3
            stream.close_now()
            assert await wait_metric(proxy, "tlsproxy_relays_ended_total", listener="inbound",
                                     ended="lifetime")
        finally:
            await stop(proxy)
        nursery.cancel_scope.cancel()


async def test_drain_waits_for_relays_up_to_the_drain_timeout_then_closes_them(pki):
    async with trio.open_nursery() as nursery:
        port = await start_upstream(nursery, echo)
        proxy = await running(h.tcp_settings(pki, port, drain_timeout_s=1.5))
        stream = await h.tls_open(proxy.port, h.client_ctx(pki))
        await stream.send_all(b"x")
        with trio.fail_after(5):
            assert await stream.receive_some() == b"x"
        t0 = time.monotonic()
        async with trio.open_nursery() as inner:
            inner.start_soon(stop, proxy)
            # the relay keeps working during the drain…
            await trio.sleep(0.5)
            await stream.send_all(b"during drain")
            with trio.fail_after(5):
                assert await stream.receive_some() == b"during drain"
            # …until the drain timeout cuts it
            assert await h.read_all(stream) == b""
            cut = time.monotonic() - t0
        assert 1.2 < cut < 4, cut
        stream.close_now()
        assert h.metric(proxy, "tlsproxy_relays_ended_total", listener="inbound", ended="drain") == 1
        nursery.cancel_scope.cancel()


async def test_upstream_down_closes_the_client(pki):
    with trio.socket.socket() as s:          # a port nobody listens on
        await s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proxy = await running(h.tcp_settings(pki, port, drain_timeout_s=2.0))
    try:
        stream = await h.tls_open(proxy.port, h.client_ctx(pki))
        assert await h.read_all(stream) == b""
        stream.close_now()
        assert await wait_metric(proxy, "tlsproxy_upstream_errors_total", listener="inbound", kind="connect")
        assert h.metric(proxy, "tlsproxy_relays_ended_total", listener="inbound",
                        ended="upstream_failed") == 1
    finally:
        await stop(proxy)


async def test_proxy_protocol_v2_header_reaches_the_upstream(pki, tmp_path):
    headers = []

    async def parse_then_echo(stream: trio.SocketStream) -> None:
        buf = b""
        with trio.fail_after(5):
            while (parsed := h.parse_proxy_v2(buf)) is None:
                chunk = await stream.receive_some()
                assert chunk, "EOF inside the PROXY header"
                buf += chunk
        header, rest = parsed
        headers.append(header)
        if rest:
            await stream.send_all(rest)
        await echo(stream)

    envoy = h.client_cert(pki)
    async with trio.open_nursery() as nursery:
        port = await start_upstream(nursery, parse_then_echo)
        proxy = await running(h.tcp_settings(pki, port, drain_timeout_s=2.0, proxy_protocol="v2",
                                             alpn=("h2", "x-test"), client_ca=pki.ca_file))
        try:
            stream = await h.tls_open(proxy.port, h.client_ctx(pki, envoy, alpn=("x-test",), tmp=tmp_path))
            await stream.send_all(b"payload after the header")
            with trio.fail_after(5):
                assert await stream.receive_some() == b"payload after the header"
            local = stream.ssl_object.getsockname()
            stream.close_now()
            (hd,) = headers
            assert hd.command == 1                                      # PROXY
            assert hd.src == ("127.0.0.1", local[1])                    # the real client
            assert hd.dst == ("127.0.0.1", proxy.port)                  # what it connected to
            assert hd.first(0x01) == b"x-test"                          # PP2_TYPE_ALPN
            assert hd.first(0x02) == b"localhost"                       # PP2_TYPE_AUTHORITY (SNI)
            assert hd.first(0xE0) == h.ENVOY_ID.encode()                # URI SAN (SPIFFE ID)
            ssl_tlv = hd.first(0x20)                                    # PP2_TYPE_SSL
            assert ssl_tlv is not None
            client_flags, verify = ssl_tlv[0], int.from_bytes(ssl_tlv[1:5], "big")
            assert client_flags == 0x01 | 0x02 | 0x04 and verify == 0   # SSL, cert on conn and session
            subs = dict(h.parse_tlvs(ssl_tlv[5:]))
            assert subs[0x21] == b"TLSv1.3"                             # PP2_SUBTYPE_SSL_VERSION
            assert subs[0x22] == b"envoy"                               # PP2_SUBTYPE_SSL_CN
            assert subs[0x23].startswith(b"TLS_")                       # PP2_SUBTYPE_SSL_CIPHER
        finally:
            await stop(proxy)
        nursery.cancel_scope.cancel()


async def test_alpn_follows_the_configured_preference_and_active_gauge(pki):
    async with trio.open_nursery() as nursery:
        port = await start_upstream(nursery, echo)
        proxy = await running(h.tcp_settings(pki, port, drain_timeout_s=2.0, alpn=("h2", "http/1.1")))
        try:
            active = {"listener": "inbound", "protocol": "tcp"}
            chosen = []
            for offered in (("http/1.1", "h2"), ("http/1.1",), ("foo",), ()):
                stream = await h.tls_open(proxy.port, h.client_ctx(pki, alpn=offered))
                chosen.append(stream.selected_alpn_protocol())
                await stream.send_all(b"x")
                with trio.fail_after(5):
                    assert await stream.receive_some() == b"x"
                assert h.metric(proxy, "tlsproxy_connections_active", **active) == 1    # one open relay
                stream.close_now()
                assert await until(lambda: h.metric(proxy, "tlsproxy_connections_active", **active) == 0)
            # the server's order wins; no overlap (or no ALPN) still connects, with nothing selected
            assert chosen == ["h2", "http/1.1", None, None]
        finally:
            await stop(proxy)
        nursery.cancel_scope.cancel()


async def test_certificate_rotation_keeps_open_relays_and_serves_the_new_one(pki):
    async with trio.open_nursery() as nursery:
        port = await start_upstream(nursery, echo)
        proxy = await running(h.tcp_settings(pki, port, drain_timeout_s=2.0))
        try:
            old = await h.tls_open(proxy.port, h.client_ctx(pki))
            old_der = old.getpeercert(True)
            new_leaf = pki.issue("localhost", dns=("localhost",))
            pki.write_pair(pki.cert_dir, new_leaf)          # what a Secret update ends with

            async def serves_new() -> bool:
                s = await h.tls_open(proxy.port, h.client_ctx(pki))
                try:
                    return s.getpeercert(True) != old_der
                finally:
                    s.close_now()

            with trio.fail_after(15):
                while not await serves_new():  # noqa: ASYNC110 - the reload happens in the proxy thread
                    await trio.sleep(0.1)
            await old.send_all(b"still relayed")             # the open relay kept its session
            with trio.fail_after(5):
                assert await old.receive_some() == b"still relayed"
            old.close_now()
        finally:
            await stop(proxy)
        nursery.cancel_scope.cancel()
