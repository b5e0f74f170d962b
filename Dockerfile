# tlsproxy: a TLS 1.3 sidecar. Three stages:
#   python  bookworm-slim + Debian's python3 (built with PGO and LTO) + CA certificates: the base
#   build   a virtualenv with the package (`pip install .`, as the README installs it), then only
#           what runs is kept: pip, setuptools and build-only code removed, tests removed, shared
#           objects stripped, every module compiled to bytecode
#   final   the base + that one venv layer (docs/kubernetes.md records its size)
# Runs as uid/gid 65532 (no shell, no home needed); the read-only root filesystem works because
# nothing is written at run time: bytecode is compiled here (unchecked-hash .pyc files: the image
# never changes, so no source timestamp needs checking) and writing it is off.

FROM debian:bookworm-slim AS python
# Debian point releases change exact versions; pinning them would break rebuilds, not make them safer.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/cache/debconf/*-old /var/log/apt /var/log/dpkg.log

FROM python AS build
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv binutils \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY tlsproxy ./tlsproxy
# cffi's Python half and pycparser generate C at build time; at run time cryptography needs only
# _cffi_backend, which stays. PyYAML's C accelerator (yaml/_yaml*.so, ~1 MB stripped) goes too: tlsproxy
# reads YAML with yaml.safe_load (pure Python), only for --config and `inject`. Type stubs (*.pyi)
# are for type checkers. The dependencies ship as bytecode only (`compileall -b` puts each .pyc where
# its .py was, then the .py goes): about a third of the layer, and nothing reads their sources at run
# time; a traceback through them shows no source line. tlsproxy's own modules keep their sources
# (with their bytecode in __pycache__), so its tracebacks stay readable.
# (tests/test_dockerfile.py imports every tlsproxy module and each dependency in the image.)
# The loop's $p globs on purpose (python3*, *.dist-info).
# hadolint ignore=SC2086
RUN python3 -m venv /opt/tlsproxy \
 && /opt/tlsproxy/bin/pip install --no-cache-dir --no-compile /src \
 && /opt/tlsproxy/bin/pip uninstall -y -q pip setuptools \
 && for p in _distutils_hack distutils-precedence.pth pkg_resources cffi cffi-*.dist-info pycparser \
      pycparser-*.dist-info trio/_tests '*/tests' 'yaml/_yaml.*.so' _yaml; do rm -rf /opt/tlsproxy/lib/python3*/site-packages/$p; done \
 && rm -f /opt/tlsproxy/bin/Activate.ps1 \
 && find /opt/tlsproxy -name '*.pyi' -delete \
 && find /opt/tlsproxy -name '*.so' -exec strip --strip-unneeded {} + \
 && find /opt/tlsproxy -name __pycache__ -prune -exec rm -rf {} + \
 && python3 -m compileall -q -j0 --invalidation-mode unchecked-hash /opt/tlsproxy/lib/python3.*/site-packages/tlsproxy \
 && python3 -m compileall -q -j0 -b -x '/site-packages/tlsproxy/' --invalidation-mode unchecked-hash /opt/tlsproxy/lib \
 && find /opt/tlsproxy/lib -name '*.py' -not -path '*/site-packages/tlsproxy/*' -delete

FROM python
COPY --from=build /opt/tlsproxy /opt/tlsproxy
ENV PATH=/opt/tlsproxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
# 9443: TLS listener; 9901: admin (/healthz, /readyz, /metrics)
EXPOSE 9443 9901
ENTRYPOINT ["tlsproxy"]
CMD ["serve"]
