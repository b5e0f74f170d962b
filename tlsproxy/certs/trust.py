"""``tlsproxy trust``: install the development CA where clients look for trust, or remove every copy.

Like ``caddy trust`` and ``mkcert -install``, with one difference that matters: the CA installed here
is name-constrained (``devca.py``), so it can vouch for localhost and the names you gave it, never
for a real domain.

Where it goes:

- the **system store**: Debian/Ubuntu write ``/usr/local/share/ca-certificates/tlsproxy-dev-ca-<id>.crt``
  and run ``update-ca-certificates``; RHEL/Fedora write
  ``/etc/pki/ca-trust/source/anchors/tlsproxy-dev-ca-<id>.pem`` and run ``update-ca-trust extract``;
  on macOS the ``security`` command to run is printed (it asks for an administrator's password).
  ``--system-root DIR`` puts every system path under DIR (a sandbox: the tests use it) and passes the
  matching directories to ``update-ca-certificates``.
- **NSS databases**, with ``certutil`` (apt package ``libnss3-tools``): Chromium's ``~/.pki/nssdb`` and
  every Firefox profile under ``~/.mozilla/firefox`` and ``~/snap/firefox/common/.mozilla/firefox``.
  Only databases that exist are touched (a browser makes its own on first start).

Installing first removes older copies (a CA that was replaced, e.g. one made before the name
constraints), then adds the current one. ``--uninstall`` removes every copy, current or older.
Nothing is done by ``--print``: it lists the steps.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError

FILE_PREFIX = "tlsproxy-dev-ca"
NICK_PREFIX = "tlsproxy development CA"
COMMAND_TIMEOUT_S = 60.0
NEW_CA = b"(the development CA to be made)"   # stands for it in --print's plan
SYSTEMS = ("auto", "debian", "redhat", "macos", "none")
DEBIAN_DIR = "usr/local/share/ca-certificates"
REDHAT_DIR = "etc/pki/ca-trust/source/anchors"
MACOS_KEYCHAIN = "/Library/Keychains/System.keychain"
NSS_PLACES = (".pki/nssdb",)
FIREFOX_PLACES = (".mozilla/firefox", "snap/firefox/common/.mozilla/firefox")


@dataclass(frozen=True)
class Options:
    ca_file: Path                 # the development CA (may not exist yet with --print)
    root: Path = Path("/")        # system store root
    system: str = "auto"
    home: Path = field(default_factory=Path.home)
    nss: bool = True
    certutil: str | None = None   # found on PATH when None


@dataclass
class Step:
    """One thing to do: ``what`` is shown (``--print`` and after doing it); ``run`` does it."""

    what: str
    run: Callable[[], None] | None = None


def ca_id(pem: bytes) -> str:
    """The short id in file names and nicknames: the first 8 hex digits of the PEM's SHA-256."""
    if pem == NEW_CA:
        return "<new>"
    return hashlib.sha256(pem).hexdigest()[:8]


def detect_system(opts: Options) -> str:
    if opts.system != "auto":
        return opts.system
    if sys.platform == "darwin" and opts.root == Path("/"):
        return "macos"
    real = opts.root == Path("/")
    if (opts.root / DEBIAN_DIR).is_dir() or (real and shutil.which("update-ca-certificates")):
        return "debian"
    if (opts.root / REDHAT_DIR).is_dir() or (real and shutil.which("update-ca-trust")):
        return "redhat"
    return "none"


def _run(argv: list[str]) -> None:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except FileNotFoundError:
        raise ConfigError(f"{argv[0]}: command not found") from None
    except subprocess.TimeoutExpired:
        raise ConfigError(f"{argv[0]}: no answer after {COMMAND_TIMEOUT_S:g}s") from None
    if r.returncode != 0:
        why = (r.stderr.strip() or r.stdout.strip() or f"exit code {r.returncode}").splitlines()[-1]
        raise ConfigError(f"{' '.join(argv[:2])}: {why}")


def _write(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(0o644)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc} (run as root, e.g. sudo "
                          "tlsproxy trust, or skip the system store with --system none)") from None


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot remove {path}: {exc.strerror or exc} (run as root)") from None


# ---------------------------------------------------------------------------- system store

def _debian_update(opts: Options, fresh: bool) -> list[str]:
    argv = ["update-ca-certificates"] + (["--fresh"] if fresh else [])
    if opts.root != Path("/"):
        r = opts.root
        for d in ("etc/ssl/certs", "usr/share/ca-certificates", "etc/ca-certificates/update.d"):
            (r / d).mkdir(parents=True, exist_ok=True)
        (r / "etc/ca-certificates.conf").touch()
        argv += ["--localcertsdir", str(r / DEBIAN_DIR),
                 "--certsconf", str(r / "etc/ca-certificates.conf"),
                 "--certsdir", str(r / "usr/share/ca-certificates"),
                 "--etccertsdir", str(r / "etc/ssl/certs"),
                 "--hooksdir", str(r / "etc/ca-certificates/update.d")]
    return argv


