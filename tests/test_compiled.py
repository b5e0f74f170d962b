"""`make compiled` (optional) puts mypyc-built extensions beside the sans-IO modules, and Python
imports an extension before the source: one older than its .py would silently run old code."""

from pathlib import Path

import tlsproxy

HTTP = Path(tlsproxy.__file__).parent / "http"


def test_no_extension_is_older_than_its_source() -> None:
    stale = []
    for ext in HTTP.glob("*.so"):
        module = ext.name.split(".", 1)[0]
        source = HTTP / f"{module}.py"
        if source.exists() and ext.stat().st_mtime < source.stat().st_mtime:
            stale.append(f"{ext.name} is older than {source.name}: run `make compiled` "
                         "(or `make clean-compiled` for pure Python)")
    assert not stale, "\n".join(stale)
