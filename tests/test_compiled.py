"""The sans-IO HTTP core compiled by mypyc (setup.py; `make venv` builds it when it can).

Python imports an extension before the source of the same name, so an extension older than its .py
would silently run old code: these tests fail then. When the build compiled the core, the compiled
modules must be what runs, and `tlsproxy --version` must say so.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import tlsproxy

ROOT = Path(__file__).resolve().parent.parent
HTTP = Path(tlsproxy.__file__).parent / "http"
SUFFIX = sysconfig.get_config_var("EXT_SUFFIX")
GROUP_LIB = HTTP / f"core__mypyc{SUFFIX}"     # setup.py's GROUP: one shared library for the core


def _core_modules() -> list[str]:
    """setup.py's CORE, read from its source (setup.py runs setup() when imported)."""
    text = (ROOT / "setup.py").read_text()
    block = re.search(r"^CORE = \[(.*?)\]", text, re.S | re.M)
    assert block, "setup.py has no CORE list"
    return [Path(p).stem for p in re.findall(r'"tlsproxy/http/(\w+\.py)"', block.group(1))]


def test_the_makefile_and_setup_py_name_the_same_core() -> None:
    """The Makefile rebuilds when a core source changes: its list must be setup.py's."""
    makefile = (ROOT / "Makefile").read_text()
    listed = re.search(r"^CORE = (.*)$", makefile, re.M)
    assert listed and listed.group(1).split() == _core_modules()


def test_no_extension_is_older_than_its_source() -> None:
    stale = []
    sources = {m: HTTP / f"{m}.py" for m in _core_modules()}
    for ext in HTTP.glob("*.so"):
        module = ext.name.split(".", 1)[0]
        # each module's extension is a shim into the group's library, which holds all their code
        depends = list(sources.values()) if ext == GROUP_LIB else [HTTP / f"{module}.py"]
        for source in depends:
            if source.exists() and ext.stat().st_mtime < source.stat().st_mtime:
                stale.append(f"{ext.name} is older than {source.name}: run `make venv` or `make compiled` "
                             "(or `make clean-compiled` for pure Python)")
    assert not stale, "\n".join(stale)


def test_extensions_are_all_or_nothing() -> None:
    """A shim without the group's library fails to import (no fallback to the .py), and a library
    without its shims is dead weight: setup.py builds or removes them together."""
    shims = sorted(p.name.split(".", 1)[0] for p in HTTP.glob(f"*{SUFFIX}") if p != GROUP_LIB)
    if GROUP_LIB.exists():
        assert shims == sorted(_core_modules())
    else:
        assert shims == []


def test_the_compiled_core_is_what_runs() -> None:
    if not GROUP_LIB.exists():
        pytest.skip(f"no compiled core in this install ({GROUP_LIB.name} was not built: no C compiler "
                    "or python3-dev, TLSPROXY_BUILD_MYPYC=0, or `make clean-compiled`); pure Python runs")
    for name in _core_modules():
        module = importlib.import_module(f"tlsproxy.http.{name}")
        assert module.__file__.endswith(SUFFIX), f"{module.__name__} runs from {module.__file__}"
    assert f"{GROUP_LIB.parent.name}.core__mypyc" in " ".join(sys.modules)
    out = subprocess.run([sys.executable, "-m", "tlsproxy", "--version"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.strip() == f"tlsproxy {tlsproxy.__version__} (core: compiled (mypyc))"


def test_version_says_pure_python_without_the_extensions(tmp_path: Path) -> None:
    """The same tree without its extensions (a copy of the package's sources) runs pure Python."""
    import shutil

    shutil.copytree(HTTP.parent, tmp_path / "tlsproxy", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    out = subprocess.run([sys.executable, "-m", "tlsproxy", "--version"], capture_output=True, text=True,
                         timeout=60, check=True, cwd=tmp_path).stdout
    assert out.strip() == f"tlsproxy {tlsproxy.__version__} (core: pure Python)"