def _system_steps(opts: Options, pem: bytes | None) -> list[Step]:
    """Steps for the system store: remove every copy, then (with ``pem``) add the current one."""
    system = detect_system(opts)
    if system == "none":
        return [Step("system store: none found (or --system none): skipped")]
    if system == "macos":
        ca = opts.ca_file
        cmd = (f"sudo security add-trusted-cert -d -r trustRoot -k {MACOS_KEYCHAIN} {ca}" if pem else
               f"sudo security delete-certificate -c '{NICK_PREFIX}' {MACOS_KEYCHAIN}")
        return [Step(f"system store (macOS): run this yourself (it asks for a password):\n  {cmd}")]
    directory = opts.root / (DEBIAN_DIR if system == "debian" else REDHAT_DIR)
    suffix = ".crt" if system == "debian" else ".pem"
    steps = []
    old = sorted(directory.glob(f"{FILE_PREFIX}*")) if directory.is_dir() else []
    new = directory / f"{FILE_PREFIX}-{ca_id(pem)}{suffix}" if pem else None
    for path in old:
        if path != new:
            steps.append(Step(f"system store ({system}): remove {path}", lambda p=path: _unlink(p)))
    if new is not None and (not new.exists() or new.read_bytes() != pem):
        steps.append(Step(f"system store ({system}): write {new}", lambda: _write(new, pem)))
    if not steps:
        return [Step(f"system store ({system}): " + ("already installed" if pem else "no copy found"))]
    if system == "debian":
        steps.append(Step("system store (debian): run update-ca-certificates" + ("" if pem else " --fresh"),
                          lambda: _run(_debian_update(opts, fresh=pem is None))))
    elif opts.root == Path("/"):
        steps.append(Step("system store (redhat): run update-ca-trust extract",
                          lambda: _run(["update-ca-trust", "extract"])))
    else:
        steps.append(Step(f"system store (redhat): update-ca-trust skipped (store root {opts.root})"))
    return steps


# ---------------------------------------------------------------------------- NSS databases

def nss_databases(home: Path) -> list[Path]:
    """Existing NSS databases under ``home``: Chromium's, then every Firefox profile's."""
    found = [home / p for p in NSS_PLACES if (home / p / "cert9.db").exists()]
    for place in FIREFOX_PLACES:
        base = home / place
        if base.is_dir():
            found += sorted(d for d in base.iterdir() if (d / "cert9.db").exists())
    return found


def _nicknames(certutil: str, db: Path) -> list[str]:
    r = subprocess.run([certutil, "-L", "-d", f"sql:{db}"], capture_output=True, text=True,
                       timeout=COMMAND_TIMEOUT_S)
    # "<nickname>   <trust attributes, e.g. C,,>": the attributes never hold a space
    return [line.rstrip().rsplit(None, 1)[0].rstrip() for line in r.stdout.splitlines()
            if line.startswith(NICK_PREFIX)]


def _nss_steps(opts: Options, pem: bytes | None) -> list[Step]:
    if not opts.nss:
        return [Step("NSS databases: skipped (--no-nss)")]
    dbs = nss_databases(opts.home)
    if not dbs:
        return [Step(f"NSS databases: none under {opts.home} (a browser makes one on its first start)")]
    certutil = opts.certutil or shutil.which("certutil")
    if certutil is None:
        return [Step(f"NSS databases: {len(dbs)} found but certutil is missing "
                     "(apt-get install libnss3-tools, dnf install nss-tools): skipped")]
    steps = []
    nick = f"{NICK_PREFIX} {ca_id(pem)}" if pem else None
    for db in dbs:
        present = _nicknames(certutil, db)
        for old in present:
            if old != nick:
                steps.append(Step(f"NSS {db}: remove {old!r}",
                                  lambda d=db, n=old: _run([certutil, "-D", "-d", f"sql:{d}", "-n", n])))
        if nick is not None and nick not in present:
            steps.append(Step(f"NSS {db}: add {nick!r}",
                              lambda d=db: _run([certutil, "-A", "-d", f"sql:{d}", "-t", "C,,", "-n", nick,
                                                 "-i", str(opts.ca_file)])))
        if nick is not None and nick in present and len(present) == 1:
            steps.append(Step(f"NSS {db}: already installed"))
        if nick is None and not present:
            steps.append(Step(f"NSS {db}: no copy found"))
    return steps


def plan(opts: Options, pem: bytes | None) -> list[Step]:
    """Install ``pem`` (the current CA) everywhere, or with None remove every copy."""
    return _system_steps(opts, pem) + _nss_steps(opts, pem)


def carry_out(steps: list[Step], out=None) -> None:
    out = out or sys.stdout
    for step in steps:
        if step.run is not None:
            step.run()
        out.write(step.what + "\n")
