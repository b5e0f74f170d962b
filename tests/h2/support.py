"""tests/h2 support: a real h2c app (hypercorn in its own process) and proxy settings for it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

from tests.support import PKI, ROOT, free_port, settings_for
from tlsproxy.config import Settings, Upstream


@dataclass
class H2App:
    port: int
    proc: subprocess.Popen

    def kill(self) -> None:
        """SIGKILL to the app's process group (hypercorn serves from a worker process)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def _wait_listening(port: int, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the app exited: {proc.stderr.read().decode(errors='replace')[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("the h2c app did not start listening")


@contextlib.contextmanager
def hypercorn_app(*extra: str) -> Iterator[H2App]:
    """tests/h2/asgi_app.py under hypercorn: HTTP/1.1 and h2c with prior knowledge on one port."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "hypercorn", "--bind", f"127.0.0.1:{port}",
                             "--keep-alive", "60", *extra, "tests.h2.asgi_app:app"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    app = H2App(port, proc)
    try:
        _wait_listening(port, proc)
        yield app
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                app.kill()
        proc.stderr.close()


def h2c_settings(pki: PKI, port: int, **changes) -> Settings:
    return settings_for(pki, port, upstream=Upstream("h2c", "127.0.0.1", port), **changes)
