"""The shared runtime (runtime.py) with a program of the test's own: readiness is a latch that turns
only once every listener is bound, and the drain closes the listeners then ends the run."""

from __future__ import annotations

import socket

import httpx
import trio

from tlsproxy import net
from tlsproxy.admin.health import Health
from tlsproxy.certs.source import CertSource
from tlsproxy.config import HostPort, Settings, Upstream
from tlsproxy.metrics import Metrics
from tlsproxy.runtime import Runtime
from tlsproxy.tls.contexts import ServerTLSOptions, server_context
from tlsproxy.tls.served import ServedTLS


def _build(material):
    bundles = list(material.bundles())
    return server_context(bundles, ServerTLSOptions()), bundles


class TwoListeners:
    """Binds a first listener, then waits for ``release`` before binding the second."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.release = trio.Event()
        self.first_bound = trio.Event()
        self.drained = False

    async def handler(self, sock: socket.socket, _peer) -> None:
        sock.close()

    async def start_listeners(self, accepting: trio.Nursery, handlers: trio.Nursery) -> None:
        loopback = HostPort("127.0.0.1", 0)
        self.runtime.bound.tls = await accepting.start(net.serve, net.Listener("first", loopback, 8),
                                                       self.handler, handlers)
        self.first_bound.set()
        await self.release.wait()
        self.runtime.bound.extra["second"] = await accepting.start(
            net.serve, net.Listener("second", loopback, 8), self.handler, handlers)

    def on_drain(self) -> None:
        self.drained = True


async def _readyz(client: httpx.AsyncClient, port: int) -> tuple[int, dict]:
    r = await client.get(f"http://127.0.0.1:{port}/readyz")
    return r.status_code, r.json()


async def test_readiness_turns_only_once_every_listener_is_bound(pki):
    settings = Settings(listen=HostPort("127.0.0.1", 0), admin=HostPort("127.0.0.1", 0),
                        upstream=Upstream("http", "127.0.0.1", 1), cert_dir=pki.cert_dir, drain_delay_s=0.0)
    metrics = Metrics()
    served = ServedTLS(CertSource(cert_dir=pki.cert_dir), _build, metrics)
    runtime = Runtime(settings, served, metrics, Health())
    program = TwoListeners(runtime)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, httpx.AsyncClient(timeout=5) as client:
            started = trio.Event()

            async def runner() -> None:
                await nursery.start(lambda task_status: runtime.run(program, task_status=task_status))
                started.set()

            nursery.start_soon(runner)
            await program.first_bound.wait()
            # the first listener accepts, the admin answers, but not every listener is bound: 503
            socket.create_connection(("127.0.0.1", runtime.bound.tls.port), timeout=5).close()
            status, body = await _readyz(client, runtime.bound.admin.port)
            assert status == 503 and body["not_ready"] == {"listeners": "listeners not bound yet"}, body
            assert not started.is_set()
            program.release.set()
            await started.wait()
            # started (the runtime's task_status) means every listener is bound: ready, both accept
            assert await _readyz(client, runtime.bound.admin.port) == (200, {"ready": True})
            for port in (runtime.bound.tls.port, runtime.bound.extra["second"].port):
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
            runtime.request_drain("test")
            status, body = await _readyz(client, runtime.bound.admin.port)
            assert status == 503 and "drain" in body["not_ready"]
    assert program.drained
