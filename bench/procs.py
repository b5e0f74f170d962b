"""The processes the benchmark starts: pinned with taskset, stopped by PID, measured from /proc.

Every process is started by us and remembered; ``Procs.stop_all`` ends exactly those (SIGTERM,
then SIGKILL after a bound), never anything found by name.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import time
from pathlib import Path

CPU_PROXY = "0"      # the proxy under test
CPU_LOAD = "1"       # load generators and the upstream


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 20000) if hard > 0 else 20000, hard))


def pinned(cpu: str | None, argv: list[str]) -> list[str]:
    return ["taskset", "-c", cpu, *argv] if cpu is not None else argv


class Procs:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.running: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str], *, cpu: str | None,
              env: dict | None = None) -> subprocess.Popen:
        log = (self.work / f"{name}.out").open("ab")
        p = subprocess.Popen(pinned(cpu, argv), stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, env=env, preexec_fn=_raise_nofile, cwd=self.work)
        log.close()
        self.running[name] = p
        return p

    def stop(self, name: str, timeout_s: float = 10.0) -> None:
        p = self.running.pop(name, None)
        if p is None:
            return
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    def stop_all(self) -> None:
        for name in list(self.running):
            self.stop(name)

    def output(self, name: str) -> str:
        path = self.work / f"{name}.out"
        return path.read_text(errors="replace") if path.exists() else ""


def wait_port(port: int, timeout_s: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout_s:g}s")


def children(pid: int) -> list[int]:
    out: list[int] = []
    task = Path(f"/proc/{pid}/task")
    for t in task.iterdir() if task.exists() else ():
        try:
            out += [int(c) for c in (t / "children").read_text().split()]
        except OSError:
            pass
    return out


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def stat_cpu_ticks(stat: str, *, reaped_children: bool = False) -> int:
    """Clock ticks of CPU time in the text of ``/proc/<pid>/stat`` (pure): utime + stime (every
    thread of the process), plus cutime + cstime (the children it has waited for) when asked.

    The command name (field 2) may hold spaces and parentheses, so fields count from the *last*
    ``)``; after it come state (field 3) … utime (14), stime (15), cutime (16), cstime (17)."""
    _, sep, rest = stat.rpartition(")")
    fields = rest.split()
    if not sep or len(fields) < 15:
        raise ValueError(f"not a /proc/<pid>/stat line: {stat[:80]!r}")
    wanted = (11, 12, 13, 14) if reaped_children else (11, 12)
    return sum(int(fields[i]) for i in wanted)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (all its threads) so far."""
    return stat_cpu_ticks(Path(f"/proc/{pid}/stat").read_text()) / os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    """``pid`` and every living descendant (children of children…), ``pid`` first."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += [c for c in children(p) if c not in out]
    return out


def tree_cpu_seconds(pid: int) -> float:
    """CPU time so far of the process tree under ``pid``: nginx's master and workers, tlsproxy's
    parent and its ``--workers``. Each process counts its own user + system time and that of the
    children it has reaped (a worker that exited and was waited for is not lost; a living one is
    counted once, by itself). A descendant that exits between the listing and the read is skipped;
    ``pid`` itself must exist (OSError otherwise). Read it before and after a measured step: the
    difference is the CPU the proxy spent on that step, to the kernel's clock tick (10 ms)."""
    ticks = stat_cpu_ticks(Path(f"/proc/{pid}/stat").read_text(), reaped_children=True)
    for p in tree(pid)[1:]:
        try:
            ticks += stat_cpu_ticks(Path(f"/proc/{p}/stat").read_text(), reaped_children=True)
        except (OSError, ValueError):
            pass
    return ticks / os.sysconf("SC_CLK_TCK")


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kib / 1024 / 1024:.1f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{os.cpu_count()} CPUs ({model}){mem}, {os.uname().sysname} {os.uname().release}"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"
