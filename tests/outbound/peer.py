"""Test peers: a real TLS HTTP server (Python ssl) with any certificate, even an expired one, that
can demand a client certificate and reports what it saw (path, headers, client certificate)."""

from __future__ import annotations

import contextlib
import http.server
import json
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tlsproxy.certs import generate


@dataclass
class TLSPeer:
    port: int
    seen: list[dict] = field(default_factory=list)


def _handler(peer: TLSPeer):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def _handle(self) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n) if n else b""
            cert = self.connection.getpeercert()
            subject = None
            if cert:
                subject = ",".join(f"{k}={v}" for rdn in cert.get("subject", ()) for k, v in rdn)
            info = {"method": self.command, "path": self.path, "headers": dict(self.headers.items()),
                    "body_len": len(body), "client_subject": subject,
                    "alpn": self.connection.selected_alpn_protocol(), "tls": self.connection.version()}
            peer.seen.append(info)
            payload = json.dumps(info).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = _handle

    return Handler


@contextlib.contextmanager
def tls_peer(tmp: Path, issued: generate.Issued, *, client_ca: bytes | None = None,
             max_version: ssl.TLSVersion | None = None) -> Iterator[TLSPeer]:
    """Serve HTTPS on 127.0.0.1 with ``issued`` (no validity check: expired certificates too)."""
    tmp.mkdir(parents=True, exist_ok=True)
    chain = tmp / "peer.pem"
    chain.write_bytes(issued.cert_pem + issued.key_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(chain))
    ctx.set_alpn_protocols(["http/1.1"])
    if max_version is not None:
        ctx.maximum_version = max_version
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=client_ca.decode())
    peer = TLSPeer(0)

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True

        def get_request(self):
            sock, addr = self.socket.accept()
            sock.settimeout(10)
            return ctx.wrap_socket(sock, server_side=True), addr

        def handle_error(self, request, client_address) -> None:
            pass   # failed handshakes are what some tests are about

    server = Server(("127.0.0.1", 0), _handler(peer))
    peer.port = server.server_address[1]
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield peer
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def upgrade_peer(tmp: Path, issued: generate.Issued) -> Iterator[TLSPeer]:
    """A TLS peer that answers any request with ``101`` and then echoes bytes until EOF."""
    import socket

    tmp.mkdir(parents=True, exist_ok=True)
    chain = tmp / "upgrade-peer.pem"
    chain.write_bytes(issued.cert_pem + issued.key_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(chain))
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    peer = TLSPeer(listener.getsockname()[1])
    stop = threading.Event()

    def serve_one(raw: socket.socket) -> None:
        raw.settimeout(10)
        try:
            with ctx.wrap_socket(raw, server_side=True) as s:
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = s.recv(4096)
                    if not chunk:
                        return
                    head += chunk
                peer.seen.append({"head": head.decode("latin-1")})
                s.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n"
                          + head.split(b"\r\n\r\n", 1)[1])
                while True:
                    data = s.recv(65536)
                    if not data:
                        return
                    s.sendall(data)
        except OSError:
            pass

    def accept_loop() -> None:
        while not stop.is_set():
            try:
                raw, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=serve_one, args=(raw,), daemon=True).start()

    t = threading.Thread(target=accept_loop, daemon=True)
    t.start()
    try:
        yield peer
    finally:
        stop.set()
        t.join(5)
        listener.close()
