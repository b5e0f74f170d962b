"""TLSStream on real TCP sockets (127.0.0.1), both ends in trio: the receive-after-send path."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from tests.support import client_context
from tlsproxy.certs.bundle import load_dir
from tlsproxy.tls.contexts import server_context
from tlsproxy.tls.stream import TLSStream


@asynccontextmanager
async def _pair(pki) -> AsyncIterator[tuple[TLSStream, TLSStream]]:
    """A handshaken (server, client) pair over a loopback TCP connection, closed afterwards; the
    whole test runs under 5 s (a receive that waits for nothing would otherwise hang)."""
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        client_sock = socket.create_connection(listener.getsockname()[:2])
        server_sock, _ = listener.accept()
    finally:
        listener.close()
    bundle = load_dir(pki.cert_dir)
    server = TLSStream(server_sock, server_context([bundle]), server_side=True)
    client = TLSStream(client_sock, client_context(pki), server_side=False, server_hostname="localhost")
    try:
        with trio.fail_after(5):
            async with trio.open_nursery() as n:
                n.start_soon(server.do_handshake)
                n.start_soon(client.do_handshake)
            yield server, client
    finally:
        await server.aclose()
        await client.aclose()


async def test_receive_after_send_returns_bytes_openssl_already_decrypted(pki):
    # A receive limited by max_bytes leaves the rest of the record decrypted inside OpenSSL: the
    # socket is no longer readable for it. A receive right after a send must not wait for the
    # socket then (the peer sends nothing more here), or it would hang.
    async with _pair(pki) as (server, client):
        await client.send_all(b"0123456789" * 10)          # one 100-byte record
        assert await server.receive_some(10) == b"0123456789"
        await server.send_all(b"ack")
        rest = await server.receive_some()
        assert rest == b"0123456789" * 9
        assert await client.receive_some() == b"ack"


async def test_receive_after_send_reads_a_record_already_in_the_socket(pki):
    async with _pair(pki) as (server, client):
        await client.send_all(b"first")
        await client.send_all(b"second")                   # its own record, already in the socket
        assert await server.receive_some() == b"first"
        await trio.sleep(0.05)                              # both records are there before our send
        await server.send_all(b"ack")
        assert await server.receive_some() == b"second"


async def test_ragged_eof_reads_as_end_of_stream(pki):
    # A peer that closes TCP without close_notify: the stream ends (b""), as ssl.py's
    # suppress_ragged_eofs did, rather than raising.
    async with _pair(pki) as (server, client):
        await client.send_all(b"last words")
        raw = client.ssl_object
        raw.shutdown(socket.SHUT_RDWR)                     # TCP FIN, no TLS close_notify
        got = b""
        while True:
            chunk = await server.receive_some()
            if not chunk:
                break
            got += chunk
        assert got == b"last words"
