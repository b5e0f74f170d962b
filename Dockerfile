# tlsproxy: a TLS 1.3 sidecar. Two stages: build a virtualenv with the package (as the README installs
# it: `pip install .` into a venv), then copy only that venv onto a fresh bookworm-slim with python3.
# Runs as uid/gid 65532 (no shell, no home needed); the read-only root filesystem works because
# nothing is written at run time (bytecode writing is off).

FROM debian:bookworm-slim AS build
# Debian point releases change exact versions; pinning them would break rebuilds, not make them safer.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY tlsproxy ./tlsproxy
RUN python3 -m venv /opt/tlsproxy \
 && /opt/tlsproxy/bin/pip install --no-cache-dir /src

FROM debian:bookworm-slim
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/tlsproxy /opt/tlsproxy
ENV PATH=/opt/tlsproxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
# 9443: TLS listener; 9901: admin (/healthz, /readyz, /metrics)
EXPOSE 9443 9901
ENTRYPOINT ["tlsproxy"]
CMD ["serve"]
