"""The directory watcher, for real: inotify via watchfiles, files written as kubelet, cp and mv do."""

from __future__ import annotations

import os
import time
from pathlib import Path

import trio

from tests.secret_writers import atomic_write, copy_files, move_files
from tlsproxy.certs.watch import watch_dirs

BOUND_S = 5.0     # generous functional bound: a change is reported well within this


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []
        self.changed = trio.Event()

    async def __call__(self, trigger: str) -> None:
        self.calls.append((trigger, time.monotonic()))
        self.changed.set()

    def of(self, trigger: str) -> list[float]:
        return [t for tr, t in self.calls if tr == trigger]

    async def next_change(self, trigger: str = "files") -> float:
        """Wait (bounded) for the next call with ``trigger``; returns its time."""
        before = len(self.of(trigger))
        with trio.fail_after(BOUND_S):
            while len(self.of(trigger)) <= before:
                self.changed = trio.Event()
                await self.changed.wait()
        return self.of(trigger)[-1]


async def _settle() -> None:
    # Let the watcher thread arm inotify before the first write (events before that are not ours).
    await trio.sleep(0.3)


async def _watching(nursery: trio.Nursery, dirs: list[Path], rec: Recorder, interval_s: float = 0) -> None:
    await nursery.start(lambda task_status: watch_dirs(dirs, rec, interval_s=interval_s,
                                                      task_status=task_status))
    await _settle()


async def test_kubelet_atomic_swap_is_one_change(tmp_path: Path) -> None:
    d = tmp_path / "secret"
    atomic_write(d, {"tls.crt": b"one", "tls.key": b"k1"})
    rec = Recorder()
    async with trio.open_nursery() as nursery:
        await _watching(nursery, [d], rec)
        t0 = time.monotonic()
        assert atomic_write(d, {"tls.crt": b"two", "tls.key": b"k2"})
        t1 = await rec.next_change()
        assert t1 - t0 < BOUND_S
        await trio.sleep(0.5)   # the whole burst (mkdir, symlinks, rename, rmtree) is debounced:
        assert len(rec.of("files")) <= 2    # one batch (two only if the writer stalls > 100 ms)
        # the layout really is kubelet's: visible links through ..data to a timestamped directory
        assert os.readlink(d / "tls.crt") == "..data/tls.crt"
        assert os.readlink(d / "..data").startswith("..20")
        assert (d / "tls.crt").read_bytes() == b"two"
        # and the watch survives the swap: a second rotation is seen too
        atomic_write(d, {"tls.crt": b"three", "tls.key": b"k3"})
        await rec.next_change()
        nursery.cancel_scope.cancel()


async def test_plain_cp_and_mv_are_seen(tmp_path: Path) -> None:
    d = tmp_path / "certs"
    copy_files(d, {"tls.crt": b"a", "tls.key": b"a"})
    rec = Recorder()
    async with trio.open_nursery() as nursery:
        await _watching(nursery, [d], rec)
        copy_files(d, {"tls.crt": b"b", "tls.key": b"b"})
        await rec.next_change()
        move_files(d, {"tls.crt": b"c", "tls.key": b"c"}, staging=tmp_path / "staging")
        await rec.next_change()
        nursery.cancel_scope.cancel()


async def test_periodic_recheck_runs_without_events(tmp_path: Path) -> None:
    d = tmp_path / "quiet"
    d.mkdir()
    rec = Recorder()
    async with trio.open_nursery() as nursery:
        await _watching(nursery, [d], rec, interval_s=0.2)
        await rec.next_change("periodic")
        await rec.next_change("periodic")
        assert not rec.of("files")
        nursery.cancel_scope.cancel()


async def test_missing_directory_is_polled_then_watched(tmp_path: Path) -> None:
    d = tmp_path / "later"
    rec = Recorder()
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: watch_dirs([d], rec, interval_s=0, task_status=task_status))
        await rec.next_change("poll")           # polled while missing
        atomic_write(d, {"tls.crt": b"x", "tls.key": b"y"})
        await rec.next_change("poll")           # the poll that finds it, then the watch starts
        await _settle()
        atomic_write(d, {"tls.crt": b"x2", "tls.key": b"y2"})
        await rec.next_change("files")          # and then watched for real
        nursery.cancel_scope.cancel()


async def test_cancellation_is_prompt(tmp_path: Path) -> None:
    """The watcher thread is told to stop before we wait for it (else up to its timeout)."""
    d = tmp_path / "d"
    d.mkdir()
    rec = Recorder()
    async with trio.open_nursery() as nursery:
        await _watching(nursery, [d], rec)
        t0 = time.monotonic()
        nursery.cancel_scope.cancel()
    assert time.monotonic() - t0 < 0.8     # the fallback (WATCH_TIMEOUT_MS) would be 1 s
