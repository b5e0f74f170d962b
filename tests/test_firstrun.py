"""A first run with nothing to learn: on a terminal (a real pseudo-terminal here) ``tlsproxy demo``
and standalone ``tlsproxy serve`` print the "try this" lines first, then human-readable log lines;
piped, or with ``--log-format json``, every line is JSON. The printed curl line works as printed."""

from __future__ import annotations

import json
import os
import pty
import select
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support import app_server, free_port

TLSPROXY = str(Path(sys.executable).parent / "tlsproxy")
READ_TIMEOUT_S = 30.0


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TLSPROXY_", "XDG_"))}
    env.update(HOME=str(tmp / "home"), XDG_STATE_HOME=str(tmp / "state"), TERM="dumb")
    return env


class _OnTerminal:
    """The command with stdin, stdout and stderr on one pseudo-terminal, as in a shell."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                                     start_new_session=True)
        os.close(slave)
        self.text = ""

    def read_until(self, needle: str) -> str:
        deadline = time.monotonic() + READ_TIMEOUT_S
        while needle not in self.text:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"never saw {needle!r} on the terminal:\n{self.text}")
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:       # the other side closed (process ended)
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"terminal closed before {needle!r}:\n{self.text}")
                self.text += chunk.decode(errors="replace").replace("\r\n", "\n")
        return self.text

    def interrupt(self) -> int:
        """Ctrl-C, as a person would press it; the exit code."""
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            return self.proc.wait(15)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
            os.close(self.master)


def _curl_line(text: str) -> list[str]:
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("try:"))
    return shlex.split(line.split("try:", 1)[1])


def test_demo_on_a_terminal_prints_try_lines_first_and_text_logs(tmp_path):
    port, admin = free_port(), free_port()
    term = _OnTerminal([TLSPROXY, "demo", "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}"],
                       _env(tmp_path))
    try:
        text = term.read_until(" standalone mode ca=")
        lines = text.splitlines()
        assert lines[0] == f"tlsproxy demo: a built-in app behind the proxy at https://localhost:{port}/"
        assert lines[1].strip().startswith("try:") and "curl --cacert" in lines[1]
        assert lines[2].strip().startswith("browsers: tlsproxy trust")
        assert not any(ln.lstrip().startswith("{") for ln in lines), "JSON on a terminal"
        assert any(" info " in ln and "certificate loaded" in ln for ln in lines)
        # the line works exactly as printed
        argv = _curl_line(text)
        r = subprocess.run([*argv, "-sS", "--max-time", "10"], capture_output=True, text=True, timeout=20)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["path"] == "/hello"
    finally:
        code = term.interrupt()
    assert code == 0           # Ctrl-C drains and exits at once (the demo has no drain delay)


def test_standalone_serve_on_a_terminal(tmp_path):
    with app_server() as app:
        port, admin = free_port(), free_port()
        term = _OnTerminal([TLSPROXY, "serve", "--listen", f"127.0.0.1:{port}", "--admin",
                            f"127.0.0.1:{admin}", "--upstream", app.url, "--drain-delay", "0"],
                           _env(tmp_path))
        try:
            text = term.read_until(" standalone mode ca=")
            first = text.splitlines()[0]
            assert first.startswith(f"tlsproxy serve: standalone mode, https://localhost:{port}/ -> "
                                    f"{app.url}")
            r = subprocess.run([*_curl_line(text), "-sS", "--max-time", "10", "-o", "/dev/null", "-w",
                                "%{http_code}"], capture_output=True, text=True, timeout=20)
            assert r.stdout == "200", r.stderr
        finally:
            assert term.interrupt() == 0


def test_piped_output_is_json_only(tmp_path):
    port, admin = free_port(), free_port()
    proc = subprocess.Popen([TLSPROXY, "demo", "--listen", f"127.0.0.1:{port}", "--admin",
                             f"127.0.0.1:{admin}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=_env(tmp_path), text=True, start_new_session=True)
    seen = []
    try:
        deadline = time.monotonic() + READ_TIMEOUT_S
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            seen.append(json.loads(line))          # every line is JSON
            if seen[-1]["event"] == "standalone mode":
                break
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=15)
    assert seen and seen[-1]["event"] == "standalone mode", seen
    assert seen[-1]["try"].startswith("curl --cacert ") and str(port) in seen[-1]["try"]
    assert out == ""                               # nothing for a person on stdout
    for line in err.splitlines():
        json.loads(line)


def test_log_format_json_on_a_terminal_is_json(tmp_path):
    port, admin = free_port(), free_port()
    term = _OnTerminal([TLSPROXY, "demo", "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}",
                        "--log-format", "json"], _env(tmp_path))
    try:
        text = term.read_until('"standalone mode"')
    finally:
        term.interrupt()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert all(ln.startswith("{") for ln in lines), text
