"""Tell when a certificate source *may* have changed: a directory watch plus a periodic re-check.

Theory of operation
-------------------
This module only says "look again"; whether anything really changed is decided by the reader,
by a hash of the bytes (``source.Material.digest``), never by mtime. It knows nothing of TLS.

* We watch **directories**, never the files: kubelet and cert-manager's CSI driver publish a Secret
  as ``tls.crt -> ..data/tls.crt`` with ``..data -> ..2026_11_25_12_00_00.123456789`` and rotate it
  by renaming a new ``..data_tmp`` symlink over ``..data``. A watch on ``tls.crt`` itself would
  follow the old inode and die with the first swap. The rename happens *in* the watched directory,
  so a non-recursive watch sees it, and it also sees a plain ``cp`` or ``mv`` of new files.
* One rotation is a burst of events (new directory, symlink, rename, removal of the old directory;
  or two ``cp``s). watchfiles groups them: it yields once nothing happened for ``DEBOUNCE_QUIET_MS``
  (or after ``DEBOUNCE_MAX_MS`` of continuous churn), so one rotation means one reload attempt.
* A missed event (an inotify queue overflow, a file that is a symlink into another directory, a
  volume that does not support notifications) is caught by the periodic re-check.
* A directory that does not exist (yet) is polled every ``MISSING_POLL_S`` until it appears; a
  watched directory that disappears sends us back to polling.
* watchfiles waits in a worker thread that only returns when something happens, after
  ``rust_timeout`` or when its ``stop_event`` is set. Cancelling the watch therefore sets our own
  ``stop_event`` first (in a ``finally`` of the parent task), so cancellation is immediate rather than
  waiting up to the timeout.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import trio
from watchfiles import awatch

from ..log import get_logger

log = get_logger("certs.watch")

DEBOUNCE_QUIET_MS = 100     # one kubelet swap takes a few ms; two `cp`s typed by hand rarely < 100 ms apart
DEBOUNCE_MAX_MS = 500       # never hold a change back longer than this, even under continuous churn
MISSING_POLL_S = 1.0        # a directory that is not there yet (Secret mounted late): look every second
WATCH_TIMEOUT_MS = 1000     # worker-thread wake-up bound if we are ever cancelled without the stop event

Trigger = str               # "files" (a watch event), "periodic" (backstop), "poll" (directory missing)
OnChange = Callable[[Trigger], Awaitable[object]]


async def watch_dirs(paths: Sequence[Path], on_change: OnChange, *, interval_s: float = 60.0,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Call ``on_change(trigger)`` after each debounced burst of events in ``paths`` and every
    ``interval_s`` seconds (0 disables the periodic re-check). Calls never overlap. Runs until
    cancelled."""
    dirs = tuple(dict.fromkeys(Path(p) for p in paths))
    lock = trio.Lock()

    async def call(trigger: Trigger) -> None:
        async with lock:
            await on_change(trigger)

    async with trio.open_nursery() as nursery:
        stop = trio.Event()
        nursery.start_soon(_events, dirs, call, stop)
        if interval_s > 0:
            nursery.start_soon(_periodic, interval_s, call)
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            stop.set()     # before the nursery waits for the watcher thread to notice the cancel


async def _periodic(interval_s: float, call: Callable[[Trigger], Awaitable[None]]) -> None:
    while True:
        await trio.sleep(interval_s)
        await call("periodic")


def _all_dirs(dirs: Sequence[Path]) -> bool:
    return all(d.is_dir() for d in dirs)


async def _events(dirs: Sequence[Path], call: Callable[[Trigger], Awaitable[None]], stop: trio.Event) -> None:
    last_error = ""
    while not stop.is_set():
        if not _all_dirs(dirs):
            missing = [str(d) for d in dirs if not d.is_dir()]
            log.debug("certificate directory missing; polling", missing=missing)
            while not _all_dirs(dirs):
                await trio.sleep(MISSING_POLL_S)
                await call("poll")
            await call("poll")      # it appeared: look once more now that the watch starts
        try:
            async for changes in awatch(*dirs, watch_filter=None, step=DEBOUNCE_QUIET_MS,
                                        debounce=DEBOUNCE_MAX_MS, stop_event=stop,
                                        rust_timeout=WATCH_TIMEOUT_MS, recursive=False,
                                        yield_on_timeout=True):
                if changes:
                    log.debug("certificate directory changed",
                              changes=sorted(f"{c.name}:{Path(p).name}" for c, p in changes))
                    await call("files")
                if not _all_dirs(dirs):
                    break       # a watched directory went away: back to polling
        except Exception as exc:  # noqa: BLE001 - the watch must never take the proxy down
            # The directory vanished between the check and the watch start, or the backend refused
            # it (e.g. the inotify watch limit): say so once, keep the periodic re-check, retry.
            text = f"{type(exc).__name__}: {exc}"
            if text != last_error:
                level = log.debug if isinstance(exc, FileNotFoundError) else log.warning
                level("certificate directory watch failed; relying on re-checks", error=text,
                      dirs=[str(d) for d in dirs])
                last_error = text
            await trio.sleep(MISSING_POLL_S)
            await call("poll")
