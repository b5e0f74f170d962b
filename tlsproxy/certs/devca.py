"""Standalone mode's development CA: made once per user, reused on every start.

Layout of the state directory (``$XDG_STATE_HOME/tlsproxy`` or ``~/.local/state/tlsproxy``)::

    ca.crt  ca.key          the development CA (10 years); trust ca.crt in your client
    tls.crt tls.key         a leaf for localhost, 127.0.0.1 and ::1, re-issued when < 30 days remain
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from cryptography import x509

from . import generate

LEAF_RENEW_BEFORE = dt.timedelta(days=30)
LEAF_NAMES = ("localhost",)
LEAF_IPS = ("127.0.0.1", "::1")


def default_state_dir(env: dict[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    base = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "tlsproxy"


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def ensure(state_dir: Path) -> tuple[Path, bool]:
    """Make (or reuse) the CA and a current localhost leaf in ``state_dir``.

    Returns the directory (a Secret-style layout: tls.crt, tls.key, ca.crt) and whether the CA was new.
    """
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca_crt, ca_key = state_dir / "ca.crt", state_dir / "ca.key"
    created = False
    if ca_crt.exists() and ca_key.exists():
        ca = generate.Issued(ca_crt.read_bytes(), ca_key.read_bytes())
    else:
        ca = generate.make_ca("tlsproxy development CA")
        _write(ca_key, ca.key_pem, 0o600)
        _write(ca_crt, ca.cert_pem, 0o644)
        created = True
    leaf_crt, leaf_key = state_dir / "tls.crt", state_dir / "tls.key"
    if created or not _leaf_fresh(leaf_crt, ca):
        leaf = generate.issue(ca, "localhost", dns=LEAF_NAMES, ips=LEAF_IPS)
        _write(leaf_key, leaf.key_pem, 0o600)
        _write(leaf_crt, leaf.cert_pem, 0o644)
    return state_dir, created


def _leaf_fresh(path: Path, ca: generate.Issued) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return False
    now = dt.datetime.now(dt.UTC)
    return cert.issuer == ca.cert.subject and cert.not_valid_after_utc - now > LEAF_RENEW_BEFORE
