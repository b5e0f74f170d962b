"""tcp-mode test helpers: a gRPC server (generic handlers, no codegen), TLS clients on trio, a
PROXY v2 parser written from the spec, and proxies in tcp mode."""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import trio

from tests.support import PKI, settings_for
from tlsproxy.config import Settings, Upstream
from tlsproxy.tls.listener import stdlib_socket
from tlsproxy.tls.stream import TLSStream

SERVICE = "tlsproxy.test.Echo"
ENVOY_ID = "spiffe://cluster.local/ns/projectcontour/sa/envoy"
NO_PROXY = [("grpc.enable_http_proxy", 0)]


# ---------------------------------------------------------------------------- gRPC (bytes in, bytes out)

@dataclass
class GrpcApp:
    port: int
    peers: list[str] = field(default_factory=list)
    metadata: list[dict] = field(default_factory=list)


@contextlib.contextmanager
def grpc_server() -> Iterator[GrpcApp]:
    """An insecure (h2c) gRPC server on 127.0.0.1 with Unary, ServerStream and Chat (bidi) methods."""
    app = GrpcApp(0)

    def note(ctx) -> None:
        app.peers.append(ctx.peer())
        app.metadata.append(dict(ctx.invocation_metadata()))

    def unary(req: bytes, ctx) -> bytes:
        note(ctx)
        return b"echo:" + req

    def server_stream(req: bytes, ctx):
        note(ctx)
        n = int(req)
        for i in range(n):
            yield f"item {i}".encode()

    def chat(requests, ctx):
        note(ctx)
        for req in requests:
            yield req[::-1]

    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
        "Chat": grpc.stream_stream_rpc_method_handler(chat),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=(handler,))
    app.port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield app
    finally:
        server.stop(0).wait(5)


def secure_channel(port: int, pki: PKI, client=None, name: str = "localhost") -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert_pem,
                                         private_key=client.key_pem if client else None,
                                         certificate_chain=client.cert_pem if client else None)
    return grpc.secure_channel(f"127.0.0.1:{port}", creds,
                               options=[("grpc.ssl_target_name_override", name), *NO_PROXY])


def insecure_channel(port: int) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=NO_PROXY)


def exercise(channel: grpc.Channel) -> None:
    """One unary call, a server stream and a bidirectional stream; asserts the answers."""
    unary = channel.unary_unary(f"/{SERVICE}/Unary")
    assert unary(b"hello", timeout=10, metadata=(("x-caller", "envoy"),)) == b"echo:hello"
    stream = channel.unary_stream(f"/{SERVICE}/ServerStream")
    assert list(stream(b"50", timeout=10)) == [f"item {i}".encode() for i in range(50)]
    chat = channel.stream_stream(f"/{SERVICE}/Chat")
    msgs = [f"message {i}".encode() * (i + 1) for i in range(20)] + [b"x" * (1 << 20)]
    assert list(chat(iter(msgs), timeout=20)) == [m[::-1] for m in msgs]


# ---------------------------------------------------------------------------- proxies

def tcp_settings(pki: PKI, upstream_port: int, **changes) -> Settings:
    base = settings_for(pki, 0, protocol="tcp", upstream=Upstream("tcp", "127.0.0.1", upstream_port))
    return base.replace(**changes)


def client_cert(pki: PKI, name: str = "envoy", uri: str = ENVOY_ID):
    return pki.issue(name, uris=(uri,), server=False, client=True)


def metric(proxy, name: str, **labels) -> float:
    return proxy.app.metrics.registry.get_sample_value(name, labels) or 0.0


# ---------------------------------------------------------------------------- TLS clients on trio

def client_ctx(pki: PKI, client=None, alpn: tuple[str, ...] = (), tmp=None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    if client is not None:
        assert tmp is not None
        (tmp / "c.crt").write_bytes(client.cert_pem)
        (tmp / "c.key").write_bytes(client.key_pem)
        ctx.load_cert_chain(str(tmp / "c.crt"), str(tmp / "c.key"))
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


async def tls_open(port: int, ctx: ssl.SSLContext, name: str = "localhost") -> TLSStream:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with trio.fail_after(10):
        await sock.connect(("127.0.0.1", port))
        stream = TLSStream(stdlib_socket(sock), ctx, server_side=False, server_hostname=name)
        await stream.do_handshake()
    return stream


def send_close_notify(stream: TLSStream) -> None:
    """End our sending side the TLS way (close_notify) while we keep reading."""
    try:
        stream.ssl_object.unwrap()
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
        pass


async def read_all(stream: trio.abc.Stream, timeout: float = 10) -> bytes:
    out = bytearray()
    with trio.fail_after(timeout):
        while True:
            try:
                data = await stream.receive_some()
            except trio.BrokenResourceError:
                break
            if not data:
                break
            out += data
    return bytes(out)


# ---------------------------------------------------------------------------- PROXY v2, from the spec

SIG = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"


@dataclass
class ProxyHeader:
    command: int
    src: tuple[str, int]
    dst: tuple[str, int]
    tlvs: list[tuple[int, bytes]]

    def first(self, kind: int) -> bytes | None:
        return next((v for k, v in self.tlvs if k == kind), None)


def parse_tlvs(data: bytes) -> list[tuple[int, bytes]]:
    out, i = [], 0
    while i < len(data):
        kind, length = data[i], struct.unpack("!H", data[i + 1:i + 3])[0]
        value = data[i + 3:i + 3 + length]
        assert len(value) == length, "TLV runs past the header"
        out.append((kind, value))
        i += 3 + length
    return out


def parse_proxy_v2(buf: bytes) -> tuple[ProxyHeader, bytes] | None:
    """(header, rest) once the whole header is in ``buf``; None when more bytes are needed."""
    if len(buf) < 16:
        return None
    assert buf[:12] == SIG, buf[:16]
    assert buf[12] >> 4 == 2, "version 2"
    command, fam = buf[12] & 0x0F, buf[13]
    length = struct.unpack("!H", buf[14:16])[0]
    if len(buf) < 16 + length:
        return None
    body, rest = buf[16:16 + length], buf[16 + length:]
    if fam == 0x11:       # TCP over IPv4
        src = (socket.inet_ntop(socket.AF_INET, body[0:4]), struct.unpack("!H", body[8:10])[0])
        dst = (socket.inet_ntop(socket.AF_INET, body[4:8]), struct.unpack("!H", body[10:12])[0])
        tlvs = parse_tlvs(body[12:])
    elif fam == 0x21:     # TCP over IPv6
        src = (socket.inet_ntop(socket.AF_INET6, body[0:16]), struct.unpack("!H", body[32:34])[0])
        dst = (socket.inet_ntop(socket.AF_INET6, body[16:32]), struct.unpack("!H", body[34:36])[0])
        tlvs = parse_tlvs(body[36:])
    else:
        src = dst = ("", 0)
        tlvs = parse_tlvs(body) if fam else []
    return ProxyHeader(command, src, dst, tlvs), rest
