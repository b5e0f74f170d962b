"""Hold N handshaken, idle TLS connections to 127.0.0.1:PORT: ``python -m bench.idle PORT N CA``.

Opens the connections ``CONCURRENCY`` at a time, each with a full TLS 1.3 handshake under a
timeout, prints ``holding N`` on stdout, then holds them until stdin closes (or ``HOLD_MAX_S``
passes) and exits. Bounded in count and time; run pinned to the load CPU.
"""

from __future__ import annotations

import ssl
import sys

import trio

CONCURRENCY = 50
CONNECT_TIMEOUT_S = 10.0
HOLD_MAX_S = 300.0


async def _main(port: int, n: int, ca: str) -> None:
    ctx = ssl.create_default_context(cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    streams: list[trio.SSLStream] = []
    limit = trio.Semaphore(CONCURRENCY)
    failed = 0

    async def one() -> None:
        nonlocal failed
        async with limit:
            try:
                with trio.fail_after(CONNECT_TIMEOUT_S):
                    tcp = await trio.open_tcp_stream("127.0.0.1", port)
                    s = trio.SSLStream(tcp, ctx, server_hostname="localhost", https_compatible=True)
                    await s.do_handshake()
                streams.append(s)
            except (OSError, trio.TooSlowError, trio.BrokenResourceError, ssl.SSLError):
                failed += 1

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(one)
    print(f"holding {len(streams)} failed {failed}", flush=True)
    with trio.move_on_after(HOLD_MAX_S):
        await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
    for s in streams:
        await trio.aclose_forcefully(s)


def main() -> None:
    port, n, ca = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    trio.run(_main, port, n, ca)


if __name__ == "__main__":
    main()
