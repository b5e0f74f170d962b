"""``tlsproxy trust``: the development CA into a system store and NSS databases, and out again.

Everything happens in a sandbox: ``--system-root`` points the system store at a temporary tree (the
real ``update-ca-certificates`` runs on it) and HOME is a temporary directory holding a fresh NSS
database (``certutil``, apt package libnss3-tools). The machine's own trust store never changes.
Headless Chromium (apt package chromium) then loads the demo over HTTPS with no certificate flag.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import free_port
from tlsproxy.certs import generate

TLSPROXY = str(Path(sys.executable).parent / "tlsproxy")
NICK = "tlsproxy development CA"

needs_certutil = pytest.mark.skipif(shutil.which("certutil") is None,
                                    reason="certutil missing (apt-get install libnss3-tools)")


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TLSPROXY_", "XDG_"))}
    env.update(HOME=str(tmp / "home"), XDG_STATE_HOME=str(tmp / "state"))
    return env


def _sandbox(tmp: Path, *, nss: bool = True) -> Path:
    """A system-store root with a Debian layout (and one other local CA, as on any real system),
    and a HOME with an empty NSS database like Chromium's first start makes."""
    root = tmp / "root"
    local = root / "usr/local/share/ca-certificates"
    local.mkdir(parents=True)
    (local / "other-corp-ca.crt").write_bytes(generate.make_ca("other corp CA").cert_pem)
    home = tmp / "home"
    home.mkdir()
    if nss:
        db = home / ".pki/nssdb"
        db.mkdir(parents=True)
        subprocess.run(["certutil", "-N", "-d", f"sql:{db}", "--empty-password"], check=True,
                       capture_output=True, timeout=30)
    return root


