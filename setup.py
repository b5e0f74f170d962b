"""Builds tlsproxy as pure Python (the default), or, when asked, with its sans-IO HTTP core
compiled by mypyc (`make compiled`). The compile is an experiment kept for re-measuring: on the
machine it was measured on it cut ~13 % of the instructions per request and none of the CPU time
(docs/performance.md, "mypyc: measured, not the default").

pyproject.toml holds the project's metadata; this file only adds the C extensions. The modules in
CORE are compiled as ONE mypyc group, so their calls to each other are C calls (compiled one by one,
each would call the others through Python: three quarters of the gain; docs/performance.md, "mypyc").
The group's code is one shared library, `tlsproxy/http/core__mypyc*.so` (mypyc suffixes the last
component of GROUP), and each module gets a small extension of its own name beside its .py that
loads it; Python imports an extension before the source of the same name.

TLSPROXY_BUILD_MYPYC chooses (pip passes the environment to this build):
  0 (the default)     pure Python, no compile
  auto                compile when mypyc (the `compile` extra, installed beside the build: pip's
                      --no-build-isolation), a C compiler and Python's headers are there; otherwise,
                      or when the compile fails, build pure Python (with one line why, pip -v shows it)
  require             compile or fail the build (`make compiled`)
The same .py files run in both cases: compiled is an optimisation, never a different behaviour.
`tlsproxy --version` says which one runs (tlsproxy/cli.py), and `make venv` prints it last.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_ext import build_ext

CORE = [
    "tlsproxy/http/headers.py",
    "tlsproxy/http/framing.py",
    "tlsproxy/http/h1server.py",
    "tlsproxy/http/h1client.py",
    "tlsproxy/http/response.py",
]  # the Makefile's CORE lists the same modules (tests/test_compiled.py)
GROUP = "tlsproxy.http.core"
MODE = os.environ.get("TLSPROXY_BUILD_MYPYC", "0").strip().lower()
if MODE not in ("auto", "require", "0"):
    sys.exit(f"TLSPROXY_BUILD_MYPYC={MODE!r}: expected auto, require or 0")


def say(line: str) -> None:
    # stderr: pip shows a build's stderr with -v, and on failure
    print(f"tlsproxy build: {line}", file=sys.stderr, flush=True)


def missing_toolchain() -> str | None:
    """Why a C extension cannot be built here, before mypy spends ~12 s generating C for nothing."""
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        return f"no C compiler ({cc})"
    include = sysconfig.get_paths()["include"]
    if not Path(include, "Python.h").exists():
        return f"no Python headers ({include}/Python.h; Debian: python3-dev)"
    return None


class CoreDistribution(Distribution):
    # The extensions are made in build_ext.finalize_options, so only a command that builds pays for
    # mypy. build_ext always runs: it builds the core, or clears an in-place build's old extensions.
    def has_ext_modules(self) -> bool:
        return True


# Commands that build; pip's metadata steps (egg_info, dist_info) also finalize build_ext, each in a
# process of its own, and must not pay for mypy.
BUILDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "install", "develop"}
SUFFIX = sysconfig.get_config_var("EXT_SUFFIX")
OUTPUTS = [m.removesuffix(".py") + SUFFIX for m in CORE] + [GROUP.replace(".", "/") + "__mypyc" + SUFFIX]


class BuildCore(build_ext):
    tried = False   # setuptools may finalize this command more than once: mypyc runs (or fails) once

    def finalize_options(self) -> None:
        if MODE != "0" and not BuildCore.tried and BUILDS & set(self.distribution.commands):
            BuildCore.tried = True
            self.distribution.ext_modules = self._mypycify()
        super().finalize_options()

    def _mypycify(self) -> list:
        why = missing_toolchain()
        if why is None:
            try:
                from mypyc.build import mypycify

                # --ignore-missing-imports: the build environment has mypy and h11 (its types, for
                # the values the core gets from it), not trio or the others, which modules the core
                # imports (exchange, deadlines) use; those are analysed, not compiled, and typed Any.
                # --cache-dir=/dev/null: no .mypy_cache left in the source tree.
                return mypycify(
                    ["--ignore-missing-imports", "--follow-imports=silent", "--cache-dir=/dev/null", *CORE],
                    group_name=GROUP,
                    opt_level="3",    # -Os ran ~8 % slower (docs/performance.md)
                )
            except (Exception, SystemExit) as e:  # mypy reports type errors by exiting
                why = f"mypyc failed ({type(e).__name__}: {str(e)[:120]})"
        self._fallback(why)
        return []

    def run(self) -> None:
        inplace = self.inplace or self.editable_mode
        if self.extensions:
            try:
                super().run()
                return
            except Exception as e:  # CompileError, LinkError, a missing compiler...
                self._fallback(f"the C compile failed ({type(e).__name__}: {str(e)[:120]})")
                self.extensions = []
        # Pure Python: no extension may be installed, neither half of this build nor one an earlier
        # build left in build/ (the wheel packs what is there), and in an editable install none may
        # stay beside the sources (Python would import it before the .py: code older than its source).
        # Every extension in tlsproxy/http is this build's (a module no longer in CORE included).
        for root in (Path(self.build_lib), *((Path("."),) if inplace else ())):
            found = {str(p.relative_to(root)) for p in root.glob(f"tlsproxy/http/*{SUFFIX}")}
            for path in {*OUTPUTS, *found}:
                Path(root, path).unlink(missing_ok=True)

    def _fallback(self, why: str) -> None:
        if MODE == "require":
            raise SystemExit(f"tlsproxy build: TLSPROXY_BUILD_MYPYC=require but {why}")
        say(f"the sans-IO core stays pure Python: {why}")

setup(distclass=CoreDistribution, cmdclass={"build_ext": BuildCore})
