"""``python -m bench._profiled OUT tlsproxy-args...``: run tlsproxy with a measurement switched on
by SIGUSR1 and off by SIGUSR2, so only the load is counted (bench/calls.py). OUT ending in
``.mem``: tracemalloc (the memory allocated meanwhile and still held, by line, written as text);
otherwise cProfile (its stats written to OUT)."""

import cProfile
import signal
import sys
import tracemalloc

from tlsproxy.cli import main

_out = sys.argv[1]
_prof = cProfile.Profile()
_mem = _out.endswith(".mem")
_before = []


def _on(signum, frame) -> None:
    if _mem:
        tracemalloc.start(1)
        _before.append(tracemalloc.take_snapshot())
    else:
        _prof.enable()


def _off(signum, frame) -> None:
    if not _mem:
        _prof.disable()
        _prof.dump_stats(_out)
        return
    diff = tracemalloc.take_snapshot().compare_to(_before[0], "lineno")
    with open(_out + ".tmp", "w") as f:
        for stat in diff[:40]:
            f.write(f"{stat.size_diff} {stat.count_diff} {stat.traceback}\n")
    import os
    os.replace(_out + ".tmp", _out)


signal.signal(signal.SIGUSR1, _on)
signal.signal(signal.SIGUSR2, _off)
sys.exit(main(sys.argv[2:]))