def _trust(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([TLSPROXY, "trust", "--system-root", str(tmp / "root"), *args],
                          capture_output=True, text=True, timeout=120, env=_env(tmp))


def _nss_nicks(tmp: Path, db: str = "home/.pki/nssdb") -> list[str]:
    out = subprocess.run(["certutil", "-L", "-d", f"sql:{tmp / db}"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    return [line for line in out.splitlines() if line.startswith(NICK)]


def _bundle(tmp: Path) -> str:
    return (tmp / "root/etc/ssl/certs/ca-certificates.crt").read_text()


@needs_certutil
def test_print_changes_nothing(tmp_path):
    root = _sandbox(tmp_path)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    r = _trust(tmp_path, "--print")
    assert r.returncode == 0, r.stderr
    assert "would: make the development CA" in r.stdout
    assert "would: system store (debian): write" in r.stdout and "tlsproxy-dev-ca-<new>.crt" in r.stdout
    assert "would: system store (debian): run update-ca-certificates" in r.stdout
    assert f"would: NSS {tmp_path / 'home/.pki/nssdb'}: add" in r.stdout
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
    assert _nss_nicks(tmp_path) == []
    assert not (tmp_path / "state/tlsproxy/ca.crt").exists()


@needs_certutil
def test_install_then_uninstall_removes_every_copy(tmp_path):
    _sandbox(tmp_path)
    firefox = "home/.mozilla/firefox/abcd1234.default-release"
    (tmp_path / firefox).mkdir(parents=True)
    subprocess.run(["certutil", "-N", "-d", f"sql:{tmp_path / firefox}", "--empty-password"], check=True,
                   capture_output=True, timeout=30)
    r = _trust(tmp_path)
    assert r.returncode == 0, r.stderr
    ca = (tmp_path / "state/tlsproxy/ca.crt").read_bytes()
    copies = list((tmp_path / "root/usr/local/share/ca-certificates").glob("tlsproxy-dev-ca-*.crt"))
    assert len(copies) == 1 and copies[0].read_bytes() == ca
    # update-ca-certificates really ran on the sandbox: the bundle holds the CA
    assert ca.decode().strip() in _bundle(tmp_path)
    assert len(_nss_nicks(tmp_path)) == 1 and _nss_nicks(tmp_path, firefox) == _nss_nicks(tmp_path)
    # OpenSSL verifies the standalone leaf with the sandbox's bundle alone: the system store works
    leaf = tmp_path / "state/tlsproxy/tls.crt"
    bundle = tmp_path / "root/etc/ssl/certs/ca-certificates.crt"
    v = subprocess.run(["openssl", "verify", "-CAfile", str(bundle), str(leaf)], capture_output=True,
                       text=True, timeout=30)
    assert v.returncode == 0, v.stdout + v.stderr
    again = _trust(tmp_path)
    assert "already installed" in again.stdout

    r = _trust(tmp_path, "--uninstall")
    assert r.returncode == 0, r.stderr
    assert not list((tmp_path / "root/usr/local/share/ca-certificates").glob("tlsproxy-dev-ca-*"))
    assert not list((tmp_path / "root/etc/ssl/certs").glob("tlsproxy-dev-ca-*"))
    assert ca.decode().strip() not in _bundle(tmp_path)
    assert (tmp_path / "root/usr/local/share/ca-certificates/other-corp-ca.crt").exists()
    assert _nss_nicks(tmp_path) == [] and _nss_nicks(tmp_path, firefox) == []
    # the other CA stays in the rebuilt bundle
    other = (tmp_path / "root/usr/local/share/ca-certificates/other-corp-ca.crt").read_text().strip()
    assert other in _bundle(tmp_path)


@needs_certutil
def test_install_replaces_the_copies_of_an_older_ca(tmp_path):
    """A CA replaced since (e.g. one made before the name constraints) is removed everywhere."""
    _sandbox(tmp_path)
    assert _trust(tmp_path).returncode == 0
    old_nick = _nss_nicks(tmp_path)
    r = _trust(tmp_path, "--dev-ca-name", "myapp.test")        # other names: a new CA
    assert r.returncode == 0, r.stderr
    copies = list((tmp_path / "root/usr/local/share/ca-certificates").glob("tlsproxy-dev-ca-*.crt"))
    assert len(copies) == 1
    assert copies[0].read_bytes() == (tmp_path / "state/tlsproxy/ca.crt").read_bytes()
    nicks = _nss_nicks(tmp_path)
    assert len(nicks) == 1 and nicks != old_nick
    assert "myapp.test" in r.stdout


def test_without_nss_databases_it_says_so_and_a_bad_root_is_exit_2(tmp_path):
    _sandbox(tmp_path, nss=False)
    r = _trust(tmp_path, "--print")
    assert r.returncode == 0 and "NSS databases: none under" in r.stdout
    r = subprocess.run([TLSPROXY, "trust", "--system-root", str(tmp_path / "nope")], capture_output=True,
                       text=True, timeout=60, env=_env(tmp_path))
    assert r.returncode == 2 and r.stderr.startswith("tlsproxy: error: --system-root") \
        and r.stderr.count("\n") == 1


def test_an_unwritable_store_is_one_line_exit_2(tmp_path):
    root = tmp_path / "root"
    (root / "usr/local/share").mkdir(parents=True)
    (root / "usr/local/share/ca-certificates").write_text("a file where the directory should be")
    (tmp_path / "home").mkdir()
    r = _trust(tmp_path, "--no-nss", "--system", "debian")
    assert r.returncode == 2 and "cannot write" in r.stderr and r.stderr.count("\n") == 1


needs_chromium = pytest.mark.skipif(shutil.which("chromium") is None,
                                    reason="chromium missing (apt-get install chromium)")


def _chromium(tmp: Path, url: str, *extra: str) -> subprocess.CompletedProcess:
    """Headless Chromium, a fresh profile, HOME (and so the NSS database) of the sandbox."""
    profile = tmp / f"chrome-{time.monotonic_ns()}"
    return subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", *extra, "--dump-dom", url],
        capture_output=True, text=True, timeout=90, env=_env(tmp))


@contextlib.contextmanager
def _demo(tmp: Path, *args: str):
    port, admin = free_port(), free_port()
    demo = subprocess.Popen([TLSPROXY, "demo", "--listen", f"127.0.0.1:{port}", "--admin",
                             f"127.0.0.1:{admin}", "--log-format", "json", *args], env=_env(tmp),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_ready(admin, demo)
        yield port
    finally:
        os.killpg(demo.pid, signal.SIGTERM)
        try:
            demo.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait(10)


@needs_certutil
@needs_chromium
def test_chromium_loads_the_demo_after_trust_and_not_after_uninstall(tmp_path):
    _sandbox(tmp_path)
    r = _trust(tmp_path, "--system", "none")
    assert r.returncode == 0, r.stderr
    with _demo(tmp_path) as port:
        seen = _chromium(tmp_path, f"https://localhost:{port}/from-chromium")
        assert '"path": "/from-chromium"' in seen.stdout, seen.stderr[-2000:]
        assert '"x-forwarded-proto": "https"' in seen.stdout

        assert _trust(tmp_path, "--uninstall", "--system", "none").returncode == 0
        refused = _chromium(tmp_path, f"https://localhost:{port}/from-chromium")
        assert "/from-chromium" not in refused.stdout
        assert "ERR_CERT_AUTHORITY_INVALID" in refused.stderr, refused.stderr[-2000:]


@needs_certutil
@needs_chromium
def test_chromium_refuses_a_real_domain_signed_with_the_trusted_dev_ca_key(tmp_path):
    """The browser side of the name constraints: with the development CA trusted, a certificate for
    example.com made with its key is refused, while the same certificate from an unconstrained CA
    trusted the same way is accepted (so the constraints are what refuses it)."""
    _sandbox(tmp_path)
    assert _trust(tmp_path, "--system", "none").returncode == 0
    state = tmp_path / "state/tlsproxy"
    dev = generate.Issued((state / "ca.crt").read_bytes(), (state / "ca.key").read_bytes())
    unconstrained = generate.make_ca("some unconstrained CA")
    (tmp_path / "unconstrained.crt").write_bytes(unconstrained.cert_pem)
    subprocess.run(["certutil", "-A", "-d", f"sql:{tmp_path / 'home/.pki/nssdb'}", "-t", "C,,", "-n",
                    "unconstrained", "-i", str(tmp_path / "unconstrained.crt")], check=True,
                   capture_output=True, timeout=30)
    for name, ca, ok in (("dev", dev, False), ("unconstrained", unconstrained, True)):
        leaf = generate.issue(ca, "example.com", dns=("example.com",))
        (tmp_path / f"{name}.crt").write_bytes(leaf.cert_pem)
        (tmp_path / f"{name}.key").write_bytes(leaf.key_pem)
        with _demo(tmp_path, "--cert", str(tmp_path / f"{name}.crt"), "--key",
                   str(tmp_path / f"{name}.key")) as port:
            seen = _chromium(tmp_path, f"https://example.com:{port}/real-domain",
                             "--host-resolver-rules=MAP example.com 127.0.0.1")
        if ok:
            assert '"path": "/real-domain"' in seen.stdout, seen.stderr[-2000:]
        else:
            assert "/real-domain" not in seen.stdout
            assert "ERR_CERT_INVALID" in seen.stderr, seen.stderr[-2000:]


def _wait_ready(admin: int, proc: subprocess.Popen) -> None:
    import urllib.request

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"tlsproxy demo exited {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError("tlsproxy demo never became ready")


def test_redhat_layout_and_macos_are_handled(tmp_path):
    root = tmp_path / "root"
    (root / "etc/pki/ca-trust/source/anchors").mkdir(parents=True)
    (tmp_path / "home").mkdir()
    r = _trust(tmp_path, "--no-nss")                 # detected from the layout
    assert r.returncode == 0, r.stderr
    (copy,) = (root / "etc/pki/ca-trust/source/anchors").glob("tlsproxy-dev-ca-*.pem")
    assert copy.read_bytes() == (tmp_path / "state/tlsproxy/ca.crt").read_bytes()
    assert "update-ca-trust skipped" in r.stdout     # never run on a sandbox root
    assert _trust(tmp_path, "--no-nss", "--uninstall").returncode == 0
    assert not list((root / "etc/pki/ca-trust/source/anchors").iterdir())

    mac = _trust(tmp_path, "--no-nss", "--system", "macos")
    assert mac.returncode == 0
    ca = tmp_path / "state/tlsproxy/ca.crt"
    assert (f"sudo security add-trusted-cert -d -r trustRoot -k /Library/Keychains/System.keychain {ca}"
            in mac.stdout)
    gone = _trust(tmp_path, "--no-nss", "--system", "macos", "--uninstall")
    assert "sudo security delete-certificate -c 'tlsproxy development CA'" in gone.stdout
