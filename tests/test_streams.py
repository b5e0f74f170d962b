"""net.FdStream, the one base of the plain and the TLS stream: what callers rely on without asking
which kind they hold (fileno, close_now, linger_close), over real loopback TCP."""

from __future__ import annotations

import socket
import ssl

import pytest
import trio

from tlsproxy import net
from tlsproxy.tls.stream import TLSStream

UNREAD = b"x" * (200 * 1024)     # a request body the server never reads (more than the socket buffers)


def _pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname(), timeout=10)
        accepted, _ = server.accept()
    return client, accepted


def _client_reads_answer(client: socket.socket) -> tuple[bytes, str]:
    """Like a client that uploads a body the server refused: it goes on sending after the answer
    arrived, then reads. The server must not answer that with a RST (which destroys the answer
    in the client's receive queue) but read and drop it, then close with a FIN."""
    import select
    import time

    client.settimeout(10)
    client.sendall(UNREAD[:65536])
    select.select([client], [], [], 10)        # the answer has arrived; the upload goes on
    time.sleep(0.2)                            # (the server has closed or is lingering by now)
    reset = ""
    try:
        client.sendall(UNREAD[65536:131072])
    except OSError as exc:                     # the server reset the connection
        reset = type(exc).__name__
    time.sleep(0.2)
    got = b""
    try:
        while chunk := client.recv(65536):
            got += chunk
    except OSError as exc:
        reset = reset or type(exc).__name__
    return got, reset


async def test_both_streams_are_fd_streams(pki):
    client, accepted = _pair()
    with client:
        plain = net.socket_stream(accepted)
        assert isinstance(plain, net.FdStream) and isinstance(plain, trio.abc.HalfCloseableStream)
        assert plain.fileno() == accepted.fileno()
        plain.close_now()
        plain.close_now()                     # idempotent
        assert plain.closed
        with pytest.raises(trio.ClosedResourceError):
            await plain.send_all(b"late")
    assert issubclass(TLSStream, net.FdStream)


async def test_plain_linger_close_delivers_the_answer_despite_unread_bytes():
    client, accepted = _pair()
    with client:
        stream = net.socket_stream(accepted)
        reader = trio.to_thread.run_sync(_client_reads_answer, client)
        async with trio.open_nursery() as nursery:
            result: list[tuple[bytes, str]] = []

            async def read() -> None:
                result.append(await reader)

            nursery.start_soon(read)
            await stream.send_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n")
            with trio.fail_after(10):
                await stream.linger_close(timeout_s=2.0)
        assert stream.closed
        # the answer, then a clean end; the rest of the upload was read and dropped, not reset
        assert result == [(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n", "")]


async def test_tls_linger_close_sends_close_notify_then_fin(pki):
    from tlsproxy.certs.bundle import load_dir
    from tlsproxy.tls.contexts import ServerTLSOptions, server_context

    sctx = server_context([load_dir(pki.cert_dir)], ServerTLSOptions())
    cctx = ssl.create_default_context(cafile=str(pki.ca_file))
    client, accepted = _pair()
    with client:
        stream = TLSStream(accepted, sctx, server_side=True)

        def client_side() -> bytes:
            with cctx.wrap_socket(client, server_hostname="localhost") as tls:
                tls.sendall(b"request")
                got = b""
                while chunk := tls.recv(65536):    # close_notify reads as b"" (a clean end)
                    got += chunk
                return got

        async with trio.open_nursery() as nursery:
            result: list[bytes] = []

            async def run_client() -> None:
                result.append(await trio.to_thread.run_sync(client_side))

            nursery.start_soon(run_client)
            with trio.fail_after(10):
                await stream.do_handshake()
                assert await stream.receive_some() == b"request"
                await stream.send_all(b"answer")
                await stream.linger_close(timeout_s=2.0)
        assert stream.closed and result == [b"answer"]
