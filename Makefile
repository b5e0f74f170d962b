# Two entry points a newcomer needs (see README.md):
#   make demo   run tlsproxy in standalone mode in front of a built-in demo app
#   make test   install everything the tests need (apt + venv + pip), lint, run the whole suite
# Everything is installed into ./.venv; apt packages are installed only when missing.

# Debian's python3 when there is one: the interpreter the image ships (Dockerfile), built with PGO
# and LTO; a source build without them (pyenv's default) runs tlsproxy ~20 % slower per request
# (docs/performance.md). Any other Python >= 3.11: make PYTHON=/path/to/python3 test
PYTHON ?= $(shell test -x /usr/bin/python3 && /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && echo /usr/bin/python3 || echo python3)
VENV ?= .venv
APT_PACKAGES = python3-venv curl openssl nginx wrk nghttp2-client testssl.sh procps buildah debootstrap libnss3-tools chromium
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

# Optional, measured and not the default: the sans-IO HTTP core (CORE, the same list as setup.py's)
# compiled with mypyc into C extensions beside its .py files. It runs ~13 % fewer instructions per
# keep-alive request and no less CPU time (docs/performance.md, "mypyc: measured, not the default").
# `make compiled` needs gcc and python3-dev; it installs the `compile` extra (mypy) into the venv
# and builds without pip's build isolation. Editing a core module makes `make venv` rebuild pure
# Python (tests/test_compiled.py fails while an extension is older than its source).
#   make compiled       compile or fail, showing the compiler's error
#   make clean-compiled remove the extensions
MYPYC ?= 0
CORE = headers framing h1server h1client response
CORE_SOURCES = setup.py $(CORE:%=tlsproxy/http/%.py)

$(VENV)/.installed: pyproject.toml $(CORE_SOURCES)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	TLSPROXY_BUILD_MYPYC=$(MYPYC) $(VENV)/bin/pip install -q -e '.[test]'
	@$(VENV)/bin/tlsproxy --version
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
	$(VENV)/bin/pip install -q -e '.[compile]'
	TLSPROXY_BUILD_MYPYC=require $(VENV)/bin/pip install -q --no-build-isolation --no-deps -e .
	$(VENV)/bin/tlsproxy --version

clean-compiled:
	rm -rf build tlsproxy/http/*.so

clean: clean-compiled
	rm -rf $(VENV) build dist *.egg-info
