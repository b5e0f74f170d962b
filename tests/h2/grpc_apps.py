"""A real gRPC app (grpcio's server, h2c on an insecure port) for tests through ``--upstream h2c://``.

``EchoApp`` serves ``/tlsproxy.test.Echo/Unary`` (the request back) and ``/tlsproxy.test.Echo/Bidi``
(each message back as it comes), with raw ``bytes`` messages (no generated code). Every call's
request metadata is recorded in ``seen`` (method, metadata dict) and the client-identity header the
app received comes back as initial metadata ``seen-xfcc`` (empty when there was none), so a test
can check ``x-forwarded-client-cert`` per call. A request message ``b"fail"`` ends the call with
``INVALID_ARGUMENT`` (an app's own error status, carried in trailers).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc

SERVICE = "tlsproxy.test.Echo"
UNARY = f"/{SERVICE}/Unary"
BIDI = f"/{SERVICE}/Bidi"


class EchoApp:
    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._server: grpc.Server | None = None
        self.port = 0

    def __enter__(self) -> EchoApp:
        server = grpc.server(ThreadPoolExecutor(max_workers=16))
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
            "Unary": grpc.unary_unary_rpc_method_handler(self._unary),
            "Bidi": grpc.stream_stream_rpc_method_handler(self._bidi),
        }),))
        self.port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._server = server
        return self

    def __exit__(self, *exc) -> None:
        assert self._server is not None
        self._server.stop(grace=None).wait(10)

    def _record(self, method: str, context: grpc.ServicerContext) -> None:
        metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        with self._lock:
            self.seen.append((method, metadata))
        context.send_initial_metadata((("seen-xfcc", metadata.get("x-forwarded-client-cert", "")),))

    def _unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._record(UNARY, context)
        if request == b"fail":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the app refused this message")
        return request

    def _bidi(self, requests, context: grpc.ServicerContext):
        self._record(BIDI, context)
        yield from requests


def unary(channel: grpc.Channel):
    return channel.unary_unary(UNARY)


def bidi(channel: grpc.Channel):
    return channel.stream_stream(BIDI)
