# Two entry points a newcomer needs (see README.md):
#   make demo   run tlsproxy in standalone mode in front of a built-in demo app
#   make test   install everything the tests need (apt + venv + pip), lint, run the whole suite
# Everything is installed into ./.venv; apt packages are installed only when missing.

# Debian's python3 when there is one: the interpreter the image ships (Dockerfile), built with PGO
# and LTO; a source build without them (pyenv's default) runs tlsproxy ~20 % slower per request
# (docs/performance.md). Any other Python >= 3.11: make PYTHON=/path/to/python3 test
PYTHON ?= $(shell test -x /usr/bin/python3 && /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && echo /usr/bin/python3 || echo python3)
VENV ?= .venv
APT_PACKAGES = python3-venv gcc python3-dev curl openssl nginx wrk nghttp2-client testssl.sh procps buildah debootstrap libnss3-tools chromium
PYTEST_ARGS ?=

.PHONY: demo test deps apt venv lint bench bench-smoke soak clean compiled clean-compiled

demo: venv
	$(VENV)/bin/tlsproxy demo

test: deps lint
	$(VENV)/bin/pytest -q -p no:cacheprovider $(PYTEST_ARGS)

deps: apt venv

apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing apt packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

# The HTTP core (CORE, the same list as setup.py's: the sans-IO modules and the HTTP/1.1 engine's
# I/O shell) is compiled with mypyc into C extensions beside its .py files when a C compiler and
# Python's headers are there (gcc, python3-dev): ~23 % fewer instructions per keep-alive request
# (docs/performance.md, "mypyc"). Without them the build still succeeds and the same modules run as
# pure Python; the last line of `make venv` says which
# (`tlsproxy --version`). Editing a core module makes `make venv` (so `make test`) rebuild it:
# tests/test_compiled.py fails while an extension is older than its source.
#   make MYPYC=0 venv   pure Python (no compile)
#   make compiled       compile or fail, showing the compiler's error
#   make clean-compiled remove the extensions: pure Python until a core module changes
MYPYC ?= auto
CORE = headers framing h1server h1client response forward shell sink deadlines pool
CORE_SOURCES = setup.py $(CORE:%=tlsproxy/http/%.py)

$(VENV)/.installed: pyproject.toml $(CORE_SOURCES)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	TLSPROXY_BUILD_MYPYC=$(MYPYC) $(VENV)/bin/pip install -q -e '.[test]'
	@v=$$($(VENV)/bin/tlsproxy --version); case "$$v" in *pure*) [ "$(MYPYC)" = 0 ] || \
	  v="$$v: not compiled, \`make compiled\` shows why (it needs gcc and python3-dev)";; esac; echo "$$v"
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check .

bench: deps
	$(VENV)/bin/python -m bench.run

bench-smoke: deps
	$(VENV)/bin/python -m bench.run --smoke

soak: deps
	$(VENV)/bin/python -m bench.soak

compiled: venv
	TLSPROXY_BUILD_MYPYC=require $(VENV)/bin/pip install -q --no-deps -e .
	$(VENV)/bin/tlsproxy --version

clean-compiled:
	rm -rf build tlsproxy/http/*.so

clean: clean-compiled
	rm -rf $(VENV) build dist *.egg-info
