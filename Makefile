# Two entry points a newcomer needs (see README.md):
#   make demo   run tlsproxy in standalone mode in front of a built-in demo app
#   make test   install everything the tests need (apt + venv + pip), lint, run the whole suite
# Everything is installed into ./.venv; apt packages are installed only when missing.

PYTHON ?= python3
VENV ?= .venv
APT_PACKAGES = curl openssl nginx wrk nghttp2-client testssl.sh procps buildah debootstrap
PYTEST_ARGS ?=

.PHONY: demo test deps apt venv lint bench bench-smoke soak clean

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

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
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

clean:
	rm -rf $(VENV) build dist *.egg-info
